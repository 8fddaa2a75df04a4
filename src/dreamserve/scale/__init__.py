"""Scale-out mode: Celery on Redis delivers task ids to GPU workers (one queue per model).

Celery only dispatches. Task state, leases, cancel and retries stay in SQL, exactly as in the
embedded mode, and kill stays ours (SIGKILL of the model child), never ``revoke(terminate=True)``.
"""
