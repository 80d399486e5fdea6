"""Fetch one task's media bytes, through the SDK's media helpers, within limits.

The SDK's `get_local_path` knows every URL kind Label Studio puts in tasks (uploads, local files,
cloud URIs presigned through the task, plain http(s)). We route its downloads through a session
that enforces scheme, host, size and time limits, and its local-files lookups through a resolver
rooted at LOCAL_FILES_DOCUMENT_ROOT.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from urllib.parse import urlparse

import requests
from label_studio_sdk._extensions.label_studio_tools.core.utils import io as ls_io

from backend.errors import HeadstartError, MediaError
from backend.label_studio import MediaToken
from backend.settings import Settings

MAX_REDIRECTS = 3
CHUNK_BYTES = 1 << 16


class LimitedSession(requests.Session):
    """A requests session that refuses non-http(s) URLs, big bodies and slow servers."""

    def __init__(self, *, max_bytes: int, timeout_s: float):
        super().__init__()
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.max_redirects = MAX_REDIRECTS
        self.trust_env = False

    def request(self, method, url, **kwargs):
        kwargs["timeout"] = self.timeout_s
        return super().request(method, url, **kwargs)

    def send(self, request, **kwargs):
        scheme = urlparse(request.url).scheme
        if scheme not in ("http", "https"):
            raise MediaError(f"Media URL scheme {scheme!r} is not allowed; use http(s).")
        kwargs["stream"] = True
        response = super().send(request, **kwargs)
        if not response.is_redirect:
            _read_bounded(response, self.max_bytes, self.timeout_s)
        return response


def _read_bounded(response: requests.Response, max_bytes: int, timeout_s: float) -> None:
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        response.close()
        raise MediaError(f"Media is {declared} bytes, above MEDIA_MAX_BYTES={max_bytes}.")
    deadline = time.monotonic() + timeout_s
    body = bytearray()
    for chunk in response.iter_content(CHUNK_BYTES):
        body += chunk
        if len(body) > max_bytes:
            response.close()
            raise MediaError(f"Media is larger than MEDIA_MAX_BYTES={max_bytes}.")
        if time.monotonic() > deadline:
            response.close()
            raise MediaError(f"Media download took longer than MEDIA_TIMEOUT_S={timeout_s}.")
    response._content = bytes(body)
    response._content_consumed = True


class MediaFetcher:
    """Resolves and reads task media. One per process; thread safe."""

    def __init__(self, settings: Settings, token: MediaToken | None = None):
        self.settings = settings
        self.token = token or MediaToken(settings)
        self.scratch_root = settings.model_dir or tempfile.gettempdir()

    def fetch(self, url: str, *, task_id: int | None = None) -> bytes:
        """The bytes behind `url`. Raises MediaError with the reason on any failure."""
        if not isinstance(url, str) or not url.strip():
            raise MediaError("The task has no media URL under the labeling config's data key.")
        scratch = tempfile.mkdtemp(prefix="headstart-media-", dir=self.scratch_root)
        session = LimitedSession(max_bytes=self.settings.media_max_bytes, timeout_s=self.settings.media_timeout_s)
        try:
            # an installed resolver that answers None means "denied", so install one only with a root
            resolver = (ls_io.local_files_resolver(self._resolve_local_file) if self._local_root()
                        else contextlib.nullcontext())
            with ls_io.http_session(session), resolver:
                path = ls_io.get_local_path(
                    url, cache_dir=scratch, hostname=self.settings.label_studio_url or None,
                    access_token=self._token_for(url), task_id=task_id,
                )
            return self._read_file(path)
        except HeadstartError:
            raise
        except requests.HTTPError as exc:
            raise MediaError(f"Fetching {url} failed: HTTP {exc.response.status_code}.") from None
        except requests.RequestException as exc:
            raise MediaError(f"Fetching {url} failed: {type(exc).__name__}: {exc}") from None
        except (OSError, ValueError) as exc:
            raise MediaError(f"Media {url} is not available: {exc}") from None
        except Exception as exc:  # the SDK raises bare Exception for some URL kinds
            raise MediaError(f"Media {url} could not be resolved: {exc}") from None
        finally:
            session.close()
            shutil.rmtree(scratch, ignore_errors=True)

    def _token_for(self, url: str) -> str | None:
        needs_label_studio = url.startswith(("/", "upload")) or ls_io.is_cloud_storage_uri(url) or (
            self.settings.label_studio_url and urlparse(url).netloc == urlparse(self.settings.label_studio_url).netloc
        )
        if not needs_label_studio:
            return None
        if url.startswith("/data/local-files") and self._local_root():
            return None
        return self.token.get()

    def _local_root(self) -> str | None:
        root = self.settings.local_files_document_root
        if not root or os.path.abspath(root) == os.path.abspath(os.sep):
            return None
        return os.path.abspath(root)

    def _resolve_local_file(self, relative_path: str) -> str:
        root = self._local_root()
        try:
            return ls_io.safe_build_path(root, os.path.normpath(relative_path).lstrip("/"))
        except ValueError:
            raise MediaError(f"Local file path {relative_path!r} escapes LOCAL_FILES_DOCUMENT_ROOT.") from None

    def _read_file(self, path: str) -> bytes:
        size = os.path.getsize(path)
        if size > self.settings.media_max_bytes:
            raise MediaError(f"Media is {size} bytes, above MEDIA_MAX_BYTES={self.settings.media_max_bytes}.")
        with open(path, "rb") as handle:
            return handle.read()
