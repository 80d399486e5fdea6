"""Small HTTP servers on 127.0.0.1 that misbehave on purpose, for the media and security tests.

Every behaviour is bounded: endless bodies and trickles stop when the client goes away or after
`MAX_SERVE_S`, so a test that fails never leaves a thread spinning.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image

from tests.helpers import BackgroundServer

MAX_SERVE_S = 20.0
CHUNK = b"\0" * 65536


def png_bomb(width: int = 65535, height: int = 65535) -> bytes:
    """A valid 1x1 PNG whose header claims width x height pixels: tiny file, huge decode."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    return bytes(data)


SVG = (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
       b'<rect width="10" height="10" fill="red"/></svg>')


class HostileServer:
    """Serves one behaviour per path; counts requests per path (`hits`)."""

    def __init__(self, good_image: Path):
        self.good = good_image.read_bytes()
        self.hits: dict[str, int] = {}
        self.authorization: dict[str, str | None] = {}  # request target → its Authorization header
        self.redirect_to: dict[str, str] = {}
        self._lock = threading.Lock()

    def start(self) -> "HostileServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                with server._lock:
                    server.hits[path] = server.hits.get(path, 0) + 1
                    server.authorization[self.path] = self.headers.get("Authorization")
                try:
                    server._serve(self, path)
                except (BrokenPipeError, ConnectionResetError, OSError):
                    pass

        self._background = BackgroundServer(_threading_server(Handler))
        self.port, self.url = self._background.port, self._background.url
        return self

    def stop(self) -> None:
        self._background.stop()

    def total_hits(self) -> int:
        with self._lock:
            return sum(self.hits.values())

    def _serve(self, handler: BaseHTTPRequestHandler, path: str) -> None:
        bodies = {
            "/ok.jpg": self.good,
            "/truncated.jpg": self.good[: len(self.good) // 3],
            "/empty.jpg": b"",
            "/text.jpg": b"this is not an image, just some text\n" * 20,
            "/image.svg": SVG,
            "/bomb.png": png_bomb(),
        }
        if path in bodies:
            return _send(handler, 200, bodies[path])
        if path in self.redirect_to:
            return _send(handler, 302, b"", {"Location": self.redirect_to[path]})
        if path == "/loop":
            return _send(handler, 302, b"", {"Location": "/loop"})
        if path == "/error":
            return _send(handler, 500, b"internal error")
        if path == "/huge-declared":
            return _send_headers(handler, 200, {"Content-Length": str(10 ** 12)})
        if path == "/endless":
            return self._endless(handler)
        if path == "/trickle":
            return self._trickle_body(handler)
        if path == "/trickle-headers":
            return self._trickle_headers(handler)
        if path == "/endless-redirect":
            _send_headers(handler, 302, {"Location": "/ok.jpg", "Transfer-Encoding": "chunked"})
            return self._chunks(handler)
        return _send(handler, 404, b"not found")

    def _endless(self, handler) -> None:
        _send_headers(handler, 200, {"Transfer-Encoding": "chunked"})
        self._chunks(handler)

    def _chunks(self, handler) -> None:
        deadline = time.monotonic() + MAX_SERVE_S
        while time.monotonic() < deadline:
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK))

    def _trickle_body(self, handler) -> None:
        _send_headers(handler, 200, {"Content-Length": str(len(self.good))})
        deadline = time.monotonic() + MAX_SERVE_S
        for byte in self.good:
            if time.monotonic() > deadline:
                return
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            time.sleep(0.1)

    def _trickle_headers(self, handler) -> None:
        deadline = time.monotonic() + MAX_SERVE_S
        handler.wfile.write(b"HTTP/1.1 200 OK\r\n")
        while time.monotonic() < deadline:
            handler.wfile.write(b"X-Slow: a\r\n")
            handler.wfile.flush()
            time.sleep(0.1)


def _send_headers(handler, status: int, headers: dict) -> None:
    handler.send_response(status)
    for name, value in headers.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.flush()


def _send(handler, status: int, body: bytes, headers: dict | None = None) -> None:
    _send_headers(handler, status, {"Content-Length": str(len(body)), **(headers or {})})
    handler.wfile.write(body)


class ErrorServer:
    """Answers every request with the same status and body (a Label Studio that is broken or refuses us)."""

    def __init__(self, status: int, body: bytes = b'{"detail": "error"}', content_type: str = "application/json"):
        self.status, self.body, self.content_type = status, body, content_type
        self.requests = 0

    def start(self) -> "ErrorServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self):
                server.requests += 1
                self.send_response(server.status)
                self.send_header("Content-Type", server.content_type)
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                self.wfile.write(server.body)

            do_GET = do_POST = do_PATCH = _answer

        self._background = BackgroundServer(_threading_server(Handler))
        self.url = self._background.url
        return self

    def stop(self) -> None:
        self._background.stop()


def _threading_server(handler) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    return server


class SlowServer:
    """Serves a good image at every path after `delay_s`, a slow media host: the same picture with the path
    appended after its end, so each path is different content. Counts requests per path (`hits`) and the
    most requests it held at once (`peak_concurrent`). `/fast/...` paths answer at once."""

    def __init__(self, good_image: Path, delay_s: float):
        self.good = good_image.read_bytes()
        self.delay_s = delay_s
        self.hits: dict[str, int] = {}
        self.concurrent = 0
        self.peak_concurrent = 0
        self._lock = threading.Lock()

    def start(self) -> "SlowServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                with server._lock:
                    server.hits[self.path] = server.hits.get(self.path, 0) + 1
                    server.concurrent += 1
                    server.peak_concurrent = max(server.peak_concurrent, server.concurrent)
                try:
                    if not self.path.startswith("/fast/"):
                        time.sleep(min(server.delay_s, MAX_SERVE_S))
                    _send(self, 200, server.good + self.path.encode())
                except (BrokenPipeError, ConnectionResetError, OSError):
                    pass
                finally:
                    with server._lock:
                        server.concurrent -= 1

        self._background = BackgroundServer(_threading_server(Handler))
        self.url = self._background.url
        return self

    def stop(self) -> None:
        self._background.stop()

    def total_hits(self) -> int:
        with self._lock:
            return sum(self.hits.values())
