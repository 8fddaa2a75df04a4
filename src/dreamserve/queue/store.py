"""The task store: the SQL tasks table is the queue, claims are leases, every change is logged.

``TaskStore`` is the one entry point the rest of the server uses; it is made of one part per concern, each a
mixin over ``base.StoreBase`` (the sessions, hub, keyring, blob store and outbox they share):

- ``tasks``: creating a task (within ``quotas``) and reading tasks (by id, by token, Task/List's pages);
- ``transitions``: the named, guarded transitions of a task, each one transaction written through a
  ``change.Change``;
- ``claims``: a worker's claims (the next task, the same-shape tasks that batch with it, what is waiting), in the
  fair-share order of ``order``, which also counts a task's queue position;
- ``leases``: heartbeats and stop requests, the reaper, the dispatch marks;
- ``inputs``: the preprocess stage's lease on fetching a task's URL inputs, and staging them;
- ``files``: file rows (added with their access keys, read, deleted, expired);
- ``eventlog``: reads of the event log.
"""

from __future__ import annotations

from dreamserve.queue.base import Blobs, Outbox
from dreamserve.queue.claims import Claims
from dreamserve.queue.eventlog import EventLog
from dreamserve.queue.files import Files, add_files, new_blob_folder
from dreamserve.queue.inputs import Inputs
from dreamserve.queue.leases import Beat, Leases
from dreamserve.queue.order import Positions
from dreamserve.queue.quotas import Quota, StorageQuota, check_storage
from dreamserve.queue.tasks import LIST_SORTS, Tasks
from dreamserve.queue.transitions import Success

# The names the rest of the server imports from here, wherever their concern's module defines them.
__all__ = [
    "LIST_SORTS",
    "Beat",
    "Blobs",
    "Outbox",
    "Quota",
    "StorageQuota",
    "Success",
    "TaskStore",
    "add_files",
    "check_storage",
    "new_blob_folder",
]


class TaskStore(Tasks, Leases, Claims, Positions, Inputs, Files, EventLog):
    """The queue's store: every part above, over one set of sessions, hub, keyring, blob store and outbox."""
