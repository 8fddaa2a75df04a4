"""Uploads: byte limits per file and per request (enforced while the body streams in), pixel limits that stop
decompression bombs before any decoding, and every common image mode turned into a usable upright RGB reference."""

from __future__ import annotations

import base64
import io
import socket
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from PIL import Image

from dreamserve.engine.runner import load_reference
from dreamserve.errors import InvalidRequest
from dreamserve.images import check_image
from tests.conftest import MODEL, LiveServer, png_bytes

LIMIT_BYTES = 30 * 1024 * 1024
LIMIT_PIXELS = 36_000_000
RED, BLUE = (220, 20, 20), (20, 20, 220)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = 20_000, rows: int | None = None) -> bytes:
    """A 1-bit PNG of side x side pixels that compresses to tens of kilobytes (50 MB of rows at 20000);
    ``rows`` < ``side`` makes a header-only bomb (the pixel data stops early)."""
    row = b"\x00" * (1 + (side + 7) // 8)
    rows = side if rows is None else rows
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row * 1000) for _ in range(rows // 1000))
    body += compressor.compress(row * (rows % 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def halves(width: int, height: int) -> Image.Image:
    """Left half red, right half blue (as stored)."""
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(RED, (0, 0, width // 2, height))
    return image


def rotated_jpeg(width: int = 160, height: int = 80) -> bytes:
    """Stored landscape with EXIF orientation 6: displayed turned 90 degrees clockwise, so the red half on top."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(halves(width, height), "JPEG", exif=exif.tobytes(), quality=95)


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (96, 96), RED), Image.new("RGB", (96, 96), BLUE)]
    return encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def cmyk_jpeg() -> bytes:
    return encoded(Image.new("RGB", (96, 96), RED).convert("CMYK"), "JPEG", quality=95)


def png16() -> bytes:
    """16-bit grayscale at half intensity (32768 of 65535)."""
    return encoded(Image.new("I;16", (96, 96), 32768), "PNG")


def palette_alpha_png() -> bytes:
    """Palette PNG whose every pixel is the transparent index (black in the palette)."""
    image = Image.new("P", (96, 96), 0)
    image.putpalette([0, 0, 0, 255, 0, 0])
    return encoded(image, "PNG", transparency=0)


def rgba_png() -> bytes:
    return encoded(Image.new("RGBA", (96, 96), (0, 0, 0, 0)), "PNG")


KINDS = {
    "rotated.jpg": rotated_jpeg,
    "animated.gif": lambda: animated("GIF"),
    "animated.webp": lambda: animated("WEBP"),
    "cmyk.jpg": cmyk_jpeg,
    "sixteen.png": png16,
    "palette.png": palette_alpha_png,
    "rgba.png": rgba_png,
}


# -- checks on the bytes (no server) ---------------------------------------------------------------------------


@pytest.mark.parametrize("side", [20_000, 100_000])
def test_decompression_bomb_is_refused_without_decoding(side: int) -> None:
    data = bomb_png(side, rows=min(side, 2_000))
    assert len(data) < 200_000
    started = time.perf_counter()
    with pytest.raises(InvalidRequest, match="pixels; the limit is 36,000,000"):
        check_image(data, "1", LIMIT_BYTES, LIMIT_PIXELS)
    assert time.perf_counter() - started < 0.5


def test_size_and_content_checks() -> None:
    with pytest.raises(InvalidRequest, match="is 2,000 bytes; the limit is 1,000"):
        check_image(b"x" * 2000, "1", 1000, LIMIT_PIXELS)
    assert check_image(png_bytes(), "1", LIMIT_BYTES, LIMIT_PIXELS) == ("png", 96, 64)
    with pytest.raises(InvalidRequest, match="not an image"):
        check_image(png_bytes()[:60], "1", LIMIT_BYTES, LIMIT_PIXELS)
    # A label with braces (it holds the file's name) is quoted, never formatted.
    with pytest.raises(InvalidRequest, match="pixels"):
        check_image(bomb_png(), "1 ('{0}{x}.png')", LIMIT_BYTES, LIMIT_PIXELS)


def test_exif_orientation_gives_upright_sizes_and_pixels(tmp_path: Path) -> None:
    data = rotated_jpeg(160, 80)
    assert check_image(data, "1", LIMIT_BYTES, LIMIT_PIXELS) == ("jpg", 80, 160), "sizes as displayed"
    path = tmp_path / "rotated.jpg"
    path.write_bytes(data)
    image = load_reference(str(path), 1)
    assert image.size == (80, 160)
    top, bottom = image.getpixel((40, 10)), image.getpixel((40, 150))
    assert top[0] > 150 and top[2] < 100, f"red on top once turned upright, got {top}"
    assert bottom[2] > 150 and bottom[0] < 100, bottom


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("animated.gif", RED),  # the first frame
        ("animated.webp", RED),
        ("cmyk.jpg", RED),
        ("sixteen.png", (128, 128, 128)),  # scaled, not clipped to white
        ("palette.png", (255, 255, 255)),  # transparent composited on white, not black
        ("rgba.png", (255, 255, 255)),
    ],
)
def test_image_modes_become_rgb_references(tmp_path: Path, name: str, expected: tuple[int, int, int]) -> None:
    data = KINDS[name]()
    ext, width, height = check_image(data, name, LIMIT_BYTES, LIMIT_PIXELS)
    assert (width, height) == (96, 96) and name.endswith(ext)
    path = tmp_path / name
    path.write_bytes(data)
    image = load_reference(str(path), 1)
    assert image.mode == "RGB" and image.size == (96, 96)
    pixel = image.getpixel((48, 48))
    assert all(abs(a - b) <= 24 for a, b in zip(pixel, expected, strict=True)), (name, pixel)


# -- through a server ------------------------------------------------------------------------------------------


def _raw(server: Any, head: str, body_chunks: list[bytes], pause: float = 0.0) -> tuple[bytes, float]:
    """Send a request by hand; returns (the answer, seconds until it came)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.settings.port), timeout=10) as sock:
        sock.sendall(head.encode())
        for chunk in body_chunks:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(pause)
        answer = b""
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
                if b"\r\n\r\n" in answer and answer.rstrip().endswith(b"}"):
                    break
        except (ConnectionResetError, TimeoutError):
            pass
    return answer, time.monotonic() - started


def _head(server: Any, extra: str) -> str:
    headers = "".join(f"{k}: {v}\r\n" for k, v in server.headers().items())
    return f"POST /v1/Run/{MODEL} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}{extra}\r\n"


def test_request_limits_are_enforced_before_and_while_reading(make_live: Any) -> None:
    server = make_live(model={"workers": 0}, max_upload_bytes=100_000, max_request_bytes=300_000, min_pixels=64 * 64)
    rss = psutil.Process(server.pid).memory_info().rss

    # A declared body over the limit is refused at once: nothing of it was sent, so none was read.
    answer, seconds = _raw(
        server, _head(server, "content-type: application/json\r\ncontent-length: 1000000000\r\n"), []
    )
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"result":false' in answer and b"larger than 300,000 bytes" in answer
    assert seconds < 2

    # No Content-Length (chunked): counted as it streams, refused once past the limit.
    chunk = b"a" * 50_000
    chunks = [b"%x\r\n" % len(chunk) + chunk + b"\r\n" for _ in range(7)]  # 350,000 bytes
    answer, _ = _raw(
        server, _head(server, "content-type: application/json\r\ntransfer-encoding: chunked\r\n"), chunks, 0.05
    )
    assert answer.startswith(b"HTTP/1.1 413") and b"larger than 300,000 bytes" in answer, answer[:300]

    # Under the request limit, a file over the per-file limit gets the per-file message.
    noise = Image.frombytes("RGB", (200, 200), bytes(range(256)) * 468 + bytes(range(192)))
    big = encoded(noise, "PNG", compress_level=0)
    assert 100_000 < len(big) < 300_000
    body = server.run(data={"prompt": "x"}, files=[("inputImage", ("big.png", big, "image/png"))])
    assert body["result"] is False and "the limit is 100,000" in body["errors"][0]["message"]

    # The same through httpx with several files: over the request limit, refused with the envelope.
    files = [("inputImage", (f"f{i}.png", big[:90_000], "image/png")) for i in range(4)]
    response = server.post(f"/v1/Run/{MODEL}", data={"prompt": "x"}, files=files)
    assert response.status_code == 413 and "larger than 300,000" in response.json()["errors"][0]["message"]

    # A decompression bomb is refused quickly, by Run and by File/Upload, and costs the server no memory.
    bomb = bomb_png()
    for path, field in ((f"/v1/Run/{MODEL}", "inputImage"), ("/v1/File/Upload", "file")):
        started = time.monotonic()
        response = server.post(path, data={"prompt": "x"}, files=[(field, ("bomb.png", bomb, "image/png"))])
        assert time.monotonic() - started < 2
        assert response.json()["result"] is False
        assert "400,000,000 pixels; the limit is 36,000,000" in response.json()["errors"][0]["message"]
    assert psutil.Process(server.pid).memory_info().rss < rss + 100 * 1024 * 1024

    # Formats are told by content: a PNG named .jpg is stored as PNG; nothing above stored a task.
    response = server.post("/v1/File/Upload", files=[("file", ("photo.jpg", png_bytes(), "image/jpeg"))]).json()
    assert response["result"] is True and response["list"][0]["name"] == "photo.png"
    assert server.post("/v1/Task/List", json={}).json()["total"] == "0"
    # The server is still healthy after the refused streams.
    assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200


def test_every_image_mode_produces_an_image(tiny_server: LiveServer) -> None:
    """Rotated JPEG first: with size 1K the output takes its upright (portrait) aspect."""
    server = tiny_server
    files = [("inputImage", (name, make(), "application/octet-stream")) for name, make in KINDS.items()]
    files[0] = ("inputImage", ("rotated.jpg", rotated_jpeg(1200, 600), "image/jpeg"))
    run = server.run(data={"prompt": "all kinds", "size": "1K"}, files=files)
    assert run["result"] is True, run
    task = server.wait(run["taskid"])
    assert task["pexit"] == "0", task["debugerror"]
    image = Image.open(io.BytesIO(server.http.get(task["outputs"][0]["url"]).content))
    assert image.size == (720, 1280), "9:16, the 1K preset nearest the upright 1:2 reference"


def test_own_file_references_are_linked_and_uploads_checked_within_the_budget(make_app: Any) -> None:
    """An own-file reference is stored as a link to the upload (no bytes read); while the process's reference
    budget is spent, uploaded references are refused with 429 in each API's shape, and own files still pass."""
    server = make_app(model={"workers": 0, "max_pixels": 64 * 64}, min_pixels=64 * 64, reference_budget_bytes=2**20)
    uploaded = server.post("/v1/File/Upload", files={"file": ("mine.png", png_bytes(80, 80), "image/png")}).json()
    own = uploaded["list"][0]["url"]
    budget = server.client.app.state.services.reference_budget
    png = png_bytes(80, 80)
    bearer = {"Authorization": f"Bearer {server.creds.api_key}:{server.creds.api_secret}"}
    with budget.claim(budget.limit):
        wiro = server.post(
            f"/v1/Run/{MODEL}", data={"prompt": "p", "size": "64x64"}, files={"inputImage": ("a.png", png, "image/png")}
        )
        assert wiro.status_code == 429 and wiro.headers["retry-after"] == "2"
        assert wiro.json()["errors"][0]["code"] == 96 and "busy" in wiro.json()["errors"][0]["message"]
        data_uri = "data:image/png;base64," + base64.b64encode(png).decode()
        ark = server.http.post(
            "/api/v3/images/generations",
            headers=bearer,
            json={"model": "seedream-4-0-250828", "prompt": "p", "image": data_uri, "size": "64x64"},
        )
        assert ark.status_code == 429 and ark.json()["error"]["code"] == "RateLimitExceeded"
        openai_edit = server.http.post(
            "/v1/images/edits", headers=bearer, data={"prompt": "p"}, files={"image": ("a.png", png, "image/png")}
        )
        assert openai_edit.status_code == 429 and "busy" in openai_edit.json()["error"]["message"]
        # This server's own files cost nothing: they were checked when uploaded and are linked, not read.
        run = server.run({"prompt": "from my upload", "size": "64x64", "inputImage": own})
    assert budget.in_flight == 0
    assert server.run({"prompt": "p", "size": "64x64"}, files={"inputImage": ("a.png", png, "image/png")})["taskid"]
    stored = server.settings.blob_dir
    (upload_blob,) = (stored / "uploads").rglob("*.png")
    linked = [p for p in (stored / "inputs").rglob("inputImage-0.png") if p.samefile(upload_blob)]
    assert len(linked) == 1 and upload_blob.stat().st_nlink == 2, run
