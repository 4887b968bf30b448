"""Remote layers: a layer of an OCI layout that names ``urls`` instead of a blob.

Garden's two-layer app images point at the droplet this way (a blobstore
URL, usually https with a client certificate). The bytes go through the same
path as a registry blob: :class:`.download.BlobReader` (resumed with
``Range``, a timeout per socket operation) into the verifying readers,
decompression and the unpacker, nothing written to disk whole.

Certificates come from ``create.remote_layer_client_certificates_path``
with GrootFS's rules (:func:`.transport.tls_files`): Garden renders
``remote-layer.crt`` (CA), ``remote-layer.cert`` and ``remote-layer.key``
there. Error messages name the URL without its user info and query: a
blobstore's signed URL carries its credentials there.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

from grootfs_py import log
from grootfs_py.errors import ImageSourceError
from grootfs_py.sources.download import (
    ATTEMPTS,
    CONNECT_TIMEOUT,
    RETRY_STATUSES,
    USER_AGENT,
    BlobReader,
    Retry,
    backoff,
    read_timeout,
)
from grootfs_py.sources.transport import (
    Response,
    TLSError,
    TLSSetupError,
    Transport,
    TransportError,
    basic_auth,
    tls_files,
)


def shown(url: str) -> str:
    """*url* fit for a log or an error: no user info, no query, no fragment."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class RemoteLayers:
    """Fetches the remote layers of one image, with one TLS setup for all of them."""

    def __init__(self, certificates_path: str) -> None:
        try:
            self.cert, cas = tls_files(certificates_path)
        except TLSSetupError as exc:
            raise ImageSourceError(f"remote layer certificates: {exc}") from None
        self.transport = Transport(
            verify=True,
            client_cert=self.cert,
            ca_files=cas,
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=read_timeout(),
            user_agent=USER_AGENT,
        )

    def open(self, urls: list[str], digest: str) -> BlobReader:
        """A stream of the layer from the first of *urls* (http or https ones)."""
        url = urls[0]
        what = f"layer {digest}"
        where = f"fetch {what} from {shown(url)}"

        def get(headers: dict[str, str]) -> Response:
            return self._get(url, where, headers)

        return BlobReader(get, where=where, what="blob")

    def _get(self, url: str, where: str, headers: dict[str, str]) -> Response:
        """GET with retries of connection errors, timeouts, 408/429/5xx; a 2xx response."""
        parts = urlsplit(url)
        if parts.username is not None:
            # As Go's net/http does for user info in a URL.
            headers = {
                **headers,
                "Authorization": basic_auth(unquote(parts.username), unquote(parts.password or "")),
            }
        last = ""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                response = self.transport.get(url, headers)
            except TLSSetupError as exc:
                raise ImageSourceError(f"{where}: {exc}") from None
            except TLSError as exc:
                raise ImageSourceError(f"{where}: {self._tls_reason(str(exc))}") from None
            except (TransportError, Retry) as exc:
                last = str(exc)
            else:
                if 200 <= response.status < 300:
                    return response
                last = f"HTTP {response.status}"
                if response.status not in RETRY_STATUSES:
                    raise ImageSourceError(f"{where}: {self._refusal(response) or last}")
                response.close()
            if attempt < ATTEMPTS:
                log.info("remote layer request failed, retrying", url=shown(url), reason=last)
                backoff(attempt)
        raise ImageSourceError(f"{where}: {last} (tried {ATTEMPTS} times)")

    def _refusal(self, response: Response) -> str:
        """Why a 4xx came, when it is nginx refusing the client certificate; closes it.

        nginx (Cloud Foundry's WebDAV blobstore) finishes the handshake with
        any certificate and answers 400 with the reason in the page.
        """
        try:
            body = response.read_all(4096) if response.status == 400 else b""
        except TransportError:
            body = b""
        finally:
            response.close()
        if b"No required SSL certificate was sent" in body:
            return self._tls_reason("CERTIFICATE_REQUIRED")
        if b"SSL certificate error" in body:
            return self._tls_reason("ALERT_BAD_CERTIFICATE")
        return ""

    def _tls_reason(self, text: str) -> str:
        if "CERTIFICATE_VERIFY_FAILED" in text:
            return "TLS: the server's certificate does not verify (system CAs and *.crt files)"
        if any(a in text for a in ("ALERT_BAD_CERTIFICATE", "CERTIFICATE_REQUIRED", "UNKNOWN_CA")):
            if self.cert:
                return f"TLS: the server refused the client certificate {self.cert[0]}"
            return (
                "TLS: the server requires a client certificate and none is configured "
                "(create.remote_layer_client_certificates_path)"
            )
        match = re.search(r"\[SSL: ([A-Z_]+)\]", text) or re.search(r"alert ([a-z ]+)", text)
        why = match.group(1).lower().replace("_", " ") if match else "handshake failed"
        return f"TLS: {why}"
