"""Server commands: ``serve``, ``worker``, ``keys``, ``pull``, ``models``.

They import the server inside the function body, so that a client-only install (no fastapi,
sqlalchemy, torch) can still run ``generate``.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.markup import escape

from dreamserve import __version__
from dreamserve.cli.main import (
    DEFAULT_SERVER,
    command_path,
    error,
    main,
    read_credentials,
)
from dreamserve.client import DEFAULT_MODEL

if TYPE_CHECKING:  # the server's settings need pydantic-settings, a server extra: never import it here
    from collections.abc import Callable

    from uvicorn import Config

    from dreamserve.services import Services
    from dreamserve.settings import Settings

#: How often ``serve`` says it is still loading the model.
LOADING_NOTE_SECONDS = 10.0


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
@click.option(
    "--ssl-certfile",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Serve HTTPS with this certificate chain (PEM); the port then speaks TLS only.",
)
@click.option(
    "--ssl-keyfile",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The certificate's private key (PEM), unless the certificate file holds it.",
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
    ssl_certfile: Path | None,
    ssl_keyfile: Path | None,
) -> None:
    """Run the API and (by default) the model workers on this machine."""
    from dreamserve import malloc

    malloc.limit_arenas()  # first: it applies to the threads started after it
    malloc.map_large_blocks()
    from dreamserve import logs

    started = time.monotonic()
    model = {"source": source, "steps": steps, "max_pixels": max_pixels, "workers": workers}
    given = {
        "host": host,
        "port": port,
        "data_dir": data_dir,
        "run_workers": False if no_workers else None,
        "fetch_allow_private": fetch_allow_private,
        "fetch_allow_hosts": list(fetch_allow_hosts) or None,
        "ssl_certfile": ssl_certfile,
        "ssl_keyfile": ssl_keyfile,
    }
    settings = _settings(given, model)
    certfile, keyfile = _tls_files(settings)  # before anything starts: a bad certificate is a usage error
    logs.configure(settings.log_level)
    _prestart_models(settings)
    import uvicorn

    from dreamserve.api.app import create_app
    from dreamserve.projects import ensure_default_credentials

    creds, created = ensure_default_credentials(settings)
    _banner(settings, creds.api_key, creds.api_secret if created else None, creds.api_secret is None)
    _raise_open_file_limit()
    # The hook runs from the app's startup, inside server.run(): ``server`` is bound by then.
    app = create_app(settings, on_start=lambda services: _started(services, server, started))
    server = uvicorn.Server(uvicorn_config(app, settings, certfile, keyfile))
    server.run()


def uvicorn_config(app: Callable[..., Any], settings: Settings, certfile: str | None, keyfile: str | None) -> Config:
    """How ``serve`` has uvicorn serve ``app``: the guarded HTTP protocol and the settings' bounds. The tests'
    in-process servers (tests/conftest.py's ``LiveServer``) are configured by this same function."""
    import uvicorn

    from dreamserve.api.http_guard import guarded_protocol

    return uvicorn.Config(
        app,
        http=guarded_protocol(
            settings.http_header_timeout_seconds, settings.http_max_connections, settings.http_write_stall_seconds
        ),
        host=settings.host,
        port=settings.port,
        # Uvicorn's own records (one access line per request at INFO) follow ``log_level`` like the rest.
        log_level=settings.log_level.lower(),
        limit_concurrency=settings.http_limit_concurrency,
        timeout_keep_alive=settings.http_keepalive_seconds,
        ws_max_size=settings.ws_max_bytes,
        ws_per_message_deflate=settings.ws_compression,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
    )


def _prestart_models(settings: Settings) -> None:
    """Spawn the model processes before the API's modules are even imported: each loads its model while the API
    starts (seconds of imports, migrations), and its supervisor takes it over (``worker/process.py``)."""
    if not settings.run_workers:
        return
    from dreamserve.worker.process import prestart

    for slug, spec in settings.models.items():
        for index in range(spec.workers):
            prestart(spec, slug, index)


def _tls_files(settings: Settings) -> tuple[str | None, str | None]:
    """The certificate and key files for ``uvicorn.Config`` (none for plain HTTP), once they are known to load.

    uvicorn passes its context to the event loop's ``create_server``, whose TLS transport wraps the guarded
    protocol (``api/http_guard.py``): the protocol sees the decrypted stream, from the end of the handshake on."""
    import ssl

    if settings.ssl_certfile is None:
        return None, None
    certfile, keyfile = str(settings.ssl_certfile), str(settings.ssl_keyfile or settings.ssl_certfile)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise click.UsageError(f"Cannot load the TLS certificate {certfile} with the key {keyfile}: {exc}") from None
    return certfile, keyfile


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


def _banner(settings: Settings, key: str, new_secret: str | None, key_only: bool) -> None:
    """What ``serve`` prints before it loads the model. ``new_secret`` only when the project was just created."""
    from dreamserve.presets import resolve
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


async def _started(services: Services, server: Any, started: float) -> None:
    """Once the services are up: the collector set for serving (``gcpause.py``), then the announcement."""
    if services.settings.gc_pause:
        from dreamserve import gcpause

        gcpause.pause_after_startup()
    await _announce(services, server, started)


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
        error(f"[red]{escape(str(exc))}[/]")
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
    stored = read_credentials(path)
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
        error(f"[red]Cannot pull {escape(name)}:[/] {escape(str(exc))}")
        sys.exit(1)
    click.echo(str(folder))
    model = shlex.quote(str(local_dir)) if local_dir else name
    error(f"Done. Serve it with: {escape(command_path())} serve --model {escape(model)}")


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
