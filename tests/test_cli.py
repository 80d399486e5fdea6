"""The `headstart` command's own edges: where `up` listens, and the warning when nothing guards the routes."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

import pytest
from rq import Worker

from backend import cli
from backend.common.settings import Settings
from bench.processes import http_ok, wait_until
from bench.resources import free_port


def test_up_listens_on_this_host_only_unless_told_otherwise(monkeypatch):
    seen = {}
    monkeypatch.setitem(cli.COMMANDS, "up", lambda settings, args: seen.setdefault("host", args.host) and 0)
    cli.main(["up"])
    assert seen["host"] == "127.0.0.1"
    seen.clear()
    cli.main(["up", "--host", "0.0.0.0"])
    assert seen["host"] == "0.0.0.0"


@pytest.mark.parametrize("host, where", [("0.0.0.0", "from any address"), ("127.0.0.1", "from this host only")])
def test_serving_without_basic_auth_says_how_to_turn_it_on(caplog, host, where):
    with caplog.at_level(logging.WARNING, logger="headstart"):
        cli.warn_if_open(Settings(), host, 9090)
    (record,) = caplog.records
    assert where in record.getMessage() and "Set BASIC_AUTH_USER and BASIC_AUTH_PASS" in record.getMessage()
    caplog.clear()
    cli.warn_if_open(Settings(basic_auth_user="ls", basic_auth_pass="secret"), host, 9090)
    assert caplog.records == []


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_stopping_up_stops_its_workers(redis_url, redis, stop):
    """`headstart up` stopped (SIGTERM: a service manager, `docker stop`) or killed (SIGKILL, the OOM killer):
    its RQ workers do not outlive it."""
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "UP_WORKERS": "2", "LOG_LEVEL": "WARNING"}
    up = subprocess.Popen([sys.executable, "-m", "backend.cli", "up", "--port", str(port)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        workers = wait_until(lambda: [w for w in Worker.all(connection=redis) if w.pid] if len(
            Worker.all(connection=redis)) == 2 else None, timeout_s=180, what="two workers of `headstart up`")
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/health"), timeout_s=60, what="the backend")
        pids = [worker.pid for worker in workers]
        up.send_signal(stop)
        assert up.wait(timeout=60) == (0 if stop == signal.SIGTERM else -signal.SIGKILL)
        wait_until(lambda: not any(_alive(pid) for pid in pids), timeout_s=40, what="the workers to exit")
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
