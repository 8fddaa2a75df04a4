"""The ``dreamserve`` command: ``serve`` and ``keys`` run the server side (imported lazily);
``generate`` is a thin shell over the SDK with a live progress bar."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from dreamserve.client import Client
from dreamserve.errors import DreamError

console = Console(stderr=True)
DEFAULT_DATA_DIR = "dreamserve-data"


@click.group()
@click.version_option(package_name="dreamserve")
def main() -> None:
    """dreamserve: a self-hosted, Wiro-compatible Seedream 4.0 image service."""


@main.command()
@click.option("--host", default=None, help="Interface to bind (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default 8000).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Database and files.")
@click.option("--model", "source", default=None, help="tiny, a diffusers folder, a checkpoint file or a hub id.")
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

    from dreamserve.api.app import create_app
    from dreamserve.projects import ensure_default_credentials
    from dreamserve.settings import DEFAULT_MODEL, Settings

    settings = Settings()
    overrides: dict[str, Any] = {"host": host, "port": port, "data_dir": data_dir}
    settings = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    model = {"source": source, "steps": steps, "max_pixels": max_pixels, "workers": workers}
    spec = settings.models.get(DEFAULT_MODEL)
    if spec is not None:
        spec = spec.model_copy(update={k: v for k, v in model.items() if v is not None})
        settings.models[DEFAULT_MODEL] = spec
    if no_workers:
        settings = settings.model_copy(update={"run_workers": False})
    creds = ensure_default_credentials(settings)
    _banner(settings.base_url, creds.api_key, creds.api_secret, settings.data_dir)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


def _banner(url: str, key: str, secret: str | None, data_dir: Path) -> None:
    out = click.echo
    out(f"dreamserve on {url}  (data: {data_dir})")
    out(f"  API key:    {key}")
    out(f"  API secret: {secret}")
    out("\nTry it (Wiro's signature: HMAC-SHA256 keyed with the API key over secret+nonce):\n")
    out(f"  KEY={key} SECRET={secret} NONCE=$(date +%s)")
    out('  SIGNATURE=$(echo -n "${SECRET}${NONCE}" | openssl dgst -sha256 -hmac "${KEY}" | sed \'s/^.* //\')')
    out(f'  curl -X POST "{url}/v1/Run/bytedance/seedream-v4" -H "x-api-key: $KEY" -H "x-nonce: $NONCE" \\')
    out('       -H "x-signature: $SIGNATURE" -F "prompt=a red fox in the snow" -F "size=2048x2048" -F "maxImages=1"')
    out("\nOr with the CLI (it reads these credentials from the data folder):\n")
    out('  dreamserve generate "a red fox in the snow" --size 2K -n 2 -o out/\n')


@main.command()
@click.option("--name", default=None, help="Worker name in Celery (default gpu-<host>).")
@click.option("--model", "source", default=None, help="Source of the default model, as for serve.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Scratch space for this worker.")
def worker(name: str | None, source: str | None, data_dir: Path | None) -> None:
    """Run one GPU worker for scale-out mode: consumes gpu.<model> queues from Celery (needs redis_url)."""
    from dreamserve.scale.worker import run_worker
    from dreamserve.settings import DEFAULT_MODEL, Settings

    settings = Settings(dispatch="celery")
    if data_dir is not None:
        settings = settings.model_copy(update={"data_dir": data_dir})
    if source is not None and DEFAULT_MODEL in settings.models:
        settings.models[DEFAULT_MODEL] = settings.models[DEFAULT_MODEL].model_copy(update={"source": source})
    run_worker(settings, name)


@main.group()
def keys() -> None:
    """Manage project API keys."""


@keys.command("create")
@click.option("--name", default="project", help="A label for the project.")
@click.option("--key-only", is_flag=True, help="Accept x-api-key alone (no signature) for this project.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
def keys_create(name: str, key_only: bool, data_dir: Path | None) -> None:
    """Create a project and print its key and secret (the secret is shown only now)."""
    from dreamserve.projects import create_project
    from dreamserve.settings import Settings

    settings = Settings() if data_dir is None else Settings(data_dir=data_dir)
    creds = create_project(settings, name, signature=not key_only)
    click.echo(json.dumps({"project_id": creds.project_id, "api_key": creds.api_key, "api_secret": creds.api_secret}))


@main.command()
@click.argument("prompt")
@click.option("-i", "--image", "images", multiple=True, help="Reference image: a file or an http(s) URL (up to 14).")
@click.option("--size", default=None, help="Preset WxH, 1K, 2K, 4K or WxH (default 2048x2048).")
@click.option("-n", "--max-images", type=int, default=1, show_default=True)
@click.option("--watermark", is_flag=True, help="Add a visible AI-generated mark.")
@click.option("--seed", type=int, default=None)
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("."), show_default=True)
@click.option("--model", default="bytedance/seedream-v4", show_default=True)
@click.option("--server", default=None, help="Server URL (default: env DREAMSERVE_SERVER or the local credentials).")
@click.option("--key", default=None, help="API key (default: env DREAMSERVE_API_KEY or the local credentials).")
@click.option("--secret", default=None, help="API secret (default: env DREAMSERVE_API_SECRET or local credentials).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
@click.option("--json", "as_json", is_flag=True, help="Print the final task object as JSON.")
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
    """Generate images on a server, following progress live, and save them to --out."""
    url, api_key, api_secret = _credentials(server, key, secret, data_dir)
    refs = [i if i.startswith(("http://", "https://")) else Path(i) for i in images]
    try:
        with Client(url, api_key, api_secret) as client:
            run = client.run(
                prompt, model=model, images=refs, size=size, max_images=max_images, watermark=watermark, seed=seed
            )
            _follow(client, run.socketaccesstoken)
            task = client.detail(tasktoken=run.socketaccesstoken)
            if not task.succeeded:
                console.print(
                    f"[red]task {task.id} ended {task.status} (pexit {task.pexit}): {task.data.get('debugerror')}"
                )
                sys.exit(1)
            paths = [client.download(output, out) for output in task.outputs]
    except DreamError as exc:
        console.print(f"[red]{type(exc).__name__}: {exc.message}")
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(task.data, indent=2))
    for path in paths:
        click.echo(str(path))


def _follow(client: Client, token: str) -> None:
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[steps]}"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        bar = progress.add_task("queued", total=None, steps="")
        for event in client.events(token):
            info = event.progress
            if info is not None:
                done, total = int(info.get("stepCurrent", 0)), int(info.get("stepTotal", 0))
                progress.update(
                    bar, description="generating", completed=done, total=total, steps=f"step {done}/{total}"
                )
            elif not event.type.startswith(("task_output", "task_error")):
                progress.update(bar, description=event.type.removeprefix("task_").replace("_", " "))


def _credentials(
    server: str | None, key: str | None, secret: str | None, data_dir: Path | None
) -> tuple[str, str, str | None]:
    folder = data_dir or Path(os.environ.get("DREAMSERVE_DATA_DIR", DEFAULT_DATA_DIR))
    stored: dict[str, Any] = {}
    if (folder / "credentials.json").exists():
        stored = json.loads((folder / "credentials.json").read_text())
    url = server or os.environ.get("DREAMSERVE_SERVER") or stored.get("server") or "http://127.0.0.1:8000"
    api_key = key or os.environ.get("DREAMSERVE_API_KEY") or stored.get("api_key")
    api_secret = secret or os.environ.get("DREAMSERVE_API_SECRET") or stored.get("api_secret")
    if not api_key:
        raise click.UsageError(
            f"No API key: pass --key, set DREAMSERVE_API_KEY, or run `dreamserve serve` in {folder}."
        )
    return url, api_key, api_secret
