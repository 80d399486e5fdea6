"""The services a worker process holds between jobs (loaded backbone, Redis, settings).

`headstart worker` installs them once at start, so the backbone loads once per process, not once
per job. A job run outside such a worker (a test calling the function, `rq worker` started by
hand) builds them from the environment on first use.
"""

from __future__ import annotations

import threading

from backend.common.redis_conn import connect
from backend.services import Services, build_services
from backend.common.settings import Settings

_lock = threading.Lock()
_installed: Services | None = None


def install(services: Services) -> None:
    global _installed
    with _lock:
        _installed = services


def current() -> Services:
    global _installed
    with _lock:
        if _installed is None:
            settings = Settings.from_env()
            _installed = build_services(settings, connect(settings.redis_url), device=settings.device)
        return _installed


def uninstall() -> None:
    global _installed
    with _lock:
        _installed = None
