"""The real thing, as subprocesses: a redis-server of our own, `headstart serve` (gunicorn) and
optionally `headstart worker`, on loopback ports. Every process started here is stopped here.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis as redis_lib

from bench.harness import REPO
from bench.resources import RedisServer, free_port

READY_TIMEOUT_S = 120
QUICK_ENV = {"WORKERS": "1", "TRAIN_MIN_INTERVAL_S": "0"}
# gunicorn's master stops its workers at once on SIGINT (SIGTERM waits for requests to finish)
STOP_SIGNALS = {"serve": signal.SIGINT, "worker": signal.SIGTERM}
# settings a developer's shell may carry that would change what is measured
CLEARED_ENV = ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "REDIS_URL",
               "BACKBONE", "BACKBONE_WEIGHTS_FILE", "WORKERS", "THREADS", "TORCH_THREADS", "DEVICE",
               "TRAIN_MIN_INTERVAL_S", "MIN_LABELS_PER_CLASS", "PORT")


class JsonClient:
    """A keep-alive HTTP/1.1 JSON client with almost no overhead of its own (http.client)."""

    def __init__(self, port: int, *, timeout_s: float = 120):
        self.port = port
        self.timeout_s = timeout_s
        self._connection: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        for attempt in (1, 2):
            if self._connection is None:
                self._connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout_s)
            try:
                self._connection.request(method, path, body=payload, headers=headers)
                response = self._connection.getresponse()
                data = response.read()
                return response.status, json.loads(data) if data else {}
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()  # the server closed an idle keep-alive connection: reconnect once
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        return self.request("POST", path, body)

    def get(self, path: str) -> tuple[int, dict]:
        return self.request("GET", path)

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class Stack:
    """redis-server + `headstart serve` (+ `headstart worker`), configured by environment variables."""

    def __init__(self, *, env: dict[str, str] | None = None, worker: bool = False, quick: bool = False):
        """`quick`: one gunicorn worker and no TRAIN_MIN_INTERVAL_S, to start and stop fast (smoke tests)."""
        self.extra_env = {**(QUICK_ENV if quick else {}), **(env or {})}
        self.with_worker = worker
        self.redis_server = RedisServer(appendonly=False)
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="headstart-bench-"))
        self.processes: dict[str, subprocess.Popen] = {}
        self.redis: redis_lib.Redis | None = None

    def __enter__(self) -> "Stack":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if key not in CLEARED_ENV}
        env.update({"REDIS_URL": self.redis_server.url, "PORT": str(self.port), "LOG_LEVEL": "WARNING",
                    "MODEL_DIR": str(self.workdir / "media"), "REPREDICT_UNLABELED": "false",
                    "PYTHONPATH": str(REPO)})
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        self.redis_server.start()
        self.redis = redis_lib.Redis.from_url(self.redis_server.url)
        (self.workdir / "media").mkdir()
        self._spawn("serve", ["serve", "--host", "127.0.0.1", "--port", str(self.port)])
        if self.with_worker:
            self._spawn("worker", ["worker", "--name", "bench-worker"])
        self._wait_until(self._server_ready, "headstart serve did not answer /health")
        if self.with_worker:
            self._wait_until(self._worker_ready, "headstart worker did not register in Redis")

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "wb")
        # its own process group, so stopping it also reaches gunicorn's workers if the master is killed
        self.processes[name] = subprocess.Popen([sys.executable, "-m", "backend.cli", *args], cwd=REPO,
                                                env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)
        log.close()

    def _server_ready(self) -> bool:
        client = JsonClient(self.port, timeout_s=2)
        try:
            return client.get("/health")[0] == 200
        except OSError:
            return False
        finally:
            client.close()

    def _worker_ready(self) -> bool:
        return any(self.redis.hget(key, "headstart") for key in self.redis.keys("rq:worker:*")
                   if self.redis.type(key) == b"hash")

    def _wait_until(self, ready, message: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready():
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{message}: {name} exited with {process.returncode}\n{self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{message} within {READY_TIMEOUT_S} s\n{self.log_tail('serve')}")
            time.sleep(0.1)

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.workdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def client(self) -> JsonClient:
        return JsonClient(self.port)

    def stop(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is None:
                process.send_signal(STOP_SIGNALS.get(name, signal.SIGTERM))
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # whatever of its group is left, e.g. orphaned workers
            process.wait(timeout=10)
        self.processes.clear()
        if self.redis is not None:
            self.redis.close()
        self.redis_server.cleanup()
        shutil.rmtree(self.workdir, ignore_errors=True)
