"""The `headstart` command: the only place besides the app factory that reads the environment."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time

from backend.cli.admin import add_admin_commands
from backend.cli.audit import add_audit_commands
from backend.common.errors import HeadstartError
from backend.common.settings import Settings

PR_SET_PDEATHSIG = 1  # prctl(2)
WORKER_STOP_GRACE_S = 30.0  # how long `up` lets its workers finish the job at hand when it stops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="headstart", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start the ML backend under gunicorn")
    serve.add_argument("--port", type=int, help="port (default: PORT, 9090)")
    serve.add_argument("--host", default="0.0.0.0", help="bind address (default 0.0.0.0)")

    work = commands.add_parser("worker", help="start an RQ worker (training, embedding, re-prediction)")
    work.add_argument("--queues", nargs="+", help="queues to listen on (default: all headstart queues)")
    work.add_argument("--burst", action="store_true", help="exit once the queues are empty")
    work.add_argument("--name", help="worker name (default: RQ's)")

    up = commands.add_parser("up", help="backend + UP_WORKERS workers on this host (embedded Redis if needed)")
    up.add_argument("--port", type=int, help="port (default: PORT, 9090)")
    up.add_argument("--host", default="127.0.0.1",
                    help="bind address (default 127.0.0.1, this host only; 0.0.0.0 to reach it from others)")

    commands.add_parser("backbones", help="list the available backbones")
    admin_commands = add_admin_commands(commands)
    admin_commands.update(add_audit_commands(commands))

    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        logging.basicConfig(level=settings.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return {**COMMANDS, **admin_commands}[args.command](settings, args)
    except HeadstartError as exc:
        print(f"headstart: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _serve(settings: Settings, args) -> int:
    from backend.common.redis_conn import ensure_redis
    from backend.server.gunicorn import GunicornServer

    warn_if_open(settings, args.host, args.port or settings.port)

    settings = settings.replace(redis_url=ensure_redis(settings.redis_url, data_dir=_embedded_redis_dir(settings)))
    port = args.port or settings.port
    GunicornServer(settings, bind=f"{args.host}:{port}").run()
    return 0


def _worker(settings: Settings, args) -> int:
    from backend.common.redis_conn import connect, ensure_redis
    from worker.process import build_worker
    from backend.common.queues import QUEUE_NAMES

    url = ensure_redis(settings.redis_url) if settings.redis_url else settings.redis_url
    worker = build_worker(settings, connect(url), queues=tuple(args.queues or QUEUE_NAMES), name=args.name)
    worker.work(burst=args.burst, with_scheduler=True, logging_level=settings.log_level.upper())
    return 0


def _up(settings: Settings, args) -> int:
    from backend.common.redis_conn import ensure_redis

    url = ensure_redis(settings.redis_url, data_dir=_embedded_redis_dir(settings))
    env = {**os.environ, "REDIS_URL": url}
    workers = [subprocess.Popen([sys.executable, "-m", "backend.cli", "worker"], env=env, preexec_fn=_die_with_parent)
               for _ in range(max(1, settings.up_workers))]
    try:
        return _serve(settings.replace(redis_url=url), args)
    finally:
        _stop(workers)


def _die_with_parent() -> None:
    """Runs in an `up` worker before exec: Linux sends it SIGTERM when `up` dies, even by SIGKILL."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the workers outlive a killed `up`


def _stop(workers: list[subprocess.Popen]) -> None:
    """SIGTERM (RQ's warm shutdown: the job at hand finishes), then SIGKILL after WORKER_STOP_GRACE_S."""
    for worker in workers:
        worker.terminate()
    deadline = time.monotonic() + WORKER_STOP_GRACE_S
    for worker in workers:
        try:
            worker.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()  # RQ re-queues its job as abandoned
            worker.wait()


def warn_if_open(settings: Settings, host: str, port: int) -> None:
    """Say loudly when anyone who reaches the port may call every Label Studio route."""
    if settings.basic_auth_user:
        return
    where = "from this host only" if host in ("127.0.0.1", "localhost", "::1") else f"from any address ({host})"
    logging.getLogger("headstart").warning(
        "No BASIC_AUTH_USER/BASIC_AUTH_PASS: /predict, /setup and /webhook answer anyone who reaches port %s "
        "%s. Set BASIC_AUTH_USER and BASIC_AUTH_PASS and give Label Studio the same user and password in "
        "the model's settings.", port, where)


def _embedded_redis_dir(settings: Settings) -> str:
    """Where an embedded Redis keeps its data: MODEL_DIR/redis, else a temporary directory."""
    return os.path.join(settings.model_dir, "redis") if settings.model_dir else ""


def _backbones(settings: Settings, args) -> int:
    from backend.core.backbones import REGISTRY

    for name, spec in REGISTRY.items():
        marker = " (default)" if name == settings.backbone else ""
        print(f"{name:20s} {spec.feature_dim:5d}-d  {spec.weights}{marker}")
    from backend.core.text_encoder import TEXT_MODELS, is_local_model

    for name, text_spec in TEXT_MODELS.items():
        marker = " (default for text)" if name == settings.text_encoder else ""
        print(f"{name:20s} {text_spec.feature_dim:5d}-d  text{marker}")
    if is_local_model(settings.text_encoder):
        print(f"{settings.text_encoder}  text, local directory (TEXT_ENCODER)")
    return 0


COMMANDS = {"serve": _serve, "worker": _worker, "up": _up, "backbones": _backbones}
