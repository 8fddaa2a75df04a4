"""``python -m dreamserve``: the same command as the ``dreamserve`` script."""

from dreamserve.cli import main

if __name__ == "__main__":
    main(prog_name="dreamserve")
