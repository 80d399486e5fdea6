"""Fetch one task's media bytes, through the SDK's media helpers, within limits.

The SDK's `get_local_path` knows every URL kind Label Studio puts in tasks (uploads, local files,
cloud URIs presigned through the task, plain http(s)). We route its downloads through a session
that applies the SSRF guard (`backend.labelstudio.ssrf`: scheme, host and address policy on every redirect
hop and on every socket) and limits on size and wall-clock time, and its local-files lookups
through a resolver rooted at LOCAL_FILES_DOCUMENT_ROOT.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import shutil
import stat
import tempfile
from urllib.parse import unquote, urlparse

import requests
from label_studio_sdk._extensions.label_studio_tools.core.utils import io as ls_io

from backend.common.errors import HeadstartError, MediaError
from backend.labelstudio.client import MediaToken
from backend.common.settings import Settings
from backend.labelstudio.ssrf import FetchGuard, GuardedAdapter, HostPolicy

MAX_REDIRECTS = 3
# Label Studio 1.23's own media routes (data_import/urls.py, io_storages/urls.py): the only paths its token goes to
LABEL_STUDIO_MEDIA_PATH = re.compile(
    r"^/(?:data/upload/|storage-data/uploaded/|data/local-files/?$|(?:tasks|projects)/\d+/(?:resolve|presign)/?$)")
CHUNK_BYTES = 1 << 16


class LimitedSession(requests.Session):
    """A requests session that refuses disallowed URLs and addresses, big bodies and slow servers."""

    def __init__(self, *, guard: FetchGuard, max_bytes: int):
        super().__init__()
        self.guard = guard
        self.max_bytes = max_bytes
        self.max_redirects = MAX_REDIRECTS
        self.trust_env = False  # no proxies or .netrc from the environment
        self.headers["Accept-Encoding"] = "identity"  # the bytes on the wire are the bytes we count
        adapter = GuardedAdapter(guard)
        self.mount("http://", adapter)
        self.mount("https://", adapter)
        self.hooks["response"].append(self._bound_body)

    def send(self, request, **kwargs):
        """Called for the first request and again for every redirect hop."""
        host, port = self.guard.policy.check_url(request.url)
        self.guard.policy.addresses(host, port)  # refuse before connecting, with the reason
        kwargs["stream"] = True
        kwargs["timeout"] = self.guard.remaining()
        return super().send(request, **kwargs)

    def _bound_body(self, response: requests.Response, **kwargs) -> requests.Response:
        """Response hook, run on each hop before requests follows a redirect (and reads its body)."""
        if response.is_redirect:
            _discard_body(response)
        else:
            _read_bounded(response, self.max_bytes)
        if self.guard.expired:  # the deadline cut the connection: whatever arrived is incomplete
            raise self.guard.timeout_error()
        return response


def _discard_body(response: requests.Response) -> None:
    """A redirect's body is never needed (and may be endless): drop the connection unread."""
    response.close()
    response._content = b""
    response._content_consumed = True


def _read_bounded(response: requests.Response, max_bytes: int) -> None:
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        response.close()
        raise MediaError(f"Media is {declared} bytes, above MEDIA_MAX_BYTES={max_bytes}; refused.")
    body = bytearray()
    for chunk in response.iter_content(CHUNK_BYTES):
        body += chunk
        if len(body) > max_bytes:
            response.close()
            raise MediaError(f"Media is larger than MEDIA_MAX_BYTES={max_bytes}; refused.")
    response._content = bytes(body)
    response._content_consumed = True


def _is_local_storage_url(url: str) -> bool:
    """A Label Studio Local Storage URL (`/data/local-files/?d=...`), as the SDK tells them apart."""
    return url.startswith("/data/") and "?d=" in url


def _media_error(url: str, exc: Exception) -> MediaError:
    """A readable MediaError for whatever the SDK or requests raised."""
    shown = url if len(url) <= 200 else url[:200] + "..."
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return MediaError(f"Fetching {shown} failed: HTTP {exc.response.status_code}.")
    if isinstance(exc, requests.TooManyRedirects):
        return MediaError(f"Fetching {shown} failed: more than {MAX_REDIRECTS} redirects; refused.")
    if isinstance(exc, requests.RequestException):
        return MediaError(f"Fetching {shown} failed: {type(exc).__name__}: {exc}")
    if isinstance(exc, (OSError, ValueError)):
        return MediaError(f"Media {shown} is not available: {exc}")
    return MediaError(f"Media {shown} could not be resolved: {exc}")  # the SDK raises bare Exception too


class MediaFetcher:
    """Resolves and reads task media. One per process; thread safe."""

    def __init__(self, settings: Settings, token: MediaToken | None = None):
        self.settings = settings
        self.token = token or MediaToken(settings)
        self.policy = HostPolicy.from_settings(settings)
        self.scratch_root = settings.model_dir or tempfile.gettempdir()

    def fetch(self, url: str, *, task_id: int | None = None) -> bytes:
        """The bytes behind `url`. Raises MediaError with the reason on any failure."""
        if not isinstance(url, str) or not url.strip():
            raise MediaError("The task has no media URL under the labeling config's data key.")
        if self._local_root() and _is_local_storage_url(url):
            return self._read_local_storage_file(url)
        try:
            scratch = tempfile.mkdtemp(prefix="headstart-media-", dir=self.scratch_root)
        except OSError as exc:
            raise MediaError(f"No scratch folder for media downloads under {self.scratch_root} ({exc}); make "
                             "MODEL_DIR a writable folder.") from None
        guard = FetchGuard(self.policy, self.settings.media_timeout_s)
        session = LimitedSession(guard=guard, max_bytes=self.settings.media_max_bytes)
        try:
            # an installed resolver that answers None means "denied", so install one only with a root
            resolver = (ls_io.local_files_resolver(self._resolve_local_file) if self._local_root()
                        else contextlib.nullcontext())
            with guard, ls_io.http_session(session), resolver:
                path = ls_io.get_local_path(
                    url, cache_dir=scratch, hostname=self.settings.label_studio_url or None,
                    access_token=self._token_for(url), task_id=task_id,
                )
            if guard.expired:
                raise guard.timeout_error()
            return self._read_file(path)
        except MediaError:
            raise
        except HeadstartError as exc:  # e.g. no LABEL_STUDIO_API_KEY, or Label Studio down: this task fails
            raise MediaError(str(exc)) from None
        except Exception as exc:
            if guard.expired:
                raise guard.timeout_error() from None
            raise _media_error(url, exc) from None
        finally:
            session.close()
            shutil.rmtree(scratch, ignore_errors=True)

    def _read_local_storage_file(self, url: str) -> bytes:
        """A `/data/local-files/?d=` file read in place under LOCAL_FILES_DOCUMENT_ROOT: no scratch copy, no
        HTTP session (the SDK's path copies every file into a temporary folder first)."""
        try:
            with ls_io.local_files_resolver(self._resolve_local_file):
                path = ls_io.resolve_local_storage_file(url)  # parses `d` as Label Studio's view does
            return self._read_file(path)
        except MediaError:
            raise
        except Exception as exc:
            raise _media_error(url, exc) from None

    def _token_for(self, url: str) -> str | None:
        """Label Studio's token, for its own media routes only: never for another host, nor for any other
        path of its host (a task URL pointing at /api/... would otherwise act with the token)."""
        if not (ls_io.is_cloud_storage_uri(url) or url.startswith("upload/") or self._is_label_studio_media(url)):
            return None
        if url.startswith("/data/local-files") and self._local_root():
            return None
        return self.token.get()

    def _is_label_studio_media(self, url: str) -> bool:
        parsed = urlparse(url)
        relative = url.startswith("/") and not url.startswith("//")
        on_label_studio = relative or bool(
            self.settings.label_studio_url and parsed.scheme in ("http", "https")
            and parsed.netloc == urlparse(self.settings.label_studio_url).netloc)
        path = unquote(parsed.path)
        if not on_label_studio or ".." in path.split("/") or "\\" in path:
            return False
        return bool(LABEL_STUDIO_MEDIA_PATH.match(posixpath.normpath(path) + ("/" if path.endswith("/") else "")))

    def _local_root(self) -> str | None:
        root = self.settings.local_files_document_root
        if not root or os.path.abspath(root) == os.path.abspath(os.sep):
            return None
        return os.path.abspath(root)

    def _resolve_local_file(self, relative_path: str) -> str:
        """The file under LOCAL_FILES_DOCUMENT_ROOT a `?d=` path names; never a path outside it."""
        root = self._local_root()
        try:
            path = ls_io.safe_build_path(root, os.path.normpath(relative_path).lstrip("/"))
        except ValueError:
            raise MediaError(f"Local file path {relative_path[:200]!r} escapes LOCAL_FILES_DOCUMENT_ROOT; "
                             "refused.") from None
        real_root, real_path = os.path.realpath(root), os.path.realpath(path)
        if os.path.commonpath([real_root, real_path]) != real_root:  # a symbolic link inside the root
            raise MediaError(f"Local file {relative_path[:200]!r} is a link to a place outside "
                             "LOCAL_FILES_DOCUMENT_ROOT; refused.")
        path = real_path
        try:
            info = os.stat(path)
        except (OSError, ValueError) as exc:
            raise MediaError(f"Local file {relative_path[:200]!r} is not available: {exc}") from None
        if not stat.S_ISREG(info.st_mode):
            raise MediaError(f"Local file {relative_path[:200]!r} is not a regular file; refused.")
        self._check_size(info.st_size)  # before the SDK copies it anywhere
        return path

    def _check_size(self, size: int) -> None:
        if size > self.settings.media_max_bytes:
            raise MediaError(f"Media is {size} bytes, above MEDIA_MAX_BYTES={self.settings.media_max_bytes}; "
                             "refused.")

    def _read_file(self, path: str) -> bytes:
        self._check_size(os.path.getsize(path))
        with open(path, "rb") as handle:
            return handle.read(self.settings.media_max_bytes + 1)
