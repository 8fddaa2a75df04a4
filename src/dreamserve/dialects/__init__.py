"""The APIs the server speaks, one package each, over one core request (``request.RunRequest``).

Each dialect decodes its own wire form straight into a ``RunRequest`` (``decode``), renders the core's answers
and errors in its own shapes (``render``, ``errors``) and declares its routes (``routes``). The core (submit, the
queue, the worker, the engine, services) imports no dialect (``tests/test_layers.py``). Adding a dialect means
adding a package here and one line in ``mount.py``.
"""
