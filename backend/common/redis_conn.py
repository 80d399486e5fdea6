"""Connecting to Redis, and starting an embedded one for a single-host setup."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time

from redis import Redis
from redis.exceptions import RedisError

from backend.common.errors import ConfigurationError, StoreUnavailable

log = logging.getLogger(__name__)

LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"
CONNECT_TIMEOUT_S = 2.0
SOCKET_TIMEOUT_S = 10.0


def connect(url: str) -> Redis:
    """A client for `url` (default: the local Redis). Connects lazily."""
    return Redis.from_url(url or LOCAL_REDIS_URL, socket_connect_timeout=CONNECT_TIMEOUT_S,
                          socket_timeout=SOCKET_TIMEOUT_S, health_check_interval=30)


def ping(url: str) -> bool:
    try:
        return bool(connect(url).ping())
    except RedisError:
        return False


def ensure_redis(url: str, *, local_url: str = LOCAL_REDIS_URL, data_dir: str = "") -> str:
    """The Redis URL to use: `url` if given, else a local Redis, else an embedded redis-server.

    The embedded server is a child process that stops when this process exits; it keeps its
    append-only file in `data_dir` (default: a temporary directory), so a restart with the same
    directory finds every head, label and embedding again.
    """
    if url:
        if not ping(url):
            raise StoreUnavailable(f"REDIS_URL={url} does not answer. Start Redis there or fix REDIS_URL.")
        return url
    if ping(local_url):
        return local_url
    embedded = EmbeddedRedis(data_dir).start()
    atexit.register(embedded.stop)
    return embedded.url


class EmbeddedRedis:
    """A redis-server child process on a free loopback port, with append-only persistence."""

    def __init__(self, data_dir: str = ""):
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="headstart-redis-")
        os.makedirs(self.data_dir, exist_ok=True)
        self.port = _free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "EmbeddedRedis":
        server = shutil.which("redis-server")
        if server is None:
            raise ConfigurationError(
                "No REDIS_URL is set, nothing answers on 127.0.0.1:6379 and redis-server is not installed. "
                "Install Redis (apt-get install redis-server) or set REDIS_URL."
            )
        self.process = subprocess.Popen(
            [server, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.data_dir,
             "--appendonly", "yes", "--save", "60 1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while not ping(self.url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise StoreUnavailable(f"The embedded redis-server did not start (exit {self.process.poll()}).")
            time.sleep(0.05)
        log.info("started an embedded redis-server at %s (data in %s)", self.url, self.data_dir)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
