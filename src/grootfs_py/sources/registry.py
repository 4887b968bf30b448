"""Images from a registry (Docker registry HTTP API v2 / OCI distribution): ``docker://``.

The manifest is fetched on every create (tags move); the image config is
content-addressed, so it is kept in a small cache and fetched once; layers
are opened lazily, so a layer already in the store is never requested.

Auth: anonymous, HTTP basic, or the bearer-token flow. A request answered
401 with ``WWW-Authenticate: Bearer realm=..,service=..,scope=..`` is
repeated with a token from the realm (asked with the user's credentials
when there are some); ``Basic`` gets the credentials directly. Credentials
and tokens only ever go into request headers: never into a log line, an
error message or a child's argv.

TLS: verified against the system CAs (OpenSSL's default paths, so
``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` apply) unless the registry is listed as
insecure, which allows unverified TLS and then plain HTTP. The directory
``create.remote_layer_client_certificates_path`` is laid out as Docker's
``certs.d``: ``<dir>/<host:port>/`` holds a client certificate (``*.cert``
with its ``.key``) and CAs trusted besides the system's (``*.crt``); files
directly in ``<dir>`` serve every registry without a directory of its own
(the BOSH job renders its ``grootfs.tls.*`` properties there, and remote
layers read them too); both follow GrootFS's rules
(:func:`.transport.tls_files`). The HTTP itself is :mod:`.transport`'s.

Faults: every request has a timeout per socket operation and is retried
with backoff on connection errors, timeouts and 5xx; a blob cut off
mid-way is resumed with a Range request (or re-read and skipped to where it
stopped if the registry ignores Range), so the stream handed to the
unpacker never repeats or loses a byte. The blob stream is
:class:`.download.BlobReader`, shared with remote layers of OCI layouts.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import time
from typing import Any, BinaryIO, cast
from urllib.parse import urlencode, urlsplit

from grootfs_py import log
from grootfs_py.errors import ImageSourceError
from grootfs_py.sources import Image, SourceOptions
from grootfs_py.sources import manifest as m
from grootfs_py.sources.download import (
    ATTEMPTS,
    BACKOFF_SECONDS,
    CONNECT_TIMEOUT,
    RETRY_STATUSES,
    USER_AGENT,
    BlobReader,
    Retry,
    read_timeout,
)
from grootfs_py.sources.reference import Reference, parse
from grootfs_py.sources.transport import (
    Response,
    TLSError,
    TLSSetupError,
    Transport,
    TransportError,
    basic_auth,
    tls_files,
)

INSECURE_MESSAGE = (
    "This registry is insecure. To pull images from this registry, "
    "please use the --insecure-registry option."
)
AUTH_FAILED_MESSAGE = "authorization failed: username and password are invalid"

MANIFEST_ACCEPT = ", ".join((*m.MANIFESTS, *m.INDEXES, *m.DOCKER_SCHEMA1))


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="x",service="y"`` -> ("bearer", {"realm": "x", "service": "y"})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        key.lower(): (value[1:-1].replace('\\"', '"') if value.startswith('"') else value)
        for key, value in re.findall(r'(\w+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)', rest)
    }
    return scheme.lower(), params


def _matches(registry: str, patterns: tuple[str, ...]) -> bool:
    host = registry.rsplit(":", 1)[0] if not registry.endswith("]") else registry
    return any(p in (registry, host) for p in patterns)


def _tls_files(certs_path: str, registry: str) -> tuple[tuple[str, str] | None, tuple[str, ...]]:
    """The client certificate and key, and the extra CA files, for *registry*.

    ``<certs_path>/<host:port>/`` when it exists (Docker's certs.d), else the
    files directly in *certs_path*, which remote layers of OCI layouts use too.
    """
    if not certs_path:
        return None, ()
    directory = os.path.join(certs_path, registry.replace("/", "_"))
    if not os.path.isdir(directory):
        directory = certs_path
    try:
        return tls_files(directory)
    except TLSSetupError as exc:
        raise ImageSourceError(str(exc)) from None


class Client:
    """One registry and repository, shared by the threads that fetch its layers."""

    def __init__(self, ref: Reference, options: SourceOptions) -> None:
        self.ref = ref
        self.insecure = _matches(ref.registry, options.insecure_registries)
        self.scheme = "https"
        self.cert, cas = _tls_files(options.client_certificates_path, ref.registry)
        self.transport = Transport(
            verify=not self.insecure,
            client_cert=self.cert,
            ca_files=cas,
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=read_timeout(),
            user_agent=USER_AGENT,
        )
        self._username = options.username
        self._password = options.password
        self._authorization: str | None = None
        self._auth_lock = threading.Lock()

    # -- requests, retries, auth -------------------------------------------------------

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.ref.registry}/v2/{self.ref.repository}/{path}"

    def get(self, path: str, what: str, headers: dict[str, str] | None = None) -> Response:
        """GET with retries and auth; the response is streamed and has a 2xx status."""
        delay = BACKOFF_SECONDS
        authorized_again = False
        last = ""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                response = self._send(path, headers or {})
                if response.status == 401 and not authorized_again:
                    # No token yet, or it expired: answer the challenge once and repeat.
                    authorized_again = True
                    self._authorize(response)
                    response.close()
                    response = self._send(path, headers or {})
            except Retry as exc:
                last = str(exc)
            else:
                status = response.status
                if 200 <= status < 300:
                    return response
                if status not in RETRY_STATUSES:
                    self._fail(response, what)
                last = f"HTTP {status}"
                response.close()
            if attempt < ATTEMPTS:
                log.info(
                    "registry request failed, retrying",
                    registry=self.ref.registry,
                    what=what,
                    reason=last,
                    attempt=attempt,
                )
                import random  # only on this slow path

                time.sleep(delay * (1 + random.random() / 4))
                delay *= 2
        raise ImageSourceError(
            f"pull {self.ref}: registry {self.ref.registry}: get {what}: {last} "
            f"(tried {ATTEMPTS} times)"
        )

    def _send(self, path: str, headers: dict[str, str]) -> Response:
        url = path if "://" in path else self.url(path)
        if self._authorization:
            headers = {**headers, "Authorization": self._authorization}
        try:
            return self.transport.get(url, headers)
        except TLSSetupError as exc:
            raise ImageSourceError(f"pull {self.ref}: {exc}") from None
        except TLSError as exc:
            if self.insecure and self.scheme == "https" and "://" not in path:
                # Listed as insecure: a registry without TLS is allowed to speak HTTP.
                log.info("registry has no TLS, using plain HTTP", registry=self.ref.registry)
                self.scheme = "http"
                return self._send(path, headers)
            raise self._tls_error(exc) from None
        except TransportError as exc:
            raise Retry(str(exc)) from None

    def _tls_error(self, exc: BaseException) -> ImageSourceError:
        text = str(exc)
        if "CERTIFICATE_VERIFY_FAILED" in text or "WRONG_VERSION_NUMBER" in text:
            return ImageSourceError(INSECURE_MESSAGE)
        if any(alert in text for alert in ("ALERT_BAD_CERTIFICATE", "CERTIFICATE_REQUIRED")):
            why = (
                f"the registry refused the client certificate {self.cert[0]}"
                if self.cert
                else "the registry requires a client certificate and none is configured "
                "for it (create.remote_layer_client_certificates_path)"
            )
        else:
            match = re.search(r"\[SSL: ([A-Z_]+)\]", text) or re.search(r"alert ([a-z ]+)", text)
            why = match.group(1).lower().replace("_", " ") if match else "handshake failed"
        return ImageSourceError(f"pull {self.ref}: registry {self.ref.registry}: TLS: {why}")

    def _authorize(self, response: Response) -> None:
        scheme, params = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        with self._auth_lock:
            if scheme == "basic":
                if not self._username:
                    raise self._auth_required()
                self._authorization = basic_auth(self._username, self._password)
            elif scheme == "bearer" and params.get("realm"):
                self._authorization = "Bearer " + self._token(params)
            else:
                raise ImageSourceError(
                    f"pull {self.ref}: registry {self.ref.registry} asks for "
                    f"unsupported authentication `{scheme or 'none'}`"
                )

    def _token(self, params: dict[str, str]) -> str:
        realm = params["realm"]
        if urlsplit(realm).scheme not in ("http", "https"):
            raise ImageSourceError(f"pull {self.ref}: token realm is not an http(s) URL")
        query = {"scope": params.get("scope") or f"repository:{self.ref.repository}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        headers = {}
        if self._username:
            headers["Authorization"] = basic_auth(self._username, self._password)
        sep = "&" if "?" in realm else "?"
        last = ""
        delay = BACKOFF_SECONDS
        for attempt in range(1, ATTEMPTS + 1):
            try:
                with self.transport.get(realm + sep + urlencode(query), headers) as response:
                    status, ok = response.status, response.ok
                    body = response.read_all(m.MAX_JSON_BYTES) if ok else b""
            except TLSSetupError as exc:
                raise ImageSourceError(f"pull {self.ref}: {exc}") from None
            except TLSError as exc:
                raise self._tls_error(exc) from None
            except TransportError as exc:
                last = str(exc)
            else:
                if status in (401, 403):
                    raise self._auth_required()
                if ok:
                    try:
                        doc = m.load_json(body, "token answer")
                        token = doc.get("token") or doc.get("access_token")
                    except ImageSourceError:
                        token = None
                    if not isinstance(token, str) or not token:
                        raise ImageSourceError(
                            f"pull {self.ref}: token server {urlsplit(realm).netloc} "
                            "answered without a token"
                        )
                    return token
                last = f"HTTP {status}"
                if status not in RETRY_STATUSES:
                    break
            if attempt < ATTEMPTS:
                time.sleep(delay)
                delay *= 2
        raise ImageSourceError(f"pull {self.ref}: token server {urlsplit(realm).netloc}: {last}")

    def _auth_required(self) -> ImageSourceError:
        if self._username:
            return ImageSourceError(AUTH_FAILED_MESSAGE)
        return ImageSourceError(
            f"authorization failed: registry {self.ref.registry} requires credentials "
            f"for {self.ref.repository} (use --username and --password)"
        )

    def _fail(self, response: Response, what: str) -> None:
        status = response.status
        detail = ""
        code = ""
        try:
            body = response.read_all(64 << 10)
            errors = m.load_json(body, "error").get("errors")
            if isinstance(errors, list) and errors and isinstance(errors[0], dict):
                code = str(errors[0].get("code", ""))
                detail = str(errors[0].get("message", ""))
        except Exception:
            pass
        finally:
            response.close()
        if status == 401:
            raise self._auth_required()
        if status == 404 or code in ("NAME_UNKNOWN", "MANIFEST_UNKNOWN", "BLOB_UNKNOWN"):
            raise ImageSourceError(
                f"image docker://{self.ref} not found: {what}: {detail or 'not found'}"
            )
        if status == 403:
            raise ImageSourceError(f"pull {self.ref}: access to {what} denied")
        raise ImageSourceError(
            f"pull {self.ref}: registry {self.ref.registry}: get {what}: "
            f"HTTP {status}{': ' + detail if detail else ''}"
        )

    # -- manifests, configs, blobs ------------------------------------------------------

    def fetch_small(
        self, path: str, what: str, headers: dict[str, str] | None = None
    ) -> tuple[bytes, str]:
        """A whole small document (manifest, config) and its Content-Type, with retries."""
        delay = BACKOFF_SECONDS
        for attempt in range(1, ATTEMPTS + 1):
            response = self.get(path, what, headers)
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
            try:
                data = response.read_all(m.MAX_JSON_BYTES)
            except TransportError as exc:
                reason = str(exc)
                if attempt == ATTEMPTS:
                    raise ImageSourceError(
                        f"pull {self.ref}: registry {self.ref.registry}: read {what}: "
                        f"{reason} (tried {ATTEMPTS} times)"
                    ) from None
                log.info("registry read failed, retrying", what=what, reason=reason)
                time.sleep(delay)
                delay *= 2
                continue
            finally:
                response.close()
            if len(data) > m.MAX_JSON_BYTES:
                raise ImageSourceError(f"pull {self.ref}: {what} is too large")
            return bytes(data), content_type
        raise AssertionError("unreachable")

    def manifest(self, reference: str, digest: str | None) -> tuple[dict[str, Any], str]:
        """The manifest (or index) named by a tag or digest, and its media type."""
        data, content_type = self.fetch_small(
            f"manifests/{reference}", f"manifest {reference}", {"Accept": MANIFEST_ACCEPT}
        )
        if digest is not None:
            algorithm, _, expected = digest.partition(":")
            if hashlib.new(algorithm, data).hexdigest() != expected:
                raise ImageSourceError(f"pull {self.ref}: manifest {digest}: digest mismatch")
        doc = m.load_json(data, "manifest")
        return doc, m.media_type_of(doc, content_type)

    def config(self, desc: m.Descriptor, cache_dir: str) -> dict[str, Any]:
        if desc.size > m.MAX_JSON_BYTES:
            raise ImageSourceError(f"pull {self.ref}: image config is too large")
        algorithm, _, expected = desc.digest.partition(":")
        cached = os.path.join(cache_dir, f"{algorithm}-{expected}.json") if cache_dir else ""
        if cached:
            try:
                with open(cached, "rb") as f:
                    data = f.read(m.MAX_JSON_BYTES + 1)
                if hashlib.new(algorithm, data).hexdigest() == expected:
                    return m.load_json(data, "image config")
            except OSError:
                pass
        data, _ = self.fetch_small(f"blobs/{desc.digest}", f"image config {desc.digest}")
        if len(data) != desc.size or hashlib.new(algorithm, data).hexdigest() != expected:
            raise ImageSourceError(f"pull {self.ref}: image config {desc.digest}: digest mismatch")
        doc = m.load_json(data, "image config")
        if cached:
            _write_cache(cached, data)
        return doc

    def open_blob(self, desc: m.Descriptor) -> BinaryIO:
        what = f"layer {desc.digest}"

        def get(headers: dict[str, str]) -> Response:
            return self.get(f"blobs/{desc.digest}", what, headers)

        where = f"pull {self.ref}: registry {self.ref.registry}"
        return cast(BinaryIO, BlobReader(get, where=where, what=what))


def _write_cache(path: str, data: bytes) -> None:
    """Write a cache entry under a temporary name; a failed write only costs a refetch."""
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
        os.rename(tmp, path)
    except OSError as exc:
        log.info("image config not cached", path=path, error=exc.strerror)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def load(url: str, options: SourceOptions) -> Image:
    ref = parse(url)
    client = Client(ref, options)
    doc, media_type = client.manifest(ref.reference, ref.digest)
    if media_type in m.INDEXES:
        desc = m.select_platform(doc)
        doc, media_type = client.manifest(desc.digest, desc.digest)
    manifest = m.parse_manifest(doc, media_type)
    config = m.parse_config(client.config(manifest.config, options.cache_dir), len(manifest.layers))
    return m.image(manifest, config, client.open_blob)
