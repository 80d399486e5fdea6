"""A small local stand-in for Label Studio's REST API, serving the shapes a real 1.23.2 answers.

Used only where running the real Label Studio would make a unit test take a minute; tests/e2e
drives the same code paths against a real Label Studio. Loopback only.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field

import jwt
from flask import Flask, abort, jsonify, redirect, request
from werkzeug.serving import make_server

from tests.helpers import BackgroundServer

SECRET = "fake-label-studio-signing-key-for-tests"


def personal_access_token(user_id: int = 1) -> str:
    """A JWT refresh token shaped like Label Studio's personal access tokens."""
    now = int(time.time())
    return jwt.encode({"token_type": "refresh", "exp": now + 3600, "iat": now, "jti": "pat", "user_id": user_id},
                      SECRET, algorithm="HS256")


@dataclass
class FakeLabelStudio:
    label_config: str
    tasks: list[dict] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    legacy_token: str = "0123456789abcdef0123456789abcdef01234567"
    pat: str = field(default_factory=personal_access_token)
    imported_predictions: list[dict] = field(default_factory=list)
    refreshes: int = 0
    media_auth: list[str] = field(default_factory=list)

    def start(self) -> "FakeLabelStudio":
        self._background = BackgroundServer(make_server("127.0.0.1", 0, self._app(), threaded=True))
        self.url = self._background.url
        return self

    def stop(self) -> None:
        self._background.stop()

    def _authorized(self) -> bool:
        header = request.headers.get("Authorization", "")
        if header == f"Token {self.legacy_token}":
            return True
        if header.startswith("Bearer "):
            try:
                claims = jwt.decode(header[7:], SECRET, algorithms=["HS256"])
            except jwt.InvalidTokenError:
                return False
            return claims.get("token_type") == "access"
        return False

    def _app(self) -> Flask:
        app = Flask("fake-label-studio")

        @app.before_request
        def check_auth():
            if request.path != "/api/token/refresh/" and not self._authorized():
                abort(401)

        @app.post("/api/token/refresh/")
        def refresh():
            if request.json.get("refresh") != self.pat:
                abort(401)
            self.refreshes += 1
            access = jwt.encode({"token_type": "access", "exp": int(time.time()) + 300}, SECRET, algorithm="HS256")
            return jsonify(access=access)

        @app.get("/api/projects/<int:project>/")
        def project(project):
            return jsonify(id=project, title="fake", label_config=self.label_config)

        @app.get("/api/tasks/")
        def tasks():
            page, size = int(request.args.get("page", 1)), int(request.args.get("page_size", 100))
            selected = [t for t in self.tasks if request.args.get("only_annotated") != "true" or t["annotations"]]
            if (page - 1) * size >= len(selected) and page > 1:
                abort(404)  # like Label Studio: past the last page
            chunk = selected[(page - 1) * size: page * size]
            return jsonify(tasks=chunk, total=len(selected),
                           total_annotations=sum(len(t["annotations"]) for t in selected), total_predictions=0)

        @app.post("/api/projects/<int:project>/import/predictions")
        def import_predictions(project):
            self.imported_predictions += request.json
            return jsonify(created=len(request.json)), 201

        @app.get("/tasks/<int:task>/presign/")
        def presign(task):
            # Label Studio answers with a redirect to a short-lived signed URL of the cloud object.
            uri = base64.urlsafe_b64decode(request.args["fileuri"]).decode()
            return redirect(f"/storage-data/uploaded/?filepath={uri.split('://', 1)[1]}", code=303)

        @app.get("/storage-data/uploaded/")
        def uploaded():
            self.media_auth.append(request.headers.get("Authorization", "").split(" ")[0])
            data = self.files.get(request.args.get("filepath", ""))
            if data is None:
                abort(404)
            return data, 200, {"Content-Type": "image/jpeg"}

        return app
