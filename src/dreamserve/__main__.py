from dreamserve.cli import main

main()
