"""Wiro's API for ``bytedance/seedream-v4`` (api-spec.md): its Run form (``decode``) and its error envelope
(``errors``). Its task, file, tool and socket routes are ``api/``'s, its shapes ``wiro/render.py``'s."""
