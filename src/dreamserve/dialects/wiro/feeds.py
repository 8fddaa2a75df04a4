"""The task sockets' fan-out: one feed per followed task, shared by every socket that follows it.

A feed subscribes to the hub, replays the stored log once, and renders each event's frame once; each
follower's socket gets the same text through its own bounded queue (``Follower``), so a socket that does not
read is dropped instead of holding the others up or piling frames in memory. A follower that joins late gets
the feed's history first (the log's frames: live-only previews are not kept). For the events whose writer
could not reach this hub, one poller reads the log every ``POLL_SECONDS``: the ids written since, then the
events of the followed tasks among them. The database is never read per socket, nor per feed once it started.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter, defaultdict, deque
from typing import Any

from dreamserve.dialects.wiro.render import event_message, file_item, socket_frame
from dreamserve.facts import Progress
from dreamserve.queue.db import Task
from dreamserve.queue.events import Event
from dreamserve.services import Services
from dreamserve.status import FINAL, FileRole, Frame, TaskStatus

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
#: Polls the range of event ids reaches back (a writer's commit can come after a later id's).
POLL_LOOKBACK = 10
#: Tasks one query for their new events covers (an OR of this many terms: well under SQLite's expression
#: depth of 1000).
POLL_CHUNK = 100
#: Seconds a feed waits on the hub between checks that it still runs (the poller reads the log meanwhile).
FEED_WAIT_SECONDS = 30.0


class Refused(Exception):
    """A follow past a cap; the socket is closed with 1008 and this reason."""


class Follower:
    """One socket's side of the fan-out: the frames waiting to be sent, at most ``limit``, and its feeds."""

    def __init__(self, limit: int) -> None:
        self.feeds: dict[int, TaskFeed] = {}
        self.limit = limit
        #: Set once the socket fell ``limit`` frames behind: it gets nothing more and is closed.
        self.dropped = asyncio.Event()
        self._frames: deque[str] = deque()
        self._ready = asyncio.Event()

    def push(self, text: str) -> None:
        """Queue a frame; never blocks, so one slow socket cannot hold up a feed's other followers."""
        if self.dropped.is_set():
            return
        if len(self._frames) >= self.limit:
            self._frames.clear()
            self.dropped.set()
            return
        self._frames.append(text)
        self._ready.set()

    async def next(self) -> str:
        while not self._frames:
            self._ready.clear()
            await self._ready.wait()
        return self._frames.popleft()

    def follows(self, token: str) -> bool:
        return any(feed.token == token for feed in self.feeds.values())


class TaskFeed:
    """The frames of one task, read once from the hub and the log, for all its followers."""

    def __init__(self, feeds: TaskFeeds, task: Task, token: str) -> None:
        self.task_id = task.id
        self.project_id = task.project_id
        self.token = token
        self.followers: set[Follower] = set()
        #: Followers waiting to be added (for the lock): the feed is kept while there are any.
        self.joining = 0
        #: The last event id taken from the hub or the log; ids drop the duplicates.
        self.last = 0
        self.ended = False
        self._feeds = feeds
        self._history: list[str] = []
        self._lock = asyncio.Lock()
        # Subscribed before the log is read, so nothing published in between is missed.
        self._live = feeds.services.hub.subscribe(task.id)
        self._reader = asyncio.create_task(self._read(), name=f"task feed {task.id}")

    async def add(self, follower: Follower) -> bool:
        """Queue the history for ``follower``, then its live frames; False when the task ended (the history
        ends with its final frame)."""
        async with self._lock:
            for text in self._history:
                follower.push(text)
            if self.ended:
                return False
            self.followers.add(follower)
            return True

    async def deliver(self, events: list[Event]) -> None:
        """Render the new ones among ``events`` in id order and queue them for every follower."""
        async with self._lock:
            for event in sorted({e.id: e for e in events if e.id > self.last}.values(), key=lambda e: e.id):
                if self.ended:
                    return
                self.last = event.id
                if event.type == Frame.OUTPUT_IMAGE:
                    continue
                message = await self._message(event)
                text = json.dumps(socket_frame(event.type, self.task_id, self.token, message))
                for follower in self.followers:
                    follower.push(text)
                self._history.append(self._stored(event, text))
                if event.type in FINAL:
                    self.ended = True
                    self._feeds.ended(self)

    def stop(self) -> None:
        if self._reader is not asyncio.current_task():
            self._reader.cancel()

    async def _read(self) -> None:
        try:
            await self.deliver(await self._feeds.services.store.events(self.task_id))
            while not self.ended:
                await self.deliver(await self._live.next(FEED_WAIT_SECONDS))
        except Exception:
            # The poller still reads the log for this feed.
            log.exception("task feed %s: the hub or the log failed", self.task_id)
        finally:
            await self._live.close()

    async def _message(self, event: Event) -> Any:
        """The final frame lists the outputs, rendered from the stored file rows with this server's public URL
        and their derived access keys (never stored), so they equal Task/Detail's whichever host ran the task."""
        if event.type != TaskStatus.POSTPROCESS_END:
            return event_message(event.message)
        services = self._feeds.services
        files = (await services.store.files([event.task_id], FileRole.OUTPUT))[event.task_id]
        settings = services.settings
        return [file_item(settings.base_url, file, services.keys, settings.retention_seconds) for file in files]

    def _stored(self, event: Event, text: str) -> str:
        """The frame as the log has it, for late followers: a progress frame without its live preview."""
        step = event.message
        if not isinstance(step, Progress) or step.preview is None:
            return text
        return json.dumps(socket_frame(event.type, self.task_id, self.token, event_message(step.stored())))


class TaskFeeds:
    """This process's feeds, the follows of each project (capped), and the poller of their logs."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self._feeds: dict[int, TaskFeed] = {}
        self._per_project: Counter[int] = Counter()
        self._poller: asyncio.Task[None] | None = None

    async def follow(self, follower: Follower, task: Task, token: str) -> None:
        """Start sending ``task``'s frames to ``follower``, the stored ones first; ``Refused`` past the
        project's cap."""
        limit = self.services.settings.socket_max_per_project
        if self._per_project[task.project_id] >= limit:
            raise Refused(f"This project's tasks already have {limit} socket followers, the limit; close some.")
        feed = self._feeds.get(task.id)
        if feed is None:
            feed = self._feeds[task.id] = TaskFeed(self, task, token)
            if self._poller is None:
                self._poller = asyncio.create_task(self._poll(), name="task feeds poller")
        follower.feeds[task.id] = feed
        self._per_project[task.project_id] += 1
        feed.joining += 1
        try:
            added = await feed.add(follower)
        finally:
            feed.joining -= 1
        if not added:
            self._unfollow(follower, feed)

    def leave(self, follower: Follower) -> None:
        """The socket closed: it follows nothing, and a feed nobody follows stops."""
        for feed in list(follower.feeds.values()):
            self._unfollow(follower, feed)

    def ended(self, feed: TaskFeed) -> None:
        """The task's final frame was queued: its followers are free to follow other tasks."""
        if self._feeds.get(feed.task_id) is feed:
            del self._feeds[feed.task_id]
        for follower in list(feed.followers):
            self._unfollow(follower, feed)
        feed.stop()

    async def close(self) -> None:
        tasks = [feed._reader for feed in self._feeds.values()] + ([self._poller] if self._poller else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._feeds.clear()

    def _unfollow(self, follower: Follower, feed: TaskFeed) -> None:
        if follower.feeds.pop(feed.task_id, None) is None:
            return
        feed.followers.discard(follower)
        self._per_project[feed.project_id] -= 1
        if self._per_project[feed.project_id] <= 0:
            del self._per_project[feed.project_id]
        if not feed.followers and not feed.joining and self._feeds.get(feed.task_id) is feed:
            del self._feeds[feed.task_id]
            feed.stop()

    async def _poll(self) -> None:
        """Every ``POLL_SECONDS``: the ids of the events written since (one range of the primary key, whatever
        the number of feeds), then the new events of the followed tasks among them. The range starts
        ``POLL_LOOKBACK`` polls back, for a transaction that committed after one with a later id."""
        try:
            marks: deque[int] = deque([await self.services.store.last_event_id()], maxlen=POLL_LOOKBACK)
            while self._feeds:
                await asyncio.sleep(POLL_SECONDS)
                try:
                    marks.append(await self._poll_once(marks[0], marks[-1]))
                except Exception:
                    log.exception("task feeds: reading the event log failed")
        finally:
            self._poller = None

    async def _poll_once(self, after: int, mark: int) -> int:
        written = await self.services.store.event_ids_after(after)
        behind = {task_id for id_, task_id in written if (feed := self._feeds.get(task_id)) and id_ > feed.last}
        feeds = [self._feeds[task_id] for task_id in behind if task_id in self._feeds]
        for start in range(0, len(feeds), POLL_CHUNK):
            await self._deliver(feeds[start : start + POLL_CHUNK])
        return max([mark, *(id_ for id_, _ in written)])

    async def _deliver(self, chunk: list[TaskFeed]) -> None:
        """The new events of these feeds' tasks, read in one query, each delivered to its feed."""
        events = await self.services.store.events_after({feed.task_id: feed.last for feed in chunk})
        by_task: dict[int, list[Event]] = defaultdict(list)
        for event in events:
            by_task[event.task_id].append(event)
        for feed in chunk:
            if by_task.get(feed.task_id) and not feed.ended:
                await feed.deliver(by_task[feed.task_id])
