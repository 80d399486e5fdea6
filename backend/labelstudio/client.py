"""Access to Label Studio's API through the SDK, with personal access tokens or legacy tokens."""

from __future__ import annotations

import threading
import time

import jwt
from label_studio_sdk.client import LabelStudio

from backend.common.errors import ConfigurationError, LabelStudioUnavailable
from backend.common.settings import Settings

API_TIMEOUT_S = 30.0
TOKEN_REFRESH_MARGIN_S = 30.0


def make_client(settings: Settings) -> LabelStudio:
    """An SDK client for LABEL_STUDIO_URL, authenticated with LABEL_STUDIO_API_KEY."""
    _require_credentials(settings)
    try:
        return LabelStudio(base_url=settings.label_studio_url, api_key=settings.label_studio_api_key,
                           timeout=API_TIMEOUT_S)
    except Exception as exc:  # the SDK validates JWT expiry at construction
        raise LabelStudioUnavailable(
            f"LABEL_STUDIO_API_KEY was refused ({exc}). Create a new personal access token in "
            "Label Studio (Account & Settings) and set it as LABEL_STUDIO_API_KEY."
        ) from None


def _require_credentials(settings: Settings) -> None:
    if not settings.label_studio_url or not settings.label_studio_api_key:
        raise ConfigurationError(
            "Set LABEL_STUDIO_URL (e.g. http://localhost:8080) and LABEL_STUDIO_API_KEY (a personal "
            "access token from Label Studio's Account & Settings) so headstart can read labels, "
            "download uploaded media and write predictions."
        )
    if not settings.label_studio_url.startswith(("http://", "https://")):
        raise ConfigurationError(
            f"LABEL_STUDIO_URL={settings.label_studio_url!r} needs a scheme, e.g. http://localhost:8080."
        )


def is_personal_access_token(api_key: str) -> bool:
    """Personal access tokens are JWT refresh tokens; legacy tokens are opaque hex strings."""
    try:
        claims = jwt.decode(api_key, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return False
    return claims.get("token_type") == "refresh"


class MediaToken:
    """The token to send with media downloads from Label Studio.

    A legacy token is sent as is. A personal access token is exchanged for a short-lived access
    token (sent as `Bearer`), refreshed shortly before it expires. Thread safe.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._client: LabelStudio | None = None
        self._access: str = ""
        self._expires_at = 0.0

    def get(self) -> str:
        _require_credentials(self.settings)
        api_key = self.settings.label_studio_api_key
        if not is_personal_access_token(api_key):
            return api_key
        with self._lock:
            if time.time() < self._expires_at - TOKEN_REFRESH_MARGIN_S:
                return self._access
            if self._client is None:
                self._client = make_client(self.settings)
            try:
                access = self._client.tokens.refresh(refresh=api_key).access
            except Exception as exc:
                raise LabelStudioUnavailable(
                    f"Could not exchange the personal access token at {self.settings.label_studio_url} "
                    f"({exc}). Check LABEL_STUDIO_URL and that the token is not revoked."
                ) from None
            claims = jwt.decode(access, options={"verify_signature": False})
            self._access, self._expires_at = access, float(claims.get("exp", time.time() + 60))
            return self._access
