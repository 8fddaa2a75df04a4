"""Nothing orphaned by a crash (issue 30, item 4): blobs no row names and scratch folders of tasks no worker
holds are swept once older than ``orphan_grace_seconds``; a server SIGKILLed mid-save leaves nothing behind."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from dreamserve.blobs import LocalBlobStore, S3BlobStore
from dreamserve.services import Services
from dreamserve.settings import S3Settings
from tests.conftest import SCRIPTED, png_bytes

S3 = os.environ.get("DREAMSERVE_TEST_S3")
log = logging.getLogger(__name__)


def _unnamed(data_dir: Path) -> set[str]:
    """Files under the blob store that no file row names, read from the database file itself."""
    conn = sqlite3.connect(data_dir / "dreamserve.db")
    try:
        named = {row[0] for row in conn.execute("SELECT blob_key FROM files")}
    finally:
        conn.close()
    root = data_dir / "files"
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - named


def test_local_listing_pages_resume_where_they_ended(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    # "a-b" sorts before "a/..." as a string but after the folder "a" in the walk: the cursor must follow the walk.
    keys = ["outputs/a/0.png", "outputs/a/1.png", "outputs/a-b/0.png", "outputs/b/c/0.png", "outputs/z.png"]
    for key in keys:
        store.put(key, b"x")
    store.put("inputs/f/0.png", b"x")
    seen: list[str] = []
    after = None
    while True:
        page = store.list_page("outputs", after, 2)
        seen += [entry.key for entry in page]
        if len(page) < 2:
            break
        after = page[-1].key
    assert sorted(seen) == sorted(keys) and len(seen) == len(set(seen)), seen
    assert store.list_page("missing", None, 10) == []
    assert all(abs(e.modified - time.time()) < 60 for e in store.list_page("outputs", None, 10))


def test_sweep_deletes_old_unnamed_blobs_and_idle_scratch_only(make_app: Any) -> None:
    app = make_app(model={"workers": 0})
    upload = app.post("/v1/File/Upload", files=[("file", ("a.png", png_bytes(), "image/png"))]).json()
    assert upload["result"] is True
    blob_dir, old = app.settings.blob_dir, time.time() - 7200
    (named,) = _all_files(blob_dir)
    os.utime(named, (old, old))  # old, but a row names it: kept
    orphan, fresh, temp = blob_dir / "outputs/f1/0.png", blob_dir / "outputs/f2/0.png", blob_dir / "inputs/f3/.tmp-x"
    for path in (orphan, fresh, temp):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"left by a crash")
    for path in (orphan, temp):
        os.utime(path, (old, old))
    outside = blob_dir / "backups/keep.bin"  # not a folder the server writes
    outside.parent.mkdir()
    outside.write_bytes(b"x")
    os.utime(outside, (old, old))
    idle, young = app.settings.data_dir / "scratch/999-abc", app.settings.data_dir / "scratch/998-def"
    for folder in (idle, young):
        (folder / "outputs").mkdir(parents=True)
    os.utime(idle, (old, old))

    async def sweep() -> tuple[int, int]:
        services = Services(app.settings, workers="none")
        services.orphans.settings = app.settings.model_copy(update={"orphan_sweep_page": 1})  # many pages
        try:
            return await services.orphans.run_pass(), services.orphans.deleted
        finally:
            await services.engine.dispose()

    assert asyncio.run(sweep()) == (2, 2)
    assert named.is_file() and fresh.is_file() and outside.is_file()
    assert not orphan.exists() and not orphan.parent.exists() and not temp.exists()
    assert not idle.exists() and young.exists(), "a scratch folder within the grace period stays"
    file_url = upload["list"][0]["url"]
    assert app.http.get(file_url).status_code == 200


def _all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_a_server_killed_mid_save_leaves_no_orphan_after_restart(make_server: Any) -> None:
    # A real server (it is frozen and SIGKILLed) whose model process runs the scripted engine (no model load at either
    # start): 20 steps of 50 ms, then the four PNGs, saved as the diffusers engine saves them (temp file, rename).
    server = make_server(
        model={"engine": SCRIPTED, "max_pixels": 128 * 128, "steps": 20},
        env={"DREAMSERVE_SCRIPTED_STEP_SECONDS": "0.05"},
        min_pixels=64 * 64,
        orphan_grace_seconds=1,
        orphan_sweep_seconds=0.2,
        lease_seconds=2,
    )
    run = server.run({"prompt": "killed while saving", "size": "128x128", "maxImages": 4})
    server.wait_progress(run["taskid"])
    assert server.process is not None
    children = psutil.Process(server.process.pid).children(recursive=True)
    # The server is frozen while its model process saves images, and killed before it records them: the images
    # are on disk and no row names them (the moment a kill mid-save hits by chance, made certain).
    os.kill(server.process.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 60
    while not _unnamed(server.settings.data_dir):
        assert time.monotonic() < deadline, "the model process saved nothing"
        time.sleep(0.05)
    server.stop(signal.SIGKILL)
    _, alive = psutil.wait_procs(children, timeout=30)  # the model process sees its pipe close and exits
    for child in alive:
        child.kill()
    left = _unnamed(server.settings.data_dir)
    log.info("the kill left %d files no row names: %s", len(left), sorted(left))
    assert left and all(key.startswith("outputs/") for key in left), left
    server.start()
    restarted = time.monotonic()
    task = server.wait(run["taskid"])
    assert task["pexit"] == "0" and task["attempts"] == "2" and len(task["outputs"]) == 4
    deadline = time.monotonic() + 30
    while _unnamed(server.settings.data_dir) & left:
        assert time.monotonic() < deadline, f"still there: {_unnamed(server.settings.data_dir) & left}"
        time.sleep(0.1)
    log.info("swept %.1f s after the restart", time.monotonic() - restarted)
    assert _unnamed(server.settings.data_dir) == set(), "only what rows name is left"
    assert list((server.settings.data_dir / "scratch").glob("*")) == []
    assert "orphan sweep: deleted" in server.log()


@pytest.mark.skipif(not S3, reason="needs SeaweedFS: run under scripts/scaleout-env")
def test_s3_sweep_lists_in_pages_and_keeps_what_rows_name(make_app: Any) -> None:
    app = make_app(model={"workers": 0}, s3=S3Settings(bucket="dreamserve", endpoint=S3))
    upload = app.post("/v1/File/Upload", files=[("file", ("a.png", png_bytes(), "image/png"))]).json()
    assert upload["result"] is True
    store = S3BlobStore(S3Settings(bucket="dreamserve", endpoint=S3))
    folder = secrets.token_hex(8)
    orphans = [f"outputs/{folder}/{i}.png" for i in range(5)]
    for key in orphans:
        store.put(key, b"left by a crash")
    entries = []
    after = None
    while len(page := store.list_page("outputs", after, 2)) == 2:
        entries += page
        after = page[-1].key
    entries += page
    listed = [entry.key for entry in entries]
    assert set(orphans) <= set(listed) and len(listed) == len(set(listed))
    # The bucket is the run's: other tests' older outputs are listed too, so only these keys' times are known.
    assert all(abs(entry.modified - time.time()) < 300 for entry in entries if entry.key in orphans)

    async def sweep(later: float) -> int:
        services = Services(app.settings, workers="none")
        services.orphans.clock = lambda: time.time() + later
        try:
            return await services.orphans.run_pass()
        finally:
            await services.engine.dispose()

    assert asyncio.run(sweep(0)) == 0, "within the grace period nothing goes"
    assert asyncio.run(sweep(7200)) >= len(orphans)
    assert not any(store.exists(key) for key in orphans)
    conn = sqlite3.connect(app.settings.data_dir / "dreamserve.db")
    (named,) = [row[0] for row in conn.execute("SELECT blob_key FROM files")]
    conn.close()
    assert named.startswith("uploads/") and store.exists(named), "a blob a row names stays"
