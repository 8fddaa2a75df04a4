"""Scale-out mode: the GPU worker process. Celery on Redis (``dispatch.py``) delivers task ids to it, one queue
per model.

Celery only dispatches. Task state, leases, cancel and retries stay in SQL, exactly as in the
embedded mode, and kill stays ours (SIGKILL of the model child), never ``revoke(terminate=True)``.
"""
