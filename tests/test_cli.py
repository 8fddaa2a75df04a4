"""The first ten minutes, as a newcomer lives them: ``serve``'s banner, every command it prints run as printed
from another folder, ``pull`` and ``models`` against a local hub (tests/hub.py), the credentials file.

Commands run as subprocesses with a private ``HOME`` (so the user's config folder is ``$HOME/.config``) and
``HF_ENDPOINT`` pointing at the local hub: nothing leaves this machine.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dreamserve.signing import auth_headers
from dreamserve.weights import human_size
from tests.conftest import free_port
from tests.hub import Hub, Repo, local_hub

KLEIN = "black-forest-labs/FLUX.2-klein-4B"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """The hub, serving a tiny random-weight FLUX.2 [klein] pipeline folder as the flux2-klein-4b preset's repo."""
    from dreamserve.engine.tiny import build_tiny_klein

    folder = tmp_path_factory.mktemp("klein-tiny")
    build_tiny_klein().save_pretrained(folder)
    with local_hub() as hub:
        hub.repos[KLEIN] = Repo.from_folder(folder)
        yield hub


def user_env(home: Path, hub_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DREAMSERVE_", "HF_", "XDG_"))}
    cache = home / ".cache" / "huggingface" / "hub"
    return {**env, "HOME": str(home), "HF_ENDPOINT": hub_url, "HF_HUB_CACHE": str(cache), **extra}


def dreamserve(*args: str, env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "dreamserve", *args]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_pull_and_models_against_a_local_hub(hub: Hub, tmp_path: Path) -> None:
    home, here = tmp_path / "home", tmp_path / "work"
    here.mkdir(parents=True)
    env = user_env(home, hub.url)

    listed = dreamserve("models", env=env, cwd=here)
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith("flux2-klein-4b "))
    assert KLEIN in row and "Apache-2.0" in row and "no: dreamserve pull flux2-klein-4b" in row
    assert re.search(r"^tiny .*built in", listed.stdout, re.MULTILINE)

    pulled = dreamserve("pull", "flux2-klein-4b", env=env, cwd=here)
    assert pulled.returncode == 0, pulled.stderr
    snapshot = Path(pulled.stdout.strip())
    repo = hub.repos[KLEIN]
    assert snapshot == home / ".cache/huggingface/hub/models--black-forest-labs--FLUX.2-klein-4B/snapshots" / repo.sha
    assert {str(p.relative_to(snapshot)): p.read_bytes() for p in snapshot.rglob("*") if p.is_file()} == repo.files
    assert any(r.startswith(f"GET /{KLEIN}/resolve/{repo.sha}/transformer/") for r in hub.requests)
    assert "serve --model flux2-klein-4b" in pulled.stderr

    listed = dreamserve("models", env=env, cwd=here)
    row = next(line for line in listed.stdout.splitlines() if line.startswith("flux2-klein-4b "))
    size = sum(len(data) for data in repo.files.values())
    assert f"yes: {snapshot}" in row and f" {human_size(size)} " in row, row

    # A hub id into a folder of one's own.
    into = tmp_path / "models" / "klein"
    pulled = dreamserve("pull", KLEIN, "--local-dir", str(into), env=env, cwd=here)
    assert pulled.returncode == 0, pulled.stderr
    assert (into / "model_index.json").read_bytes() == repo.files["model_index.json"]
    assert f"serve --model {into}" in pulled.stderr

    missing = dreamserve("pull", "someone/nothing-here", env=env, cwd=here)
    assert missing.returncode == 1 and "has no repository someone/nothing-here" in missing.stderr
    built_in = dreamserve("pull", "tiny", env=env, cwd=here)
    assert built_in.returncode == 1 and "built in code" in built_in.stderr


@pytest.mark.parametrize("offline", ["closed port", "HF_HUB_OFFLINE"])
def test_pull_offline_fails_with_a_clear_message(tmp_path: Path, offline: str) -> None:
    home = tmp_path / "home"
    if offline == "closed port":
        env = user_env(home, f"http://127.0.0.1:{free_port()}")
    else:
        env = user_env(home, "http://127.0.0.1:9", HF_HUB_OFFLINE="1")
    pulled = dreamserve("pull", "sd-turbo", env=env, cwd=tmp_path, timeout=60)
    assert pulled.returncode == 1
    message = " ".join(pulled.stderr.split())
    assert "Cannot reach the Hugging Face hub" in message and "stabilityai/sd-turbo" in message, pulled.stderr
    assert "hf download stabilityai/sd-turbo --local-dir DIR" in message
    assert "Traceback" not in pulled.stderr


class Serve:
    """``dreamserve serve`` run as a user would, its banner read from stdout."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        cwd.mkdir(parents=True, exist_ok=True)
        self.log = cwd / f"serve-{time.monotonic_ns()}.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text()
            if re.search(r"^ready in [\d.]+ s", text, re.MULTILINE):
                return text
            assert self.process.poll() is None, f"serve exited:\n{text}"
            time.sleep(0.05)
        raise AssertionError(f"serve did not print ready in {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def banner_commands(text: str) -> dict[str, str]:
    """The commands of the banner, by what they do: the curl block, and each CLI line."""
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.strip().startswith("KEY="))
    curl = next(i for i in range(first, len(lines)) if lines[i].strip().startswith("curl "))
    last = next(i for i in range(curl, len(lines)) if not lines[i].rstrip().endswith("\\"))
    commands = {"curl": "\n".join(line.strip() for line in lines[first : last + 1])}
    for line in lines:
        for name in ("generate", "pull", "serve --model"):
            if f" -m dreamserve {name} " in line:
                commands[name] = line.strip()
    return commands


def start_shell(command: str, env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    pipe = subprocess.PIPE
    return subprocess.Popen(["bash", "-c", command], env=env, cwd=cwd, stdout=pipe, stderr=pipe, text=True)


def finish_shell(shell: subprocess.Popen[str], timeout: float = 180) -> str:
    """The stdout of a command ``start_shell`` started, which must succeed."""
    try:
        stdout, stderr = shell.communicate(timeout=timeout)
    finally:
        if shell.poll() is None:
            shell.kill()
            shell.wait()
    assert shell.returncode == 0, f"{shell.args}\nstdout: {stdout}\nstderr: {stderr}"
    return stdout


def run_shell(command: str, env: dict[str, str], cwd: Path, timeout: float = 180) -> str:
    return finish_shell(start_shell(command, env, cwd), timeout)


@pytest.mark.timeout(600)  # two server starts, a generation and a download: minutes on a loaded 2-core machine
def test_the_banners_commands_run_as_printed_from_another_folder(hub: Hub, tmp_path: Path) -> None:
    home, data, elsewhere = tmp_path / "home", tmp_path / "srv" / "data", tmp_path / "elsewhere"
    elsewhere.mkdir(parents=True)
    port = free_port()
    env = user_env(home, hub.url, PYTHONUNBUFFERED="1")
    server = Serve(
        [sys.executable, "-m", "dreamserve", "serve", "--data-dir", str(data), "--port", str(port)], env, data.parent
    )
    pulling: subprocess.Popen[str] | None = None
    try:
        banner = server.wait_ready()
        url = f"http://127.0.0.1:{port}"
        assert f"Playground:  {url}/" in banner
        assert httpx.get(f"{url}/", timeout=10).headers["content-type"].startswith("text/html")
        assert "images are noise by design" in banner
        # "ready" comes once the model is loaded, after the loading line, with the load time.
        assert banner.index("Loading bytedance/seedream-v4 (tiny) ...") < banner.index("ready in")
        assert re.search(r"ready in [\d.]+ s \(bytedance/seedream-v4 loaded in [\d.]+ s\)", banner)
        creds_file = home / ".config" / "dreamserve" / "credentials.json"
        assert f"Credentials: {creds_file}" in banner
        assert stat.S_IMODE(creds_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(creds_file.parent.stat().st_mode) == 0o700
        stored = json.loads(creds_file.read_text())
        assert stored["server"] == url and f"API secret:  {stored['api_secret']}  (shown at this first" in banner

        commands = banner_commands(banner)
        assert set(commands) == {"curl", "generate", "pull", "serve --model"}, banner
        answer = json.loads(run_shell(commands["curl"], env, elsewhere))
        assert answer["result"] is True and answer["taskid"], answer
        # `pull` talks to the hub, not the server: it runs while the server cancels and generates.
        pulling = start_shell(commands["pull"], env, elsewhere)
        # Its 2048x2048 task is not waited for: cancelled, so `generate`'s task does not queue behind it.
        headers = auth_headers(stored["api_key"], stored["api_secret"])
        cancel = httpx.post(f"{url}/v1/Task/Cancel", json={"taskid": answer["taskid"]}, headers=headers, timeout=30)
        assert cancel.json()["result"] is True, cancel.text
        run_shell(commands["generate"], env, elsewhere)
        images = sorted((elsewhere / "out").glob("*.png"))
        assert len(images) == 1 and images[0].stat().st_size > 0
        finish_shell(pulling)
    finally:
        if pulling is not None and pulling.poll() is None:  # the test failed before it was waited for
            pulling.kill()
            pulling.wait()
        server.stop()

    # The printed `serve --model flux2-klein-4b`, as a later start of the same project (env names its folder):
    # it finds the pulled weights in the cache, and no longer prints the secret.
    again = Serve(shlex.split(commands["serve --model"]), {**env, "DREAMSERVE_DATA_DIR": str(data)}, elsewhere)
    try:
        banner = again.wait_ready()
    finally:
        again.stop()
    assert "(flux2-klein-4b) ..." in banner and "noise by design" not in banner
    assert stored["api_secret"] not in banner and f"API key:     {stored['api_key']}" in banner
    assert "show it with: " in banner and f"Credentials: {creds_file}" in banner
    show = re.search(r"show it with: (.+)$", banner, re.MULTILINE)
    assert show is not None
    assert stored["api_secret"] in run_shell(show.group(1), env, elsewhere)


def test_generate_reads_the_user_config_file_after_flags_and_env(tmp_path: Path, monkeypatch: Any) -> None:
    from dreamserve.cli.generate import _credentials

    for name in ("DREAMSERVE_API_KEY", "DREAMSERVE_API_SECRET", "DREAMSERVE_SERVER", "DREAMSERVE_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DREAMSERVE_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config").mkdir()
    user = {"api_key": "user-key", "api_secret": "user-secret", "server": "http://user:1", "project_id": 1}
    (tmp_path / "config" / "credentials.json").write_text(json.dumps(user))
    local = {"api_key": "local-key", "api_secret": "local-secret", "server": "http://local:2", "project_id": 2}
    (tmp_path / "dreamserve-data").mkdir()
    (tmp_path / "dreamserve-data" / "credentials.json").write_text(json.dumps(local))
    assert _credentials(None, None, None, None) == ("http://user:1", "user-key", "user-secret")
    # A data folder given explicitly beats the user's file.
    assert _credentials(None, None, None, tmp_path / "dreamserve-data")[1] == "local-key"
    monkeypatch.setenv("DREAMSERVE_API_KEY", "env-key")
    assert _credentials(None, None, None, None) == ("http://user:1", "env-key", None)
    (tmp_path / "config" / "credentials.json").unlink()
    monkeypatch.delenv("DREAMSERVE_API_KEY")
    assert _credentials(None, None, None, None)[1] == "local-key"  # ./dreamserve-data, as before


def test_scripts_install_skips_pip_when_nothing_changed(tmp_path: Path) -> None:
    """scripts/install on a copy of the repository whose .venv has stand-ins for python and pip that log calls."""
    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "scripts").mkdir()
    (tmp_path / "src" / "dreamserve").mkdir(parents=True)
    for name in ("scripts/install", "pyproject.toml", "src/dreamserve/__init__.py"):
        (tmp_path / name).write_bytes((repo / name).read_bytes())
    (tmp_path / "scripts" / "install").chmod(0o755)
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    log, installed = tmp_path / "pip.log", tmp_path / ".venv" / "installed"
    # python: torch imports; the installed version is what the last pip install recorded.
    (bin_dir / "python").write_text(f'#!/bin/sh\ncase "$*" in *importlib*) cat {installed} ;; esac\n')
    version = re.search(r'"(.+)"', (repo / "src/dreamserve/__init__.py").read_text())
    assert version is not None
    (bin_dir / "pip").write_text(f'#!/bin/sh\necho "$*" >> {log}\necho {version.group(1)} > {installed}\n')
    for tool in ("python", "pip"):
        (bin_dir / tool).chmod(0o755)

    def install() -> list[str]:
        subprocess.run(["scripts/install", "all"], cwd=tmp_path, check=True, timeout=60)
        return log.read_text().splitlines() if log.exists() else []

    assert install() == ["install --quiet -e .[all]"]
    assert len(install()) == 1, "nothing changed: no pip"
    with (tmp_path / "pyproject.toml").open("a") as handle:
        handle.write("\n# a new dependency\n")
    assert len(install()) == 2, "pyproject.toml changed: pip again"
    assert len(install()) == 2
    installed.write_text("0.0.1\n")  # another version installed over it (pip install dreamserve==...)
    assert len(install()) == 3


def test_keys_show_prints_the_saved_credentials(tmp_path: Path, monkeypatch: Any) -> None:
    from click.testing import CliRunner

    from dreamserve.cli import main

    monkeypatch.setenv("DREAMSERVE_CONFIG_DIR", str(tmp_path / "config"))
    runner = CliRunner()
    missing = runner.invoke(main, ["keys", "show"])
    assert missing.exit_code == 2 and "start `dreamserve serve` once" in missing.output
    (tmp_path / "config").mkdir()
    saved = {"api_key": "k" * 32, "api_secret": "s" * 32, "server": "http://h:1", "webhook_secret": "w"}
    (tmp_path / "config" / "credentials.json").write_text(json.dumps(saved))
    assert runner.invoke(main, ["keys", "show", "--key"]).output == "k" * 32 + "\n"
    assert runner.invoke(main, ["keys", "show", "--secret"]).output == "s" * 32 + "\n"
    shown = runner.invoke(main, ["keys", "show"]).output
    assert "http://h:1" in shown and "s" * 32 in shown and str(tmp_path / "config" / "credentials.json") in shown
