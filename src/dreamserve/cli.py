"""The ``dreamserve`` command.

``generate`` is a thin shell over the SDK with a live progress bar. ``serve``, ``worker`` and
``keys create`` are the server side: they import it inside the function body, so that a client-only
install (no fastapi, sqlalchemy, torch) can still run ``generate``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import threading
import time
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
    from dreamserve.services import Services
    from dreamserve.settings import Settings

#: Progress and errors go to stderr; stdout carries only results (paths, JSON), for scripts.
console = Console(stderr=True)
DEFAULT_DATA_DIR = "dreamserve-data"
DEFAULT_SERVER = "http://127.0.0.1:8000"
#: How often ``generate`` asks for the queue position while its task waits (the socket is silent then).
QUEUE_POLL_SECONDS = 1.0
#: How often ``serve`` says it is still loading the model.
LOADING_NOTE_SECONDS = 10.0
STATUS_TEXT: dict[str, str] = {status.value: label for status, label in LABELS.items()}


@click.group()
@click.version_option(__version__, prog_name="dreamserve")
def main() -> None:
    """dreamserve: a self-hosted, Wiro-compatible Seedream 4.0 image service."""


# -- server side ------------------------------------------------------------------------------------


@main.command()
@click.option("--host", default=None, help="Interface to bind (default 127.0.0.1; 0.0.0.0 for the LAN).")
@click.option("--port", type=int, default=None, help="Port (default 8000).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Database, files, credentials.")
@click.option("--model", "source", default=None, help="Source of bytedance/seedream-v4: tiny, a preset, a folder...")
@click.option("--steps", type=int, default=None, help="Denoising steps (default: the model family's).")
@click.option("--max-pixels", type=int, default=None, help="Native generation cap; larger sizes are upscaled.")
@click.option("--workers", type=int, default=None, help="Model processes for the default model.")
@click.option("--no-workers", is_flag=True, help="Run the API only (workers run elsewhere).")
@click.option(
    "--fetch-allow-private",
    is_flag=True,
    default=None,
    help="Let input URLs and callbacks reach loopback and private addresses (a LAN or development setup).",
)
@click.option(
    "--fetch-allow-host",
    "fetch_allow_hosts",
    multiple=True,
    metavar="HOST",
    help="A host (minio.lan, *.corp.example) or network (10.1.0.0/16) fetches may reach, private or not. Repeatable.",
)
def serve(
    host: str | None,
    port: int | None,
    data_dir: Path | None,
    source: str | None,
    steps: int | None,
    max_pixels: int | None,
    workers: int | None,
    no_workers: bool,
    fetch_allow_private: bool | None,
    fetch_allow_hosts: tuple[str, ...],
) -> None:
    """Run the API and (by default) the model workers on this machine."""
    import uvicorn

    from dreamserve import logs
    from dreamserve.api.app import create_app
    from dreamserve.projects import ensure_default_credentials

    started = time.monotonic()
    model = {"source": source, "steps": steps, "max_pixels": max_pixels, "workers": workers}
    given = {
        "host": host,
        "port": port,
        "data_dir": data_dir,
        "run_workers": False if no_workers else None,
        "fetch_allow_private": fetch_allow_private,
        "fetch_allow_hosts": list(fetch_allow_hosts) or None,
    }
    settings = _settings(given, model)
    logs.configure(settings.log_level)
    creds, created = ensure_default_credentials(settings)
    _banner(settings, creds.api_key, creds.api_secret if created else None, creds.api_secret is None)
    _raise_open_file_limit()
    # The hook runs from the app's startup, inside server.run(): ``server`` is bound by then.
    app = create_app(settings, on_start=lambda services: _announce(services, server, started))
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        limit_concurrency=settings.http_limit_concurrency,
        timeout_keep_alive=settings.http_keepalive_seconds,
        ws_max_size=settings.ws_max_bytes,
        forwarded_allow_ips=settings.forwarded_allow_ips,
    )
    server = uvicorn.Server(config)
    server.run()


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


def command_path() -> str:
    """How to run this very ``dreamserve`` from any folder: the real path of the running executable."""
    script = Path(sys.argv[0])
    if script.name == "dreamserve" and script.is_file():
        return shlex.quote(str(script.resolve()))
    # ``python -m dreamserve``: the interpreter's own path (not resolved: a venv's python is a symlink).
    return f"{shlex.quote(os.path.abspath(sys.executable))} -m dreamserve"


def _banner(settings: Settings, key: str, new_secret: str | None, key_only: bool) -> None:
    """What ``serve`` prints before it loads the model. ``new_secret`` only when the project was just created."""
    from dreamserve.models import resolve
    from dreamserve.userconfig import credentials_path

    out, url, cli = click.echo, settings.base_url, command_path()
    out(f"dreamserve {__version__} on {url}  (data: {settings.data_dir.resolve()})")
    if settings.playground:
        out(f"  Playground:  {url}/  (open it in a browser, paste the key and secret)")
    out(f"  API key:     {key}")
    if key_only:
        out("  API secret:  none (key-only project: send x-api-key alone)")
    elif new_secret is not None:
        out(f"  API secret:  {new_secret}  (shown at this first start only; later: {cli} keys show)")
    else:
        out(f"  API secret:  kept in the credentials file; show it with: {cli} keys show")
    out(f"  Credentials: {credentials_path()}  (the CLI reads them from any folder)")
    out("\nTry it with curl (Wiro's signature: HMAC-SHA256 keyed with the API key over secret + nonce):\n")
    if key_only:
        out(f'  curl -X POST "{url}/v1/Run/{DEFAULT_MODEL}" -H "x-api-key: {key}" \\')
    else:
        out(f'  KEY="{key}"; SECRET="$({cli} keys show --secret)"; NONCE=$(date +%s)')
        out('  SIGNATURE="$(echo -n "${SECRET}${NONCE}" | openssl dgst -sha256 -hmac "${KEY}")"')
        out(f'  curl -X POST "{url}/v1/Run/{DEFAULT_MODEL}" -H "x-api-key: $KEY" \\')
        out('       -H "x-nonce: $NONCE" -H "x-signature: $SIGNATURE" \\')
    out('       -F "prompt=a red fox in the snow" -F "size=2048x2048" -F "maxImages=1"')
    out(f'\nOr with the CLI, from any folder:\n\n  {cli} generate "a red fox" -o out/\n')
    specs = [spec for spec in settings.models.values() if spec.workers and settings.run_workers]
    if any(resolve(spec).source == "tiny" for spec in specs):
        out("The model is `tiny`: random weights built in code, so its images are noise by design.")
        out(f"Real weights (FLUX.2 [klein] 4B, Apache-2.0; best on a GPU):\n\n  {cli} pull flux2-klein-4b")
        out(f"  {cli} serve --model flux2-klein-4b\n")


async def _announce(services: Services, server: Any, started: float) -> None:
    """A progress line while the models load, then "ready" with their load times (only once they are loaded)."""
    from dreamserve.status import WorkerState

    names = ", ".join(sorted({f"{s.slug} ({s.spec.source})" for s in services.supervisors}))
    if names:
        click.echo(f"Loading {names} ...")
    loaded = asyncio.create_task(services.wait_loaded())
    while not (await asyncio.wait({loaded}, timeout=LOADING_NOTE_SECONDS))[0]:
        click.echo(f"  still loading ({time.monotonic() - started:.0f} s)")
    while not server.started:  # "ready" means the port answers too
        await asyncio.sleep(0.05)
    failed = [s for s in services.supervisors if s.state is WorkerState.DEFUNCT]
    for supervisor in failed:
        click.echo(f"Model {supervisor.slug} could not be loaded: {supervisor.error}", err=True)
    times = ", ".join(f"{s.slug} loaded in {s.load_seconds:.1f} s" for s in services.supervisors if s not in failed)
    state = "ready" if not failed else "NOT ready (see above)"
    click.echo(f"{state} in {time.monotonic() - started:.1f} s" + (f" ({times})" if times else ""))


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


@keys.command("show")
@click.option("--key", "key_only", is_flag=True, help="Print the API key alone (for scripts).")
@click.option("--secret", "secret_only", is_flag=True, help="Print the API secret alone (for scripts).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="A server's data folder instead.")
def keys_show(key_only: bool, secret_only: bool, data_dir: Path | None) -> None:
    """Show the credentials ``serve`` saved: those of the last server started, or of --data-dir's."""
    from dreamserve import userconfig

    path = data_dir / userconfig.FILENAME if data_dir else userconfig.credentials_path()
    stored = _read_credentials(path)
    if not stored.get("api_key"):
        raise click.UsageError(f"No credentials in {path}: start `dreamserve serve` once (it writes them).")
    if key_only:
        click.echo(stored["api_key"])
        return
    if secret_only:
        if not stored.get("api_secret"):
            raise click.UsageError(f"The project in {path} is key-only: it has no API secret.")
        click.echo(stored["api_secret"])
        return
    click.echo(f"Server:         {stored.get('server') or DEFAULT_SERVER}")
    click.echo(f"API key:        {stored['api_key']}")
    click.echo(f"API secret:     {stored.get('api_secret') or 'none (key-only project)'}")
    click.echo(f"Webhook secret: {stored.get('webhook_secret', '')}")
    click.echo(f"(from {path})")


# -- model weights ----------------------------------------------------------------------------------


@main.command()
@click.argument("name")
@click.option(
    "--local-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Download into this folder (then serve --model FOLDER) instead of the Hugging Face cache.",
)
def pull(name: str, local_dir: Path | None) -> None:
    """Download a model's weights: NAME is a preset (dreamserve models) or a hub id (owner/name).

    Into the Hugging Face cache by default, where `serve --model NAME` finds them offline.
    """
    from dreamserve.weights import PullError
    from dreamserve.weights import pull as download

    try:
        folder = download(name, local_dir)
    except PullError as exc:
        _error(f"[red]Cannot pull {escape(name)}:[/] {escape(str(exc))}")
        sys.exit(1)
    click.echo(str(folder))
    model = shlex.quote(str(local_dir)) if local_dir else name
    _error(f"Done. Serve it with: {escape(command_path())} serve --model {escape(model)}")


@main.command("models")
def models_command() -> None:
    """List the model presets: licence, weights, size on disk, and whether they are on this machine."""
    from dreamserve.weights import human_size, local_models

    rows = [("preset", "weights", "licence", "on disk", "here")]
    for model in local_models():
        if model.built_in:
            rows.append((model.preset, "built in code", model.licence, "-", "yes (built in)"))
        else:
            here = f"yes: {model.path}" if model.path else f"no: dreamserve pull {model.preset}"
            size = human_size(model.size_bytes) if model.path else "-"
            rows.append((model.preset, model.source, model.licence, size, here))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[4])


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
    """Flags, else env, else the credentials file ``serve`` wrote: in ``--data-dir`` (or ``DREAMSERVE_DATA_DIR``)
    when given, else in the user's config folder, else in ``./dreamserve-data``.

    A secret is taken only from a source that names no key or the same key, so a key given as a flag
    is never signed with the secret of another project found in the environment or the file.
    """
    from dreamserve import userconfig

    env = os.environ
    folder = data_dir or (Path(env["DREAMSERVE_DATA_DIR"]) if env.get("DREAMSERVE_DATA_DIR") else None)
    files = (
        [folder / userconfig.FILENAME]
        if folder
        else [userconfig.credentials_path(), Path(DEFAULT_DATA_DIR) / userconfig.FILENAME]
    )
    sources: list[dict[str, Any]] = [
        {"server": server, "api_key": key, "api_secret": secret},
        {
            "server": env.get("DREAMSERVE_SERVER"),
            "api_key": env.get("DREAMSERVE_API_KEY"),
            "api_secret": env.get("DREAMSERVE_API_SECRET"),
        },
    ]
    # The first file that exists: a server's URL, key and secret come from one file, never mixed from two.
    sources.append(next((found for found in map(_read_credentials, files) if found), {}))
    api_key = next((s["api_key"] for s in sources if s.get("api_key")), None)
    if not api_key:
        looked = " or ".join(str(path) for path in files)
        raise click.UsageError(
            f"No API key: pass --key, set DREAMSERVE_API_KEY, or start `dreamserve serve` once, which saves its "
            f"credentials (looked for {looked})."
        )
    api_secret = next(
        (s["api_secret"] for s in sources if s.get("api_secret") and s.get("api_key") in (None, "", api_key)), None
    )
    url = str(next((s["server"] for s in sources if s.get("server")), DEFAULT_SERVER))
    return (url if "://" in url else f"http://{url}"), str(api_key), api_secret


def _read_credentials(path: Path) -> dict[str, Any]:
    from dreamserve import userconfig

    try:
        return userconfig.read(path)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
