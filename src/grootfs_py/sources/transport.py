"""HTTP GETs for the registry client, on the standard library's ``http.client``.

Why not requests: importing it (urllib3, charset_normalizer, idna, cookies,
email) took ~100 ms of a warm ``create docker://`` that otherwise needs
~60 ms, and Garden calls create for every container. This module does the
little a registry client needs and nothing more:

- one connection per request, closed with its response (a pull makes a
  handful of requests, each layer's on its own thread);
- TLS verified against OpenSSL's default paths (so ``SSL_CERT_FILE`` and
  ``SSL_CERT_DIR`` apply) plus any CA files given, or unverified for a registry the operator listed
  as insecure; an optional client certificate; ``ssl`` is imported only for
  an https URL;
- a connect timeout, then a timeout per socket operation, so a slow but
  moving download is never cut off and a silent one is;
- redirects (Docker Hub sends blobs to a CDN), with the Authorization
  header dropped when one leaves the host;
- ``http_proxy`` / ``https_proxy`` / ``no_proxy`` from the environment, as
  requests and Go's net/http honour them (https through a CONNECT tunnel;
  no_proxy entries are names, matching themselves and their subdomains,
  optionally with a port, IP networks in CIDR form, or ``*``).

Failures come out as three kinds: :class:`TLSError` (the handshake or
certificate was refused: retrying cannot help), :class:`TransportError`
(refused, reset, timed out, cut short: worth retrying) and
:class:`TLSSetupError` (a configured certificate file is unusable), each
with a short reason and never a header or a credential.
"""

from __future__ import annotations

import base64
import http.client
import os
import sys
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

MAX_REDIRECTS = 5
REDIRECTS = frozenset((301, 302, 303, 307, 308))


# A context with the system CAs loaded (~35 ms), made by a fork server before
# forking, with the CA environment it was made under. A child takes it once:
# a second transport in the same process may add other CAs or a client
# certificate, so it builds its own.
_preloaded: tuple[tuple[str | None, str | None], Any] | None = None


def _ca_environment() -> tuple[str | None, str | None]:
    return os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")


def preload_default_context() -> None:
    """Load OpenSSL's default CAs now, for the first verifying transport to reuse."""
    global _preloaded
    import ssl

    _preloaded = (_ca_environment(), ssl.create_default_context())


def _take_preloaded() -> Any:
    global _preloaded
    if _preloaded is None:
        return None
    environment, context = _preloaded
    _preloaded = None
    # The caller's SSL_CERT_FILE / SSL_CERT_DIR may name other CAs than the server's.
    return context if environment == _ca_environment() else None


class TransportError(Exception):
    """The connection failed or broke; ``str()`` is a short reason."""


class TLSError(Exception):
    """TLS was refused: an unverifiable certificate, a missing client certificate, no TLS."""


class TLSSetupError(Exception):
    """A configured certificate, key or CA file cannot be used."""


def reason(exc: BaseException) -> str:
    """A short cause for a socket or protocol failure."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError | http.client.RemoteDisconnected):
        return "connection reset"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, http.client.IncompleteRead):
        return "connection closed early"
    if isinstance(exc, OSError):
        return (exc.strerror or str(exc) or type(exc).__name__).lower()
    if isinstance(exc, http.client.HTTPException):
        return "bad HTTP response"
    return type(exc).__name__


def _is_tls_refusal(exc: BaseException) -> bool:
    ssl = sys.modules.get("ssl")
    if ssl is None or not isinstance(exc, ssl.SSLError):
        return False
    # A TLS connection that just ended is a broken connection, not a refusal.
    return not isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError)


def proxy_for(scheme: str, host: str, port: int | None) -> str | None:
    """The proxy URL the environment names for this scheme and host, if any."""
    proxy = os.environ.get(f"{scheme}_proxy") or os.environ.get(f"{scheme.upper()}_PROXY")
    if not proxy:
        return None
    host = host.lower()
    for entry in (os.environ.get("no_proxy") or os.environ.get("NO_PROXY") or "").split(","):
        entry = entry.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return None
        if "/" in entry:
            if _in_network(host, entry):
                return None
            continue
        name, _, entry_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if entry_port and port is not None and entry_port != str(port):
            continue
        name = name.lstrip(".")
        if host == name or host.endswith("." + name):
            return None
    return proxy if "://" in proxy else f"http://{proxy}"


def basic_auth(username: str, password: str) -> str:
    """An HTTP Basic credentials header value."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def _in_network(host: str, cidr: str) -> bool:
    """Whether *host* is an IP address inside *cidr* (a no_proxy entry like 10.0.0.0/8)."""
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")) in ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return False


class Response:
    """A streamed response. Closing it closes its connection."""

    def __init__(self, conn: http.client.HTTPConnection, raw: http.client.HTTPResponse) -> None:
        self._conn = conn
        self._raw = raw
        self.status = raw.status
        self.headers = raw.headers  # case-insensitive .get()

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def read1(self, size: int) -> bytes:
        """What one receive gave (at most *size*); b"" only at the body's real end."""
        try:
            data = self._raw.read1(size)
            if not data and size and self._raw.length:
                # http.client reports a connection closed before Content-Length as EOF.
                raise http.client.IncompleteRead(b"", self._raw.length)
        except (OSError, http.client.HTTPException) as exc:
            raise TransportError(reason(exc)) from None
        return data

    def read_all(self, limit: int) -> bytes:
        """The body, or its first ``limit + 1`` bytes when it is longer than *limit*."""
        data = bytearray()
        while len(data) <= limit:
            chunk = self.read1(limit + 1 - len(data))
            if not chunk:
                break
            data += chunk
        return bytes(data)

    def close(self) -> None:
        self._raw.close()
        self._conn.close()

    def __enter__(self) -> Response:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Transport:
    """How to reach one registry: TLS verification, client certificate, timeouts."""

    def __init__(
        self,
        *,
        verify: bool,
        client_cert: tuple[str, str] | None,
        ca_files: tuple[str, ...] = (),
        connect_timeout: float,
        read_timeout: float,
        user_agent: str,
    ) -> None:
        self.verify = verify
        self.client_cert = client_cert
        self.ca_files = ca_files
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.user_agent = user_agent
        self._context: Any = None

    def get(self, url: str, headers: dict[str, str] | None = None) -> Response:
        """GET *url*, following redirects; the body is left to stream."""
        headers = dict(headers or {})
        for _ in range(MAX_REDIRECTS + 1):
            response = self._request(url, headers)
            location = response.headers.get("Location")
            if response.status not in REDIRECTS or not location:
                return response
            response.close()
            target = urljoin(url, location)
            old, new = urlsplit(url), urlsplit(target)
            if (old.scheme, old.netloc) != (new.scheme, new.netloc):
                # Credentials are for the registry, never for where it sends us.
                headers.pop("Authorization", None)
            url = target
        raise TransportError(f"more than {MAX_REDIRECTS} redirects")

    def _ssl_context(self) -> Any:
        if self._context is None:
            import ssl

            if self.verify:
                context = _take_preloaded() or ssl.create_default_context()
                for cafile in self.ca_files:
                    try:
                        context.load_verify_locations(cafile=cafile)
                    except (OSError, ssl.SSLError) as exc:
                        raise TLSSetupError(f"CA certificate {cafile}: {exc}") from None
            else:
                # Listed as insecure by the operator: no CA loading, no checks.
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if self.client_cert:
                cert, key = self.client_cert
                try:
                    context.load_cert_chain(cert, key)
                except (OSError, ValueError) as exc:
                    raise TLSSetupError(f"client certificate {cert}: {exc}") from None
            self._context = context
        return self._context

    def _request(self, url: str, headers: dict[str, str]) -> Response:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise TransportError(f"not an http(s) URL: {parts.scheme}://{parts.hostname}")
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        send = {"User-Agent": self.user_agent, **headers}
        proxy = proxy_for(parts.scheme, parts.hostname, parts.port)
        proxy_auth: dict[str, str] = {}
        netloc = parts.netloc.rpartition("@")[2]  # host[:port], without userinfo
        address = netloc
        if proxy:
            proxied = urlsplit(proxy)
            if proxied.username:
                proxy_auth["Proxy-Authorization"] = basic_auth(
                    unquote(proxied.username), unquote(proxied.password or "")
                )
            address = proxied.netloc.rpartition("@")[2]
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(
                address, timeout=self.connect_timeout, context=self._ssl_context()
            )
            if proxy:
                conn.set_tunnel(netloc, headers=proxy_auth)
        else:
            conn = http.client.HTTPConnection(address, timeout=self.connect_timeout)
            if proxy:
                target = url  # absolute form, for the proxy
                send.update(proxy_auth)
        try:
            conn.connect()
            assert conn.sock is not None
            conn.sock.settimeout(self.read_timeout)
            conn.request("GET", target, headers=send)
            return Response(conn, conn.getresponse())
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            if _is_tls_refusal(exc):
                raise TLSError(str(exc)) from None
            raise TransportError(reason(exc)) from None
