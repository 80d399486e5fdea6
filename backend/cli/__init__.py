"""The `headstart` command: the only place besides the app factory that reads the environment."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

from backend.cli.admin import add_admin_commands
from backend.cli.audit import add_audit_commands
from backend.common.errors import HeadstartError
from backend.common.settings import Settings


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
    workers = [subprocess.Popen([sys.executable, "-m", "backend.cli", "worker"], env=env)
               for _ in range(max(1, settings.up_workers))]
    try:
        return _serve(settings.replace(redis_url=url), args)
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(timeout=30)


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
    return 0


COMMANDS = {"serve": _serve, "worker": _worker, "up": _up, "backbones": _backbones}
