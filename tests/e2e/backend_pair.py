"""headstart as users run it: `headstart serve` (gunicorn) and `headstart worker`, two processes
sharing one Redis, configured only through the environment the README documents."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from redis import Redis
from rq import Worker

from tests.e2e.processes import ManagedProcess, http_ok, wait_until
from tests.helpers import REPO, free_port

HEADSTART = REPO / ".venv" / "bin" / "headstart"
START_TIMEOUT_S = 120
ENV_DROPPED = ("REDIS_URL", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "LOCAL_FILES_DOCUMENT_ROOT",
               "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "MODEL_DIR", "WORKERS", "THREADS", "PORT")


def headstart_executable() -> Path:
    if HEADSTART.exists():
        return HEADSTART
    candidate = Path(sys.executable).parent / "headstart"
    if candidate.exists():
        return candidate
    raise FileNotFoundError(f"{HEADSTART} is missing: install the project first (pip install -e '.[test]')")


class HeadstartPair:
    """One backend (gunicorn) and one RQ worker, each logging to its own file under `log_dir`."""

    def __init__(self, name: str, *, redis_url: str, label_studio_url: str, api_key: str,
                 documents_root: Path, log_dir: Path, extra_env: dict[str, str] | None = None):
        self.name = name
        self.redis_url = redis_url
        self.port = free_port()
        env = {key: value for key, value in os.environ.items() if key not in ENV_DROPPED}
        env.update({
            "REDIS_URL": redis_url,
            "LABEL_STUDIO_URL": label_studio_url,
            "LABEL_STUDIO_API_KEY": api_key,
            "LOCAL_FILES_DOCUMENT_ROOT": str(documents_root),
            "PYTHONUNBUFFERED": "1",
            # the flows here measure the trained loop from "untrained" on; zero-shot v0 is tested in process
            "ZERO_SHOT": "false",
            **(extra_env or {}),
        })
        executable = str(headstart_executable())
        # the README's commands, verbatim: `headstart serve --port P` and `headstart worker`
        self.backend = ManagedProcess(f"{name} backend", [executable, "serve", "--port", str(self.port)],
                                      env=env, log_path=log_dir / f"{name}-backend.log", cwd=REPO)
        self.worker = ManagedProcess(f"{name} worker", [executable, "worker"],
                                     env=env, log_path=log_dir / f"{name}-worker.log", cwd=REPO)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def processes(self) -> tuple[ManagedProcess, ...]:
        return (self.backend, self.worker)

    def start(self) -> "HeadstartPair":
        self.worker.start()
        self.backend.start()
        wait_until(lambda: http_ok(f"{self.url}/health"), timeout_s=START_TIMEOUT_S,
                   what=f"{self.name} backend health", processes=self.processes)
        wait_until(lambda: self.worker_registered(), timeout_s=START_TIMEOUT_S,
                   what=f"{self.name} worker registration", processes=self.processes)
        return self

    def worker_registered(self) -> bool:
        """The worker registers with RQ (in its own Redis database) once its backbone is loaded."""
        redis = Redis.from_url(self.redis_url)
        try:
            return len(Worker.all(connection=redis)) == 1
        finally:
            redis.close()

    def stop(self) -> None:
        for process in self.processes:
            process.request_stop()
        for process in self.processes:
            process.stop()

    def report(self, lines: int = 80) -> str:
        return "\n".join(process.report(lines) for process in self.processes)
