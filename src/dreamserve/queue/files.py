"""The store's file rows: adding them with their access keys, reading a task's, and deleting them (Task/
InputOutputDelete, File/Delete and File/FolderDelete, retention), rows first and their bytes once that commits."""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence

from sqlalchemy import and_, delete, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from dreamserve.queue.base import UNANSWERED, StoreBase, direct
from dreamserve.queue.db import File, Folder, Task
from dreamserve.queue.keyring import ServerKey, digest, new_salt
from dreamserve.status import FINAL, FileRole

#: The roles of a task's file rows: Task/InputOutputDelete and retention delete every one of them. The fourth role,
#: ``upload`` (File/Upload), belongs to no task: File/Delete, File/FolderDelete and retention delete those.
TASK_ROLES = (FileRole.INPUT, FileRole.OUTPUT, FileRole.PARTIAL)


def new_blob_folder() -> str:
    """The blob-store folder of a task's inputs or outputs: random, and unrelated to any access key."""
    return secrets.token_hex(16)


async def add_files(session: AsyncSession, keys: ServerKey, files: Iterable[File]) -> None:
    """Insert file rows with a salt, then store the digest of the access key their id and salt derive."""
    rows = list(files)
    for file in rows:
        # A row stored before (a partial output becoming an output) keeps its salt, so its URL stays valid.
        if file.key_salt is None:
            file.key_salt = new_salt()
        session.add(file)
    await session.flush()
    for file in rows:
        file.key_digest = digest(keys.accesskey(file))


async def delete_rows(session: AsyncSession, task_ids: Sequence[int], roles: Sequence[FileRole]) -> list[str]:
    """Delete the rows in the caller's transaction; returns their blob keys, deleted once it commits."""
    stmt = delete(File).where(File.task_id.in_(list(task_ids)), File.role.in_(list(roles))).returning(File.blob_key)
    return list((await session.execute(stmt)).scalars())


class Files(StoreBase):
    async def files(self, task_ids: Iterable[int], role: FileRole | Sequence[FileRole]) -> dict[int, list[File]]:
        """The file rows of ``role`` (or of any of several roles, in one query) of each task, by position."""
        ids = list(task_ids)
        result: dict[int, list[File]] = {i: [] for i in ids}
        if not ids:
            return result
        roles = [role] if isinstance(role, str) else list(role)
        if len(ids) == 1:  # a poll's: read directly where the store can
            found = direct(self.reads, lambda reads: reads.task_files(ids[0], roles))
            if found is not UNANSWERED:
                return {ids[0]: found}
        query = select(File).where(File.task_id.in_(ids), File.role.in_(roles)).order_by(File.position)
        async with self.sessions() as session:
            for file in (await session.execute(query)).scalars():
                result[file.task_id or 0].append(file)
        return result

    async def delete_task_files(self, task_id: int) -> int:
        """Task/InputOutputDelete: every file of a task (inputs, outputs, and the partial images an attempt streamed
        before it was cancelled or failed), rows and bytes; returns how many."""
        async with self.sessions.begin() as session:
            keys = await delete_rows(session, [task_id], TASK_ROLES)
        await self._delete_blobs(keys)
        return len(keys)

    async def delete_project_files(
        self, project_id: int, *, file_id: int | None = None, folders: Sequence[int] = ()
    ) -> int:
        """File/Delete and File/FolderDelete: the uploads of a project with id ``file_id``, or in ``folders``,
        rows and bytes, and the ``folders`` rows themselves; returns how many files went."""
        which = File.id == file_id if file_id is not None else File.folder_id.in_(list(folders))
        stmt = (
            delete(File)
            .where(File.project_id == project_id, File.role == FileRole.UPLOAD, which)
            .returning(File.blob_key)
        )
        async with self.sessions.begin() as session:
            keys = list((await session.execute(stmt)).scalars())
            if folders:
                await session.execute(
                    delete(Folder).where(Folder.project_id == project_id, Folder.id.in_(list(folders)))
                )
        await self._delete_blobs(keys)
        return len(keys)

    async def expire_files(self, before: float, limit: int = 500) -> int:
        """Retention: uploads, and every file of an ended task, created before ``before``; returns how many went."""
        ended = select(Task.id).where(Task.status.in_(list(FINAL)))
        expired = or_(File.role == FileRole.UPLOAD, and_(File.role.in_(TASK_ROLES), File.task_id.in_(ended)))
        query = select(File.id, File.blob_key).where(expired, File.created < before).limit(limit)
        async with self.sessions.begin() as session:
            rows = (await session.execute(query)).all()
            if rows:
                await session.execute(delete(File).where(File.id.in_([row.id for row in rows])))
        await self._delete_blobs([row.blob_key for row in rows])
        return len(rows)
