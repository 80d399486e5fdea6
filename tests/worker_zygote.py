"""Start many real `headstart worker` processes cheaply, for the kill tests (python -m tests.worker_zygote).

A worker process spends seconds importing torch and loading the backbone. This process does that
once, then forks a fresh worker for every `spawn <name>` line on stdin and answers `<name> <pid>`.
Each child starts its own session (so SIGKILL to its process group also takes its RQ scheduler),
opens its own Redis connection and runs exactly what `headstart worker` runs: `build_worker`
from the environment's settings, then `work(with_scheduler=True)`. Torch is held to one thread
before anything runs, so forking is safe on CPU.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from backend.core.torch_runtime import set_torch_threads
from backend.core.encoders import EncoderPool
from backend.common.redis_conn import connect
from backend.loop.services import build_services
from backend.common.settings import Settings


def run_worker(settings: Settings, encoders: EncoderPool, name: str) -> None:
    from worker.process import build_worker

    os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    redis = connect(settings.redis_url)
    worker = build_worker(settings, redis, name=name, services=build_services(settings, redis, encoders=encoders))
    worker.work(with_scheduler=True, logging_level=settings.log_level.upper())


def main() -> int:
    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(process)d %(name)s: %(message)s")
    set_torch_threads(1)
    encoders = EncoderPool(default_name=settings.backbone, weights_file=settings.backbone_weights_file)
    encoders.get()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    print("ready", flush=True)
    for line in sys.stdin:
        command, _, name = line.strip().partition(" ")
        if command != "spawn" or not name:
            continue
        pid = os.fork()
        if pid == 0:
            try:
                run_worker(settings, encoders, name)
            finally:
                os._exit(0)
        print(f"{name} {pid}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
