"""A real headless Chromium driven over the DevTools protocol through a pipe (--remote-debugging-pipe).

No browser download and no Python package beyond the standard library: Debian's `chromium`
(`apt-get install -y chromium`) reads protocol messages on fd 3 and writes them on fd 4, each a
JSON object ended by a NUL byte.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
INSTALL_HINT = "Install Debian's chromium package (apt-get install -y chromium); the admin page test drives it."


def find_chromium() -> str | None:
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


def _above_4(fd: int) -> int:
    """`fd` moved to a number above 4, so placing the pipe ends on 3 and 4 cannot clobber one another."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return moved


class Browser:
    """One headless Chromium with one page; `call` sends a command and returns its result."""

    def __init__(self, binary: str, profile_dir: Path, *, log_path: Path, width: int = 1400, height: int = 900):
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()
        to_browser_read, from_browser_write = _above_4(to_browser_read), _above_4(from_browser_write)
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-extensions", "--disable-background-networking", "--hide-scrollbars",
                "--remote-debugging-pipe", f"--user-data-dir={profile_dir}", f"--window-size={width},{height}"]
        # bash puts the pipe ends on fds 3 and 4, where --remote-debugging-pipe expects them, then execs chromium.
        ends = (to_browser_read, from_browser_write)
        script = f'exec "$0" "$@" 3<&{ends[0]} 4>&{ends[1]} {ends[0]}<&- {ends[1]}>&-'
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(["bash", "-c", script, binary, *args], pass_fds=ends,
                                        stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict] = []
        self.width, self.height = width, height
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable", session=True)
        self.call("Runtime.enable", session=True)

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise RuntimeError(f"Chromium exited (code {self.process.poll()})")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, *, session: bool = False, timeout_s: float = 30) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._events.append(reply)

    def wait_for_event(self, name: str, *, timeout_s: float = 30) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            for index, event in enumerate(self._events):
                if event.get("method") == name:
                    return self._events.pop(index)
            self._events.append(self._read_message(deadline))

    def navigate(self, url: str) -> None:
        self._events.clear()
        self.call("Page.navigate", {"url": url}, session=True)
        self.wait_for_event("Page.loadEventFired")

    def evaluate(self, expression: str):
        """The JSON value of a JavaScript expression in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                           session=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def action_then_load(self, expression: str) -> None:
        """Run `expression` (a click or a submit) and wait for the page it leads to."""
        self._events.clear()
        self.evaluate(expression)
        self.wait_for_event("Page.loadEventFired")

    def screenshot(self, path: Path) -> Path:
        """The whole page (not only the viewport) as PNG."""
        size = self.call("Page.getLayoutMetrics", session=True)["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": max(self.width, size["width"]), "height": size["height"], "scale": 1}
        shot = self.call("Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True},
                         session=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout_s=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
            self.process.wait(timeout=10)
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        self._log.close()
