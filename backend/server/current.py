"""The one accessor the HTTP layer uses for the process's services (built once by `create_app`)."""

from __future__ import annotations

from flask import Flask, current_app

from backend.loop.services import Services

EXTENSION = "headstart"


def install(app: Flask, services: Services) -> None:
    app.extensions[EXTENSION] = services


def services() -> Services:
    """The `Services` of the app handling the current request."""
    return current_app.extensions[EXTENSION]
