"""Long-running child processes (Label Studio, for the `loop` benchmark and the end-to-end suite):
started in their own process group, logged to a file, and stopped (the whole group) on teardown, at
interpreter exit, or when the parent itself dies."""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import requests

PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 10.0


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel sends it SIGTERM if its parent dies without cleanup."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class ManagedProcess:
    """One long-running command whose output goes to `log_path`; `stop()` ends its whole group."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str], log_path: Path,
                 cwd: Path | None = None):
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.cwd = cwd
        self.process: subprocess.Popen | None = None

    def start(self) -> "ManagedProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
        atexit.register(self.stop)
        return self

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal_group(self, signum: int) -> None:
        """Send `signum` to this process's group (its own children included)."""
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signum)
            except ProcessLookupError:
                pass

    def request_stop(self) -> None:
        """SIGTERM the group without waiting (so several processes can shut down side by side)."""
        self.signal_group(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        self.signal_group(signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM the group, wait, then SIGKILL whatever is left. Safe to call twice."""
        if self.process is None:
            return
        self.request_stop()
        try:
            self.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        self.signal_group(signal.SIGKILL)  # stragglers of the group, even when the leader is gone
        try:
            self.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        atexit.unregister(self.stop)

    def tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return f"({self.log_path} is not readable)"
        return "\n".join(text.splitlines()[-lines:])

    def report(self, lines: int = 60) -> str:
        state = "running" if self.alive() else f"exited with {self.process.returncode if self.process else None}"
        return f"----- {self.name} ({state}), last {lines} lines of {self.log_path} -----\n{self.tail(lines)}"


def wait_until(condition: Callable[[], object], *, timeout_s: float, interval_s: float = 0.5,
               what: str, processes: tuple[ManagedProcess, ...] = ()) -> object:
    """Poll `condition` until it returns something truthy; fail with the processes' log tails."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except (requests.RequestException, ValueError, KeyError) as exc:
            last_error = exc
        for process in processes:
            if not process.alive():
                raise RuntimeError(f"{process.name} exited while waiting for {what}\n{process.report()}")
        if time.monotonic() > deadline:
            logs = "\n".join(process.report() for process in processes)
            raise TimeoutError(f"no {what} within {timeout_s:.0f} s (last error: {last_error!r})\n{logs}")
        time.sleep(interval_s)


def http_ok(url: str) -> bool:
    return requests.get(url, timeout=2).status_code == 200
