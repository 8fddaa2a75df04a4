"""Wiro's API for ``bytedance/seedream-v4`` (api-spec.md): its Run form (``decode``), its error envelope
(``errors``), its shapes (``render``, the Tool/* ``catalogue``), its routes (``run``, ``tasks``, ``tools``,
``files``, ``socket`` with its shared ``feeds``; ``routes`` mounts them) and its callbacks (``webhook``)."""
