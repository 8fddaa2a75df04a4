"""The ``dreamserve`` command.

``generate`` is a thin shell over the SDK with a live progress bar. ``serve``, ``worker`` and
``keys create`` are the server side: they import it inside the function body, so that a client-only
install (no fastapi, sqlalchemy, torch) can still run ``generate``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from dreamserve import __version__
from dreamserve.client import DEFAULT_MODEL, Client, Event, RunResult, Task
from dreamserve.errors import DreamError, InvalidState
from dreamserve.status import LABELS, TaskStatus

if TYPE_CHECKING:  # the server's settings need pydantic-settings, a server extra: never import it here
    from dreamserve.settings import Settings

#: Progress and errors go to stderr; stdout carries only results (paths, JSON), for scripts.
console = Console(stderr=True)
DEFAULT_DATA_DIR = "dreamserve-data"
DEFAULT_SERVER = "http://127.0.0.1:8000"
#: How often ``generate`` asks for the queue position while its task waits (the socket is silent then).
QUEUE_POLL_SECONDS = 1.0
STATUS_TEXT: dict[str, str] = {status.value: label for status, label in LABELS.items()}


@click.group()
@click.version_option(__version__, prog_name="dreamserve")
def main() -> None:
    """dreamserve: a self-hosted, Wiro-compatible Seedream 4.0 image service."""


# -- server side ------------------------------------------------------------------------------------


@main.command()
@click.option("--host", default=None, help="Interface to bind (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default 8000).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Database, files, credentials.")
@click.option("--model", "source", default=None, help="Source of bytedance/seedream-v4: tiny, a diffusers folder...")
@click.option("--steps", type=int, default=None, help="Denoising steps (default: the model family's).")
@click.option("--max-pixels", type=int, default=None, help="Native generation cap; larger sizes are upscaled.")
@click.option("--workers", type=int, default=None, help="Model processes for the default model.")
@click.option("--no-workers", is_flag=True, help="Run the API only (workers run elsewhere).")
def serve(
    host: str | None,
    port: int | None,
    data_dir: Path | None,
    source: str | None,
    steps: int | None,
    max_pixels: int | None,
    workers: int | None,
    no_workers: bool,
) -> None:
    """Run the API and (by default) the model workers on this machine."""
    import uvicorn

    from dreamserve import logs
    from dreamserve.api.app import create_app
    from dreamserve.projects import ensure_default_credentials

    model = {"source": source, "steps": steps, "max_pixels": max_pixels, "workers": workers}
    given = {"host": host, "port": port, "data_dir": data_dir, "run_workers": False if no_workers else None}
    settings = _settings(given, model)
    logs.configure(settings.log_level)
    creds = ensure_default_credentials(settings)
    _banner(settings.base_url, creds.api_key, creds.api_secret, settings.data_dir)
    _raise_open_file_limit()
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        limit_concurrency=settings.http_limit_concurrency,
        timeout_keep_alive=settings.http_keepalive_seconds,
        ws_max_size=settings.ws_max_bytes,
        forwarded_allow_ips=settings.forwarded_allow_ips,
    )


def _raise_open_file_limit() -> None:
    """Soft open-file limit up to the hard one: every connection is a descriptor, and the usual soft 1,024
    lets a thousand idle connections deny everyone else (``http_limit_concurrency`` bounds them instead)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        click.echo(f"Could not raise the open-file limit from {soft} to {target}: {exc}", err=True)


def _settings(given: dict[str, Any], model: dict[str, Any] | None = None) -> Settings:
    """Settings from env and defaults, with only the flags actually given on top (init kwargs beat env)."""
    from pydantic import ValidationError

    from dreamserve.settings import ModelSpec, Settings

    overrides = {name: value for name, value in given.items() if value is not None}
    try:
        changes = {name: value for name, value in (model or {}).items() if value is not None}
        if changes:
            # Keep the rest of DREAMSERVE_MODELS; change only the given fields of the default model.
            models = Settings().models
            spec = models.get(DEFAULT_MODEL, ModelSpec()).model_dump()
            overrides["models"] = {**models, DEFAULT_MODEL: ModelSpec(**{**spec, **changes})}
        return Settings(**overrides)
    except ValidationError as exc:
        raise click.UsageError(f"Invalid settings: {exc}") from None


def _banner(url: str, key: str, secret: str | None, data_dir: Path) -> None:
    out = click.echo
    out(f"dreamserve {__version__} on {url}  (data: {data_dir})")
    out(f"  API key:    {key}")
    out(f"  API secret: {secret if secret is not None else '(none: key-only project)'}")
    out("\nTry it with curl (Wiro's signature: HMAC-SHA256 keyed with the API key over secret + nonce):\n")
    if secret is None:
        out(f'  curl -X POST "{url}/v1/Run/{DEFAULT_MODEL}" -H "x-api-key: {key}" \\')
    else:
        out(f'  KEY="{key}"; SECRET="{secret}"; NONCE=$(date +%s)')
        out('  SIGNATURE="$(echo -n "${SECRET}${NONCE}" | openssl dgst -sha256 -hmac "${KEY}")"')
        out(f'  curl -X POST "{url}/v1/Run/{DEFAULT_MODEL}" -H "x-api-key: $KEY" \\')
        out('       -H "x-nonce: $NONCE" -H "x-signature: $SIGNATURE" \\')
    out('       -F "prompt=a red fox in the snow" -F "size=2048x2048" -F "maxImages=1"')
    # generate finds these credentials in ./dreamserve-data unless told where the data folder is.
    where = "" if data_dir.resolve() == Path(DEFAULT_DATA_DIR).resolve() else f" --data-dir {data_dir}"
    out(f'\nOr with the CLI:\n\n  dreamserve generate "a red fox" -o out/{where}\n')


@main.command()
@click.option("--name", default=None, help="Worker name in Celery (default gpu-<host>).")
@click.option("--model", "source", default=None, help="Source of the default model, as for serve.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Scratch space for this worker.")
def worker(name: str | None, source: str | None, data_dir: Path | None) -> None:
    """Run one GPU worker for scale-out mode: consumes gpu.<model> queues from Celery (needs redis_url)."""
    from dreamserve import logs
    from dreamserve.scale.worker import run_worker

    settings = _settings({"dispatch": "celery", "data_dir": data_dir}, {"source": source})
    logs.configure(settings.log_level)
    run_worker(settings, name)


@main.group()
def keys() -> None:
    """Manage project API keys."""


@keys.command("create")
@click.option("--name", default="project", show_default=True, help="A label for the project.")
@click.option("--key-only", is_flag=True, help="Accept x-api-key alone (no signature) for this project.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="The server's data folder.")
@click.option("--json", "as_json", is_flag=True, help="Print {project_id, api_key, api_secret, webhook_secret}.")
@click.option(
    "--max-priority",
    type=click.IntRange(0, 9),
    default=None,
    help="Highest priority this project's tasks get; higher asks are lowered to it. [default: the server's "
    "max_priority setting, 0]",
)
def keys_create(name: str, key_only: bool, data_dir: Path | None, as_json: bool, max_priority: int | None) -> None:
    """Create a project and print its key and secret (the secret is shown only now)."""
    from dreamserve.projects import create_project

    settings = _settings({"data_dir": data_dir})
    creds = create_project(settings, name, signature=not key_only, max_priority=max_priority)
    if as_json:
        keys = {"project_id": creds.project_id, "api_key": creds.api_key, "api_secret": creds.api_secret}
        click.echo(json.dumps({**keys, "webhook_secret": creds.webhook_secret}))
        return
    click.echo(f"Project {creds.project_id} ({name}) created.")
    click.echo(f"  API key:    {creds.api_key}")
    if creds.api_secret is None:
        click.echo("  API secret: none (key-only: send x-api-key alone)")
    else:
        click.echo(f"  API secret: {creds.api_secret}")
        click.echo("The secret is not shown again; only a sealed form of it is stored. Keep it now.")
    # Unlike the API secret, the server keeps this one (it signs callbacks with it), so it can be shown again.
    click.echo(f"  Webhook secret: {creds.webhook_secret} (verify callbacks with dreamserve.signing.verify_webhook)")


@keys.command("revoke")
@click.argument("which")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="The server's data folder.")
def keys_revoke(which: str, data_dir: Path | None) -> None:
    """Revoke a project's key: WHICH is the project id, the API key, or its first 8 characters.

    A running server refuses the key from its next request on; the project's tasks and files stay.
    """
    from dreamserve.projects import revoke_project

    try:
        revoked = revoke_project(_settings({"data_dir": data_dir}), which)
    except ValueError as exc:
        _error(f"[red]{escape(str(exc))}[/]")
        sys.exit(1)
    for project_id, name, prefix in revoked:
        click.echo(f"Project {project_id} ({name}, key {prefix}...) revoked.")


# -- client side ------------------------------------------------------------------------------------


@main.command()
@click.argument("prompt")
@click.option("-i", "--image", "images", multiple=True, help="Reference image: a file or an http(s) URL (up to 14).")
@click.option("--size", default=None, help="WxH (e.g. 2048x2048), or 1K, 2K, 4K. Default 2048x2048.")
@click.option("-n", "--max-images", type=click.IntRange(1, 15), default=1, show_default=True)
@click.option("--watermark", is_flag=True, help="Add a visible AI-generated mark.")
@click.option("--seed", type=int, default=None, help="Seed, for reproducible images (a dreamserve extension).")
@click.option("-o", "--out", type=click.Path(path_type=Path, file_okay=False), default=Path("."), show_default=True)
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="owner/name of the model.")
@click.option("--server", default=None, help="Server URL [env DREAMSERVE_SERVER, else credentials.json].")
@click.option("--key", default=None, help="API key [env DREAMSERVE_API_KEY, else credentials.json].")
@click.option("--secret", default=None, help="API secret [env DREAMSERVE_API_SECRET, else credentials.json].")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Where credentials.json is.")
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
            # Never overwrite the outputs of an earlier task that had the same names (0.png, ...).
            names = [_free_name(out, str(o.get("name") or ""), task.id) for o in task.outputs]
            paths = [client.download(o, out, filename=n) for o, n in zip(task.outputs, names, strict=True)]
        except (DreamError, TimeoutError) as exc:
            _error(f"[red]{type(exc).__name__}:[/] {escape(str(getattr(exc, 'message', None) or exc))}")
            sys.exit(1)
        except KeyboardInterrupt:
            sys.exit(130)
    if as_json:
        click.echo(json.dumps({"task": task.data, "files": [str(p) for p in paths]}, indent=2))
    for path in [] if as_json else paths:
        click.echo(str(path))
    if not task.succeeded:
        why = task.debugerror.strip() or "no error message"
        _error(f"[red]Task {task.id} ended {task.status} (pexit {task.pexit or '?'}):[/] {escape(why)}")
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
        _error(f"[yellow]Could not stop task {taskid}:[/] {escape(exc.message)}")
        return False
    return True


def _error(text: str) -> None:
    # Server messages are escaped by the callers: Wiro's "Request parameter [size] ..." is not markup.
    console.print(text, highlight=False, soft_wrap=True)


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


def _credentials(
    server: str | None, key: str | None, secret: str | None, data_dir: Path | None
) -> tuple[str, str, str | None]:
    """Flags, else env, else ``<data_dir>/credentials.json`` (written by ``serve``).

    A secret is taken only from a source that names no key or the same key, so a key given as a flag
    is never signed with the secret of another project found in the environment or the file.
    """
    env = os.environ
    folder = data_dir or Path(env.get("DREAMSERVE_DATA_DIR") or DEFAULT_DATA_DIR)
    sources: list[dict[str, Any]] = [
        {"server": server, "api_key": key, "api_secret": secret},
        {
            "server": env.get("DREAMSERVE_SERVER"),
            "api_key": env.get("DREAMSERVE_API_KEY"),
            "api_secret": env.get("DREAMSERVE_API_SECRET"),
        },
        _read_credentials(folder / "credentials.json"),
    ]
    api_key = next((s["api_key"] for s in sources if s.get("api_key")), None)
    if not api_key:
        raise click.UsageError(
            f"No API key: pass --key, set DREAMSERVE_API_KEY, or point --data-dir at a server's data folder "
            f"(looked for {folder / 'credentials.json'})."
        )
    api_secret = next(
        (s["api_secret"] for s in sources if s.get("api_secret") and s.get("api_key") in (None, "", api_key)), None
    )
    url = str(next((s["server"] for s in sources if s.get("server")), DEFAULT_SERVER))
    return (url if "://" in url else f"http://{url}"), str(api_key), api_secret


def _read_credentials(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise click.UsageError(f"Cannot read {path}: {exc}") from None
    return data if isinstance(data, dict) else {}
