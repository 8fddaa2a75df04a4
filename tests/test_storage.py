"""Issue 30 item 3: what a project stores is bounded (bytes and files, counted as each upload is stored), uploads
and folders can be deleted with Wiro's File routes (rows, bytes and URLs at once), and /metrics shows the bytes
each project stores."""

from __future__ import annotations

from typing import Any

from tests.conftest import png_bytes


def _upload(app: Any, folder: str | None = None, side: int = 64) -> dict[str, Any]:
    data = {"folderid": folder} if folder else {}
    body: dict[str, Any] = app.post(
        "/v1/File/Upload", files={"file": ("a.png", png_bytes(side, side))}, data=data
    ).json()
    return body


def _stored(app: Any) -> tuple[float, float]:
    text = app.client.get("/metrics").text
    pick = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if 'project="1"' in line}
    return pick.get('dreamserve_project_stored_bytes{project="1"}', 0.0), pick.get(
        'dreamserve_project_stored_files{project="1"}', 0.0
    )


def test_storage_quota_and_the_file_and_folder_delete_routes(make_app: Any) -> None:
    app = make_app(model={"workers": 0}, max_project_files=3)
    uploads = app.settings.blob_dir / "uploads"
    folder = app.post("/v1/File/FolderCreate", json={"name": "refs"}).json()["list"][0]["id"]
    sub = app.post("/v1/File/FolderCreate", json={"name": "deeper", "parentid": folder}).json()["list"][0]["id"]
    items = [_upload(app, folder)["list"][0], _upload(app, sub)["list"][0], _upload(app)["list"][0]]
    size = sum(int(item["size"]) for item in items)
    assert _stored(app) == (size, 3)

    # Full at 3 files: a clear error in Wiro's envelope, and the refused bytes are not left on disk.
    refused = _upload(app)
    assert refused["result"] is False and refused["errors"][0]["type"] == "storage_full", refused
    assert "max_project_files" in refused["errors"][0]["message"]
    assert len([p for p in uploads.rglob("*") if p.is_file()]) == 3

    # File/Delete: the upload's row, bytes and URL go at once; an unknown id is Wiro's not-found (code 1).
    assert app.post("/v1/File/Delete", json={"fileid": items[2]["id"]}).json() == {"result": True, "errors": []}
    assert app.client.get(items[2]["url"]).status_code == 404
    again = app.post("/v1/File/Delete", json={"fileid": items[2]["id"]}).json()
    assert again["result"] is False and again["errors"][0]["code"] == 1
    assert _stored(app) == (size - int(items[2]["size"]), 2)
    assert _upload(app)["result"] is True, "room again after the delete"

    # File/FolderDelete: the folder, the one under it and the uploads in both.
    assert app.client.get(items[1]["url"]).status_code == 200
    answer = app.post("/v1/File/FolderDelete", json={"folderid": folder}).json()
    assert answer == {"result": True, "errors": []}
    assert [app.client.get(item["url"]).status_code for item in items[:2]] == [404, 404]
    assert len([p for p in uploads.rglob("*") if p.is_file()]) == 1
    assert _upload(app, sub)["errors"][0]["code"] == 1, "the subfolder went with its parent"
    missing = app.post("/v1/File/FolderDelete", json={"folderid": folder}).json()
    assert missing["result"] is False and missing["errors"][0]["code"] == 1


def test_storage_quota_in_bytes(make_app: Any) -> None:
    app = make_app(model={"workers": 0}, max_project_bytes=len(png_bytes(64, 64)) + 10)
    assert _upload(app)["result"] is True
    refused = _upload(app)
    assert refused["errors"][0]["type"] == "storage_full" and "max_project_bytes" in refused["errors"][0]["message"]
