"""The SSRF guard: which hosts and addresses a media download may reach, and for how long.

Task data is written by whoever can import tasks into Label Studio, so a media URL is untrusted
input that makes this process open connections. The policy:

- only http and https;
- trusted hosts may resolve to any address: LABEL_STUDIO_URL's host and port (Label Studio often
  runs on 127.0.0.1 or a private network) and each MEDIA_ALLOWED_HOSTS entry (`host` for any
  port, `host:port` for that port only);
- any other host is reached only when MEDIA_PUBLIC_HOSTS is on and every address it resolves to is
  public: loopback, private, link-local (cloud metadata at 169.254.169.254), shared (100.64/10),
  multicast, reserved and unspecified addresses are refused, also when written as an IPv4-mapped,
  6to4 or NAT64 IPv6 address;
- the check runs on every redirect hop, and again on the address each socket actually dials, so a
  DNS answer that changes between the check and the connection (rebinding) cannot slip through;
- one fetch has one wall-clock deadline: when it passes, its sockets are shut down, so a server
  that trickles bytes (or headers) cannot hold a thread longer than MEDIA_TIMEOUT_S.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from requests.adapters import HTTPAdapter
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from backend.common.errors import MediaError
from backend.common.settings import Settings

ALLOWED_SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
NAT64 = ipaddress.ip_network("64:ff9b::/96")


def is_public_address(address: str) -> bool:
    """True for a globally routable unicast address (what any public web server has)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (
            ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in NAT64 else None)
        if embedded is not None:
            return is_public_address(str(embedded))
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified or ip.is_link_local)


def _shown(host: str, port: int | None) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _host_port(netloc_or_url: str, default_port: int | None) -> tuple[str, int | None]:
    parts = urlsplit(netloc_or_url if "//" in netloc_or_url else f"//{netloc_or_url}")
    return (parts.hostname or "").rstrip(".").lower(), parts.port or default_port


@dataclass(frozen=True)
class HostPolicy:
    """Which (host, port) pairs are trusted, and whether other public hosts are allowed."""

    trusted: frozenset[tuple[str, int | None]] = frozenset()
    allow_public: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> "HostPolicy":
        trusted = set()
        if settings.label_studio_url:
            scheme = urlsplit(settings.label_studio_url).scheme.lower()
            trusted.add(_host_port(settings.label_studio_url, DEFAULT_PORTS.get(scheme)))
        trusted.update(_host_port(entry, None) for entry in settings.media_allowed_hosts)
        return cls(trusted=frozenset(pair for pair in trusted if pair[0]), allow_public=settings.media_public_hosts)

    def is_trusted(self, host: str, port: int | None) -> bool:
        host = host.strip("[]").rstrip(".").lower()
        return (host, port) in self.trusted or (host, None) in self.trusted

    def check_url(self, url: str) -> tuple[str, int]:
        """(host, port) of `url` if its scheme and host may be fetched at all; else MediaError."""
        try:
            parts = urlsplit(url)
            scheme, host, port = parts.scheme.lower(), (parts.hostname or ""), parts.port
        except ValueError as exc:
            raise MediaError(f"Refused media URL {url[:200]!r}: {exc}.") from None
        if scheme not in ALLOWED_SCHEMES:
            raise MediaError(f"Refused media URL scheme {scheme or 'none'!r}: only http(s) media is fetched.")
        if not host:
            raise MediaError(f"Refused media URL {url[:200]!r}: it names no host.")
        return host.rstrip(".").lower(), port or DEFAULT_PORTS[scheme]

    def addresses(self, host: str, port: int) -> list[str]:
        """The addresses a connection to host:port may dial, or MediaError naming why none may."""
        if self.is_trusted(host, port):
            return [host]
        if not self.allow_public:
            raise MediaError(f"Refused media host {_shown(host, port)}: it is not LABEL_STUDIO_URL's host and not "
                             "in MEDIA_ALLOWED_HOSTS (and MEDIA_PUBLIC_HOSTS is off).")
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise MediaError(f"Media host {host!r} does not resolve ({exc}).") from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        blocked = [address for address in addresses if not is_public_address(address)]
        if blocked or not addresses:
            raise MediaError(
                f"Refused media host {_shown(host, port)}: it resolves to non-public address "
                f"{blocked[0] if blocked else '(none)'} (loopback, private, link-local or metadata). If this is "
                "your own media server, add it to MEDIA_ALLOWED_HOSTS."
            )
        return addresses


class FetchGuard:
    """One fetch's policy and deadline. Sockets opened under it are shut down when the deadline passes."""

    def __init__(self, policy: HostPolicy, timeout_s: float):
        self.policy = policy
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.expired = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(timeout_s, self.expire)
        self._timer.daemon = True

    def __enter__(self) -> "FetchGuard":
        self._timer.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._timer.cancel()

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0 or self.expired:
            raise self.timeout_error()
        return left

    def timeout_error(self) -> MediaError:
        return MediaError(f"Media download took longer than MEDIA_TIMEOUT_S={self.timeout_s:g}s; refused.")

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def dial(self, connection: HTTPConnection, dial_name) -> socket.socket:
        """Open `connection`'s socket to an allowed address of its host (`dial_name` does the connect)."""
        host = connection._dns_host  # the name urllib3 would resolve; TLS still verifies `connection.host`
        last_error: Exception | None = None
        for address in self.policy.addresses(host, connection.port):
            self.remaining()
            connection._dns_host = address
            try:
                sock = dial_name()
            except (OSError, Urllib3Error) as exc:  # refused, unreachable, timed out: try the next address
                last_error = exc
                continue
            finally:
                connection._dns_host = host
            with self._lock:
                if not self.expired:
                    self._sockets.append(sock)
                    return sock
            sock.close()
            raise self.timeout_error()
        raise last_error or MediaError(f"Media host {host} has no address to connect to.")


class _GuardedHTTPConnection(HTTPConnection):
    def __init__(self, *args, fetch_guard: FetchGuard, **kwargs):
        super().__init__(*args, **kwargs)
        self._fetch_guard = fetch_guard

    def _new_conn(self) -> socket.socket:
        return self._fetch_guard.dial(self, super()._new_conn)


class _GuardedHTTPSConnection(HTTPSConnection):
    def __init__(self, *args, fetch_guard: FetchGuard, **kwargs):
        super().__init__(*args, **kwargs)
        self._fetch_guard = fetch_guard

    def _new_conn(self) -> socket.socket:
        return self._fetch_guard.dial(self, super()._new_conn)


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class GuardedAdapter(HTTPAdapter):
    """A requests adapter whose every connection is opened through `guard`."""

    def __init__(self, guard: FetchGuard):
        self.guard = guard
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": self._pool(_GuardedHTTPPool),
                                                   "https": self._pool(_GuardedHTTPSPool)}

    def _pool(self, pool_class):
        def build(host, port=None, **kwargs):
            pool = pool_class(host, port, **kwargs)
            pool.conn_kw["fetch_guard"] = self.guard
            return pool
        return build
