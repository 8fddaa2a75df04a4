"""A local HTTP server speaking the Hugging Face hub's download routes, for ``dreamserve pull`` without network.

``huggingface_hub.snapshot_download`` asks, under ``HF_ENDPOINT``:

    GET  /api/models/{repo}/revision/{rev}         the commit sha (``HfApi.repo_info``)
    GET  /api/models/{repo}/tree/{sha}?recursive   the file list (``HfApi.list_repo_tree``)
    HEAD /{repo}/resolve/{sha}/{path}              X-Repo-Commit, ETag, Content-Length (``get_hf_file_metadata``)
    GET  /{repo}/resolve/{sha}/{path}              the bytes

An unknown repository answers 404 with ``X-Error-Code: RepoNotFound``, as the hub does.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    files: dict[str, bytes]
    sha: str = ""

    def __post_init__(self) -> None:
        digest = hashlib.sha1()
        for path in sorted(self.files):
            digest.update(path.encode() + hashlib.sha256(self.files[path]).digest())
        self.sha = digest.hexdigest()

    @classmethod
    def from_folder(cls, folder: Path) -> Repo:
        return cls({str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()})


@dataclass
class Hub:
    url: str
    repos: dict[str, Repo] = field(default_factory=dict)
    #: Paths asked for, to see that the files really came from here.
    requests: list[str] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    server: _HubServer

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    def _answer(self, head: bool) -> None:
        state = self.server.hub
        path = unquote(urlsplit(self.path).path)
        state.requests.append(f"{self.command} {path}")
        for name, repo in state.repos.items():
            for prefix, route in ((f"/api/models/{name}/", self._api), (f"/{name}/resolve/", self._file)):
                if path.startswith(prefix):
                    route(repo, name, path[len(prefix) :], head)
                    return
        self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, head)

    def _api(self, repo: Repo, name: str, rest: str, head: bool) -> None:
        kind, _, _ = rest.partition("/")
        body: Any
        if kind == "revision":
            body = {"id": name, "sha": repo.sha, "siblings": [{"rfilename": f} for f in sorted(repo.files)]}
        elif kind == "tree":
            body = [
                {"type": "file", "path": f, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                for f, data in sorted(repo.files.items())
            ]
        else:
            self._send(404, b"{}", {}, head)
            return
        self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)

    def _file(self, repo: Repo, name: str, rest: str, head: bool) -> None:
        _, _, filename = rest.partition("/")
        data = repo.files.get(filename)
        if data is None:
            self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
            return
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        self._send(200, data, {"X-Repo-Commit": repo.sha, "ETag": etag}, head)

    def _send(self, status: int, body: bytes, headers: dict[str, str], head: bool) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class _HubServer(ThreadingHTTPServer):
    def __init__(self, hub: Hub) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub = hub


@contextmanager
def local_hub() -> Iterator[Hub]:
    state = Hub(url="")
    httpd = _HubServer(state)
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
