"""``dreamserve generate``: a thin shell over the SDK with a live progress bar."""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from dreamserve.cli.main import (
    DEFAULT_DATA_DIR,
    DEFAULT_SERVER,
    console,
    error,
    main,
    read_credentials,
)
from dreamserve.client import DEFAULT_MODEL, Client, Event, RunResult, Task
from dreamserve.errors import DreamError, InvalidState
from dreamserve.status import LABELS, TaskStatus

#: How often ``generate`` asks for the queue position while its task waits (the socket is silent then).
QUEUE_POLL_SECONDS = 1.0
STATUS_TEXT: dict[str, str] = {status.value: label for status, label in LABELS.items()}


@main.command()
@click.argument("prompt")
@click.option("-i", "--image", "images", multiple=True, help="Reference image: a file or an http(s) URL (up to 14).")
@click.option("--size", default=None, help="WxH (e.g. 2048x2048), or 1K, 2K, 4K. Default 2048x2048.")
@click.option("-n", "--max-images", type=click.IntRange(1, 15), default=1, show_default=True)
@click.option("--watermark", is_flag=True, help="Add a visible AI-generated mark.")
@click.option("--seed", type=int, default=None, help="Seed, for reproducible images (a dreamserve extension).")
@click.option("-o", "--out", type=click.Path(path_type=Path, file_okay=False), default=Path("."), show_default=True)
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="owner/name of the model.")
@click.option("--server", default=None, help="Server URL [env DREAMSERVE_SERVER, else the credentials file].")
@click.option("--key", default=None, help="API key [env DREAMSERVE_API_KEY, else the credentials file].")
@click.option("--secret", default=None, help="API secret [env DREAMSERVE_API_SECRET, else the credentials file].")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Read credentials.json from this server data folder instead of the user's config folder.",
)
@click.option("--json", "as_json", is_flag=True, help='Print {"task": <Task/Detail object>, "files": [...]}.')
def generate(
    prompt: str,
    images: tuple[str, ...],
    size: str | None,
    max_images: int,
    watermark: bool,
    seed: int | None,
    out: Path,
    model: str,
    server: str | None,
    key: str | None,
    secret: str | None,
    data_dir: Path | None,
    as_json: bool,
) -> None:
    """Generate images on a server, following progress live, and save them in --out. Ctrl-C cancels the task."""
    url, api_key, api_secret = _credentials(server, key, secret, data_dir)
    refs = [_reference(image) for image in images]
    with Client(url, api_key, api_secret) as client:
        try:
            run = client.run(
                prompt, model=model, images=refs, size=size, max_images=max_images, watermark=watermark, seed=seed
            )
            task = _follow(client, run)
            paths = _save(client, task, out)
        except (DreamError, TimeoutError) as exc:
            error(f"[red]{type(exc).__name__}:[/] {escape(str(getattr(exc, 'message', None) or exc))}")
            sys.exit(1)
        except KeyboardInterrupt:
            sys.exit(130)
    _report(task, paths, as_json)


def _save(client: Client, task: Task, out: Path) -> list[Path]:
    # Never overwrite the outputs of an earlier task that had the same names (0.png, ...).
    names = [_free_name(out, str(o.get("name") or ""), task.id) for o in task.outputs]
    return [client.download(o, out, filename=n) for o, n in zip(task.outputs, names, strict=True)]


def _report(task: Task, paths: list[Path], as_json: bool) -> None:
    """The saved files (or the JSON), and exit 1 for a task that did not succeed."""
    if as_json:
        click.echo(json.dumps({"task": task.data, "files": [str(p) for p in paths]}, indent=2))
    for path in [] if as_json else paths:
        click.echo(str(path))
    if not task.succeeded:
        why = task.debugerror.strip() or "no error message"
        error(f"[red]Task {task.id} ended {task.status} (pexit {task.pexit or '?'}):[/] {escape(why)}")
        sys.exit(1)


def _follow(client: Client, run: RunResult) -> Task:
    """Wait for the task with a live bar: status, queue position, step x/y, the server's ETA."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[steps]}"),
        TextColumn("{task.fields[eta]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        bar = progress.add_task(f"task {run.taskid} queued", total=None, steps="", eta="")
        seen: dict[str, str] = {"status": TaskStatus.QUEUE}

        def on_event(event: Event) -> None:
            if event.type in STATUS_TEXT:
                seen["status"] = event.type
            _show(progress, bar, run, event)

        stop = threading.Event()
        watcher = threading.Thread(target=_watch_queue, args=(client, run, seen, on_event, stop), daemon=True)
        watcher.start()
        try:
            return client.wait(tasktoken=run.socketaccesstoken, on_event=on_event)
        except KeyboardInterrupt:
            progress.update(bar, description=f"task {run.taskid} cancelling")
            if _stop(client, run.taskid):
                console.print(f"Task {run.taskid} cancelled.")
            sys.exit(130)
        finally:
            stop.set()


def _watch_queue(client: Client, run: RunResult, seen: dict[str, str], on_event: Any, stop: threading.Event) -> None:
    """While the task waits, poll Task/Detail for ``queueposition`` (ours) and report it as a task_queue event."""
    shown = None
    delay = 0.2  # the first look comes quickly: a queued task is what this thread is for
    while not stop.wait(delay) and seen["status"] == TaskStatus.QUEUE:
        delay = QUEUE_POLL_SECONDS
        try:
            task = client.detail(run.taskid)
        except DreamError:
            continue  # the socket drives the bar; a failed poll only delays the position
        position = task.data.get("queueposition")
        if task.status != TaskStatus.QUEUE or not position:
            return
        if position != shown and seen["status"] == TaskStatus.QUEUE:
            shown = position
            on_event(Event(TaskStatus.QUEUE, run.taskid, run.socketaccesstoken, {"position": position}))


def _show(progress: Progress, bar: TaskID, run: RunResult, event: Event) -> None:
    info = event.progress
    if info is not None:
        done, total = info.step, info.total
        if done is not None and total:
            progress.update(bar, completed=done, total=total, steps=f"step {done}/{total}")
        elif info.percentage is not None:
            progress.update(bar, completed=info.percentage, total=100, steps=f"{info.percentage:.0f}%")
        progress.update(bar, eta=f"ETA {info.remaining}" if info.remaining else "")
    elif event.type in STATUS_TEXT:
        text = STATUS_TEXT[event.type]
        if event.queue_position is not None:
            # Our queueposition counts the tasks ahead: 0 means this one runs next.
            text += f" ({event.queue_position} ahead)" if event.queue_position else " (next)"
        progress.update(bar, description=f"task {run.taskid} {text}")


def _stop(client: Client, taskid: str) -> bool:
    """Cancel (queued) or kill (running): Wiro allows each only in its own states."""
    try:
        try:
            client.cancel(taskid)
        except InvalidState:
            client.kill(taskid)
    except DreamError as exc:
        error(f"[yellow]Could not stop task {taskid}:[/] {escape(exc.message)}")
        return False
    return True


def _reference(value: str) -> str | Path:
    if value.startswith(("http://", "https://")):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise click.BadParameter(f"{value}: no such file (give a file or an http(s) URL).", param_hint="--image")
    return path


def _free_name(folder: Path, name: str, taskid: str) -> str | None:
    if not name or not (folder / name).exists():
        return name or None
    return f"{taskid}-{name}"


def _credential_files(data_dir: Path | None) -> list[Path]:
    """Where ``serve`` saved its credentials: ``--data-dir`` (or ``DREAMSERVE_DATA_DIR``), else the user's config
    folder, then ``./dreamserve-data``."""
    from dreamserve import userconfig

    folder = data_dir or (Path(os.environ["DREAMSERVE_DATA_DIR"]) if os.environ.get("DREAMSERVE_DATA_DIR") else None)
    if folder:
        return [folder / userconfig.FILENAME]
    return [userconfig.credentials_path(), Path(DEFAULT_DATA_DIR) / userconfig.FILENAME]


def _secret_for(api_key: str, sources: list[dict[str, Any]]) -> str | None:
    """The first secret from a source that names no key or this key."""
    for source in sources:
        if source.get("api_secret") and source.get("api_key") in (None, "", api_key):
            return str(source["api_secret"])
    return None


def _credentials(
    server: str | None, key: str | None, secret: str | None, data_dir: Path | None
) -> tuple[str, str, str | None]:
    """Flags, else env, else the credentials file ``serve`` wrote: in ``--data-dir`` (or ``DREAMSERVE_DATA_DIR``)
    when given, else in the user's config folder, else in ``./dreamserve-data``.

    A secret is taken only from a source that names no key or the same key, so a key given as a flag
    is never signed with the secret of another project found in the environment or the file.
    """
    env = os.environ
    files = _credential_files(data_dir)
    sources: list[dict[str, Any]] = [
        {"server": server, "api_key": key, "api_secret": secret},
        {
            "server": env.get("DREAMSERVE_SERVER"),
            "api_key": env.get("DREAMSERVE_API_KEY"),
            "api_secret": env.get("DREAMSERVE_API_SECRET"),
        },
    ]
    # The first file that exists: a server's URL, key and secret come from one file, never mixed from two.
    sources.append(next((found for found in map(read_credentials, files) if found), {}))
    api_key = next((s["api_key"] for s in sources if s.get("api_key")), None)
    if not api_key:
        looked = " or ".join(str(path) for path in files)
        raise click.UsageError(
            f"No API key: pass --key, set DREAMSERVE_API_KEY, or start `dreamserve serve` once, which saves its "
            f"credentials (looked for {looked})."
        )
    api_secret = _secret_for(str(api_key), sources)
    url = str(next((s["server"] for s in sources if s.get("server")), DEFAULT_SERVER))
    return (url if "://" in url else f"http://{url}"), str(api_key), api_secret
