"""The project's webhook in Label Studio, given headstart's basic-auth credentials so its calls get through.

Label Studio 1.23.2 creates an ML backend's webhook (`ml/models.py` `create_ml_webhook`: the backend's
URL + `/webhook`, every action, with payload) without headers, and sends basic auth only on the
backend's own calls (/setup, /predict, /train). With BASIC_AUTH_USER/PASS set, every annotation
webhook would be refused with 401 and submits would not train. Label Studio sends a webhook's
`headers` with each call (`webhooks/utils.py` `run_webhook_sync`) and lets its API change them
(`PATCH /api/webhooks/{id}`, `WebhookSerializerForUpdate`), so headstart adds
`Authorization: Basic …` to the webhooks of the project that point at the URL Label Studio calls
it by (the `Host` of its authenticated /setup): never to another backend's webhook.

State per project (`redis_keys.webhook_auth`): what the last attempt found, and a short-lived claim
so that Label Studio's frequent /setup calls queue at most one attempt at a time.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from urllib.parse import urlsplit

from label_studio_sdk.client import LabelStudio
from redis import Redis

from backend.common import redis_keys
from backend.common.errors import LabelStudioUnavailable

RETRY_AFTER_S = 30  # a missing webhook (Label Studio calls /setup once before creating it): look again after this
RETRY_FAILED_AFTER_S = 600  # a refusal (permissions): look again after this
RECHECK_AFTER_S = 3600  # a webhook re-created in Label Studio (model disconnected and connected) is found within this


def authorization(user: str, password: str) -> str:
    """The `Authorization` header value for HTTP basic auth."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def credentials_tag(user: str, password: str) -> str:
    """A short tag of the credentials, so a changed password is noticed without storing it."""
    return hashlib.sha256(f"headstart-webhook-auth\0{user}\0{password}".encode()).hexdigest()[:16]


def points_at(hook_url: str, backend_url: str) -> bool:
    """Whether a webhook URL is `backend_url` + `/webhook` (scheme and trailing slashes aside), as Label
    Studio builds it for an ML backend."""
    hook, backend = urlsplit(hook_url), urlsplit(backend_url)
    return (hook.netloc.lower() == backend.netloc.lower()
            and hook.path.rstrip("/") == backend.path.rstrip("/") + "/webhook")


def secure_project_webhooks(client: LabelStudio, project: str, backend_url: str, header: str) -> dict:
    """Give every webhook of `project` that points at `backend_url` the `Authorization` header `header`.

    Returns {state: "ok" | "missing", webhooks: [ids], patched: n}. Raises LabelStudioUnavailable, naming
    the fix, when Label Studio cannot be read or refuses the change (e.g. the token's user lacks the
    permission to change webhooks).
    """
    try:
        hooks = client.webhooks.list(project=str(project))
    except Exception as exc:
        raise LabelStudioUnavailable(_refused("list", project, exc)) from None
    ours = [hook for hook in hooks if hook.url and points_at(hook.url, backend_url)]
    patched = 0
    for hook in ours:
        headers = dict(hook.headers) if isinstance(hook.headers, dict) else {}
        if headers.get("Authorization") == header:
            continue
        try:
            client.webhooks.update(id=hook.id, headers={**headers, "Authorization": header})
        except Exception as exc:
            raise LabelStudioUnavailable(_refused("change", project, exc)) from None
        patched += 1
    return {"state": "ok" if ours else "missing", "webhooks": [hook.id for hook in ours], "patched": patched}


def _refused(what: str, project: str, exc: Exception) -> str:
    return (f"Could not {what} the webhooks of project {project} in Label Studio ({type(exc).__name__}: "
            f"{str(exc)[:200]}), so Label Studio's webhooks reach headstart without basic auth and are refused: "
            "submits do not train. Give LABEL_STUDIO_API_KEY a user that may change the project's webhooks "
            "(an owner or administrator), or add the header `Authorization: Basic <base64 of user:password>` "
            "to the project's webhook yourself (Project → Settings → Webhooks).")


class WebhookAuth:
    """Per project: whether its webhooks carry the current credentials, and the claim on the next attempt."""

    def __init__(self, redis: Redis):
        self.redis = redis

    def needs_attempt(self, project: str, tag: str) -> bool:
        """True (and the attempt claimed) when no attempt for these credentials succeeded and none is under
        way or recently failed."""
        raw = self.redis.hget(redis_keys.webhook_auth(project), "state")
        state = json.loads(raw) if raw is not None else {}
        if state.get("state") == "ok" and state.get("credentials") == tag and \
                time.time() - state.get("at", 0) < RECHECK_AFTER_S:
            return False
        return bool(self.redis.set(redis_keys.webhook_auth(project, "claim"), tag, nx=True, ex=RETRY_AFTER_S))

    def record(self, project: str, tag: str, outcome: dict, *, retry_after_s: int = RETRY_AFTER_S) -> None:
        """What an attempt found; the claim stands for `retry_after_s` more (a failure waits longer)."""
        state = {**outcome, "credentials": tag, "at": time.time()}
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(redis_keys.webhook_auth(project), "state", json.dumps(state))
        pipe.set(redis_keys.webhook_auth(project, "claim"), tag, ex=retry_after_s)
        pipe.execute()

    def state(self, project: str) -> dict | None:
        raw = self.redis.hget(redis_keys.webhook_auth(project), "state")
        return json.loads(raw) if raw is not None else None
