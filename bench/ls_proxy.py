"""A counting reverse proxy in front of Label Studio, so the `loop` benchmark knows every API request
headstart makes (and which process made it) without touching headstart.

headstart's LABEL_STUDIO_URL points here; each process kind (backend, worker) gets a port of its own,
so every request is tagged with who sent it. Requests are forwarded one connection each (loopback,
~1 ms of Python per request) and recorded with their wall-clock time, method, path, status and answer size.
Label Studio's webhooks and its calls to the ML backend do not pass through here.
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

TIMEOUT_S = 300.0
# hop-by-hop headers (RFC 9110 §7.6.1) and the ones this proxy sets itself
DROPPED_HEADERS = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                   "transfer-encoding", "upgrade", "content-length", "host"}


@dataclass(frozen=True)
class ProxiedRequest:
    at: float       # time.time() when the request arrived
    tag: str        # which listening port (process kind) it came through
    method: str
    path: str       # with the query string
    status: int     # Label Studio's answer, 502 when it could not be reached
    seconds: float
    bytes: int      # the answer's body


class CountingProxy:
    """Forwards to `upstream` (Label Studio's base URL) from one loopback port per tag."""

    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self._records: list[ProxiedRequest] = []
        self._lock = threading.Lock()
        self._servers: list[tuple[ThreadingHTTPServer, threading.Thread]] = []

    def listen(self, tag: str) -> str:
        """Open a port whose requests are recorded under `tag`; returns its base URL."""
        proxy = self

        class Handler(_ForwardingHandler):
            def record(self, request: ProxiedRequest) -> None:
                with proxy._lock:
                    proxy._records.append(request)

        Handler.tag = tag
        Handler.upstream = (self.upstream_host, self.upstream_port)
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, name=f"ls-proxy-{tag}", daemon=True)
        thread.start()
        self._servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_port}"

    def requests(self, *, tag: str | None = None) -> list[ProxiedRequest]:
        with self._lock:
            return [record for record in self._records if tag is None or record.tag == tag]

    def stop(self) -> None:
        for server, thread in self._servers:
            server.shutdown()
            server.server_close()
            thread.join(timeout=10)
        self._servers.clear()


class _ForwardingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive towards headstart's clients
    tag = ""
    upstream: tuple[str, int] = ("127.0.0.1", 80)

    def record(self, request: ProxiedRequest) -> None:  # replaced per tag by CountingProxy.listen
        raise NotImplementedError

    def log_message(self, format, *args) -> None:  # quiet: the records are the log
        pass

    def do_GET(self) -> None:
        self._forward()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    def _forward(self) -> None:
        arrived, started = time.time(), time.perf_counter()
        body = self._body()
        headers = {name: value for name, value in self.headers.items() if name.lower() not in DROPPED_HEADERS}
        host, port = self.upstream
        headers["Host"] = f"{host}:{port}"
        connection = http.client.HTTPConnection(host, port, timeout=TIMEOUT_S)
        try:
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
            status, reason, answer_headers = response.status, response.reason, response.getheaders()
        except OSError as exc:
            status, reason, answer_headers = 502, "Bad Gateway", [("Content-Type", "text/plain")]
            payload = f"Label Studio unreachable through the bench proxy: {exc}".encode()
        finally:
            connection.close()
        self.send_response(status, reason)
        for name, value in answer_headers:
            if name.lower() not in DROPPED_HEADERS:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        self.record(ProxiedRequest(at=arrived, tag=self.tag, method=self.command, path=self.path, status=status,
                                   seconds=time.perf_counter() - started, bytes=len(payload)))

    def _body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None
