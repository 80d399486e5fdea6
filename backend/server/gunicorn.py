"""Run the Flask app under gunicorn from inside `headstart serve` (so an embedded Redis lives with it)."""

from __future__ import annotations

from gunicorn.app.base import BaseApplication

from backend.common.settings import Settings

# Label Studio allows /predict 100 s; a worker must outlive a large "Retrieve Predictions" batch.
REQUEST_TIMEOUT_S = 120


class GunicornServer(BaseApplication):
    def __init__(self, settings: Settings, *, bind: str):
        self.settings = settings
        self.bind = bind
        super().__init__()

    def load_config(self):
        self.cfg.set("bind", self.bind)
        self.cfg.set("workers", self.settings.workers)
        self.cfg.set("threads", self.settings.threads)
        self.cfg.set("worker_class", "gthread")
        self.cfg.set("timeout", REQUEST_TIMEOUT_S)
        self.cfg.set("accesslog", "-")
        self.cfg.set("loglevel", self.settings.log_level.lower())
        # gunicorn's control socket is one fixed path per user: several backends on a host would share it
        self.cfg.set("control_socket_disable", True)

    def load(self):
        from backend.server.app import create_app

        return create_app(self.settings)
