"""Images named in requests: data URIs, files under the image root, remote URLs only when allowed and then within
size and time limits, from public addresses only unless the server allows private ones (fetched from a real HTTP
server on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import fixture_path
from PIL import Image

import llava_lite.serve.remote as remote_module
from llava_lite.serve.errors import ApiError
from llava_lite.serve.images import ImageLimits, load_request_image
from llava_lite.serve.remote import is_public


def _png(size=(12, 10), colour=(0, 0, 255)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _webp() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 6), (5, 5, 5)).save(buffer, format="WEBP")
    return buffer.getvalue()


def load(url: str, **limits) -> Image.Image:
    settings = {"max_bytes": 1_000_000, "max_pixels": 1_000_000, **limits}
    return asyncio.run(load_request_image(url, ImageLimits(**settings), "messages[0].content[0].image_url"))


def refused(url: str, **limits) -> ApiError:
    with pytest.raises(ApiError) as error:
        load(url, **limits)
    assert error.value.param == "messages[0].content[0].image_url"
    return error.value


class _Images(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        if self.path == "/ok.png":
            self._send(_png(), length=True)
        elif self.path == "/declared-big.png":
            self.send_response(200)
            self.send_header("Content-Length", "5000000")
            self.end_headers()
        elif self.path == "/undeclared-big.png":
            self._send(_png() + b"\0" * 300_000, length=False)
        elif self.path == "/text.png":
            self._send(b"just some text, no picture", length=True)
        elif self.path == "/truncated.png":
            self._send(_png((64, 64))[:60], length=True)
        elif self.path == "/to-loopback.png":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.2:{self.server.server_address[1]}/ok.png")
            self.end_headers()
        elif self.path == "/slow.png":
            time.sleep(1.5)  # longer than the client's limit, and bounded
            self._send(_png(), length=True)
        else:
            self.send_error(404)

    def _send(self, data: bytes, length: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if length:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client stopped at its limit
            self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def remote():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_data_uris_of_png_jpeg_and_webp_are_read_as_rgb():
    jpeg = fixture_path("images", "waterview.jpg").read_bytes()
    for media_type, data in (("image/png", _png()), ("image/jpeg", jpeg), ("image/webp", _webp())):
        image = load(f"data:{media_type};base64,{base64.b64encode(data).decode()}")
        assert image.mode == "RGB"
    assert load(f"data:image/png;base64,{base64.b64encode(_png()).decode()}").size == (12, 10)


def test_a_data_uri_must_be_base64_and_an_allowed_type():
    assert refused("data:image/png,rawbytes").code == "invalid_image_url"
    assert refused("data:image/bmp;base64,Qk0=").code == "invalid_image"
    assert refused("data:image/png;base64,@@@").code == "invalid_base64"


def test_a_truncated_image_is_refused():
    jpeg = fixture_path("images", "waterview.jpg").read_bytes()[:5000]
    error = refused(f"data:image/jpeg;base64,{base64.b64encode(jpeg).decode()}")
    assert (error.status, error.code) == (400, "invalid_image")


def test_pixel_limit_is_checked_before_decoding():
    error = refused(f"data:image/png;base64,{base64.b64encode(_png((300, 300))).decode()}", max_pixels=300 * 299)
    assert (error.status, error.code) == (413, "image_too_large")


def test_local_files_need_an_image_root_and_stay_inside_it(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "in.png").write_bytes(_png())
    (tmp_path / "out.png").write_bytes(_png())
    (root / "link.png").symlink_to(tmp_path / "out.png")
    assert load("in.png", root=root).size == (12, 10)
    assert load(f"file://{root / 'in.png'}", root=root).size == (12, 10)
    assert refused("in.png").code == "local_images_disabled"
    for outside in ("../out.png", str(tmp_path / "out.png"), "link.png"):
        assert refused(outside, root=root).code == "image_outside_root"
    assert refused("missing.png", root=root).code == "image_not_found"
    assert refused("in.png", root=root, max_bytes=10).status == 413


def test_remote_urls_are_refused_unless_allowed(remote):
    assert refused(f"{remote}/ok.png").code == "remote_images_disabled"
    assert load(f"{remote}/ok.png", allow_remote=True, allow_private_hosts=True).size == (12, 10)


def test_every_remote_failure_gets_the_same_answer_and_the_log_the_reason(remote, caplog):
    """A client cannot tell a closed port from a slow host, a 404, an oversized body or a file that is no image: the
    error says the same each time (no port scanning through error texts); the server's log says why."""
    allowed = {"allow_remote": True, "allow_private_hosts": True, "max_bytes": 100_000, "remote_timeout": 0.3}
    closed = f"http://127.0.0.1:{_closed_port()}/x.png"
    reasons = {
        f"{remote}/declared-big.png": "declares 5000000 bytes",
        f"{remote}/undeclared-big.png": "sent more than 100000 bytes",
        f"{remote}/slow.png": "took longer than 0.3 s",
        f"{remote}/missing.png": "answered HTTP 404",
        f"{remote}/text.png": "not a PNG, JPEG or WebP",
        f"{remote}/truncated.png": "truncated or corrupt",
        closed: "ConnectError",
        "http://[::1/x.png": "InvalidURL",  # a host that does not parse
    }
    answers = set()
    for url, reason in reasons.items():
        caplog.clear()
        error = refused(url, **allowed)
        answers.add((error.status, error.code, error.message))
        assert reason in caplog.text, url
    assert answers == {(400, "image_fetch_failed", "the image URL could not be fetched as an image")}
    assert refused("ftp://127.0.0.1/x.png", allow_remote=True).code == "invalid_image_url"
    assert refused("file://[::1/x.png", root=Path("/")).code == "invalid_image_url"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "localhost", "[::1]", "[::ffff:127.0.0.1]", "169.254.169.254", "10.1.2.3", "192.168.0.1"]
)
def test_remote_images_never_reach_loopback_private_or_link_local_addresses(remote, host, caplog):
    port = remote.rsplit(":", 1)[1]
    error = refused(f"http://{host}:{port}/ok.png", allow_remote=True)
    assert (error.status, error.code) == (400, "image_fetch_failed")
    assert "not public" in caplog.text


def test_the_address_is_checked_at_every_connection_redirects_included(remote, monkeypatch, caplog):
    """127.0.0.1 counted as public for this test: its redirect to another loopback address is refused when that
    connection is made, after the name is resolved."""
    monkeypatch.setattr(remote_module, "is_public", lambda address: address == "127.0.0.1")
    assert load(f"{remote}/ok.png", allow_remote=True).size == (12, 10)
    error = refused(f"{remote}/to-loopback.png", allow_remote=True)
    assert error.code == "image_fetch_failed"
    assert "resolves to 127.0.0.2, not public" in caplog.text


def test_public_addresses_are_told_from_the_others():
    for address in ("93.184.215.14", "8.8.8.8", "2606:4700:4700::1111"):
        assert is_public(address), address
    private = ["127.0.0.1", "::1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "fe80::1", "fc00::1"]
    others = ["100.64.0.1", "0.0.0.0", "::", "224.0.0.1", "::ffff:10.0.0.1", "255.255.255.255"]
    for address in private + others:
        assert not is_public(address), address
