"""A real registry for tests, the demo and the benchmark, plus the parts around it.

- :class:`Registry`: Debian's ``docker-registry`` (the CNCF distribution
  registry) on ``127.0.0.1:<free port>``, with a config file written here:
  anonymous, htpasswd, or token auth; plain HTTP, TLS, TLS requiring client
  certificates. Its access log is kept so tests can count requests.
- :class:`TokenServer`: the bearer-token endpoint a token-auth registry sends
  clients to; it checks a username and password and issues RS256 JWTs that
  the registry verifies against the test certificate.
- :class:`FaultProxy`: an HTTP proxy in front of a registry that can refuse,
  fail (5xx), stall, or reset a blob download half-way, and counts requests.
- :class:`ForwardProxy`: an egress proxy (absolute-form GETs, CONNECT tunnels).
- :func:`make_ca`, :func:`make_cert`: throw-away certificates with ``openssl``.
- :func:`push`: ``skopeo copy`` of an OCI layout into a registry.

Nothing here depends on pytest, so ``bench/`` and ``demo/`` use it too.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import http.server
import json
import os
import re
import selectors
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

REGISTRY_BIN = "docker-registry"
SERVICE = "test-registry"
USER, PASSWORD = "cell", "s3cret-Pa55word"  # what the auth variants accept
ISSUER = "test-token-issuer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False, **kwargs
    )
    if result.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {result.returncode}: {result.stderr.strip()}")
    return result


def _wait_for_port(port: int, proc: subprocess.Popen[bytes] | None, log: Path | None) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"registry exited {proc.returncode}:\n{tail}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after 15 s")


@dataclass(frozen=True)
class Cert:
    cert: Path
    key: Path


def make_ca(directory: Path, name: str = "ca") -> Cert:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
         "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert),
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,digitalSignature"]
    )  # fmt: skip
    return Cert(cert, key)


def make_cert(directory: Path, name: str, ca: Cert, *, server: bool) -> Cert:
    """A certificate signed by *ca*: for 127.0.0.1 (server) or a client."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key, csr = directory / f"{name}.pem", directory / f"{name}.key", directory / f"{name}.csr"
    ext = directory / f"{name}.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
        if server
        else "extendedKeyUsage=clientAuth\n"
    )
    _run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
          "-keyout", str(key), "-out", str(csr)])  # fmt: skip
    _run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca.cert),
          "-CAkey", str(ca.key), "-CAcreateserial", "-days", "2", "-sha256",
          "-extfile", str(ext), "-out", str(cert)])  # fmt: skip
    return Cert(cert, key)


def push(layout: str, tag: str, registry: str, name: str, *, fmt: str | None = None) -> None:
    """Copy the image *tag* of the OCI layout into ``registry/name``; ``fmt`` e.g. v2s2."""
    argv = ["skopeo", "copy", "--quiet", "--all", "--dest-tls-verify=false"]
    if fmt:
        argv += ["--format", fmt]
    _run([*argv, f"oci:{layout}:{tag}", f"docker://{registry}/{name}"])


def put_manifest(registry: str, name: str, reference: str, body: bytes, media_type: str) -> None:
    """PUT a manifest (e.g. a Docker manifest list) into an open plain-HTTP registry."""
    conn = http.client.HTTPConnection(registry, timeout=10)
    try:
        conn.request("PUT", f"/v2/{name}/manifests/{reference}", body, {"Content-Type": media_type})
        response = conn.getresponse()
        text = response.read().decode(errors="replace")
        if response.status != 201:
            raise RuntimeError(f"PUT manifest {name}:{reference}: {response.status} {text}")
    finally:
        conn.close()


class Registry:
    """One ``docker-registry serve`` process on 127.0.0.1.

    Several may share one storage directory: tests push into an open one and
    pull through another that wants credentials or certificates.
    """

    def __init__(
        self,
        workdir: Path,
        storage: Path,
        *,
        htpasswd: Path | None = None,
        token: tuple[str, Path] | None = None,  # (realm URL, certificate bundle)
        tls: Cert | None = None,
        client_ca: Path | None = None,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.log = workdir / "registry.log"
        http_section: dict[str, Any] = {"addr": self.host, "secret": "test-secret"}
        if tls is not None:
            http_section["tls"] = {"certificate": str(tls.cert), "key": str(tls.key)}
            if client_ca is not None:
                http_section["tls"]["clientcas"] = [str(client_ca)]
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
            "http": http_section,
        }
        if htpasswd is not None:
            config["auth"] = {"htpasswd": {"realm": "test-realm", "path": str(htpasswd)}}
        elif token is not None:
            realm, bundle = token
            config["auth"] = {
                "token": {
                    "realm": realm,
                    "service": SERVICE,
                    "issuer": ISSUER,
                    "rootcertbundle": str(bundle),
                }
            }
        self.config = workdir / "config.yml"
        # JSON is YAML; the registry reads it as its config.
        self.config.write_text(json.dumps(config))
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Registry:
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                [REGISTRY_BIN, "serve", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            )
        _wait_for_port(self.port, self._proc, self.log)
        return self

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def requests(self, pattern: str = "") -> list[str]:
        """Access-log request lines (``GET /v2/... HTTP/1.1``) matching *pattern*."""
        lines = re.findall(
            r'"((?:GET|HEAD|PUT|POST|PATCH|DELETE) /v2/[^"]*)"', self.log.read_text()
        )
        return [line for line in lines if re.search(pattern, line)]

    def blob_gets(self, repository: str) -> list[str]:
        return self.requests(rf"^GET /v2/{re.escape(repository)}/blobs/")

    def manifest_gets(self, repository: str) -> list[str]:
        return self.requests(rf"^GET /v2/{re.escape(repository)}/manifests/")


def htpasswd_file(path: Path, users: dict[str, str]) -> Path:
    lines = []
    for user, password in users.items():
        # -i reads the password from stdin: it never shows in a process listing.
        out = subprocess.run(
            ["htpasswd", "-niB", user],
            input=password,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        lines.append(out.strip())
    path.write_text("\n".join(lines) + "\n")
    return path


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _send_head(
    req: http.server.BaseHTTPRequestHandler, upstream: http.client.HTTPResponse, length: int
) -> None:
    """Relay *upstream*'s status and headers, for a body of *length* bytes sent whole."""
    req.send_response(upstream.status)
    for key, value in upstream.getheaders():
        if key.lower() not in ("connection", "transfer-encoding", "content-length"):
            req.send_header(key, value)
    req.send_header("Content-Length", str(length))
    req.end_headers()


class _Loopback:
    """A threaded HTTP server on 127.0.0.1:<free port>; each method's requests go to a handler."""

    def __init__(
        self,
        handlers: dict[str, Callable[[http.server.BaseHTTPRequestHandler], None]],
        protocol: str = "HTTP/1.1",
    ) -> None:
        namespace: dict[str, Any] = {
            "protocol_version": protocol,
            "log_message": lambda req, format, *args: None,
        }
        for method, handle in handlers.items():
            namespace[f"do_{method}"] = lambda req, handle=handle: handle(req)
        handler = type("Handler", (http.server.BaseHTTPRequestHandler,), namespace)
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class TokenServer(_Loopback):
    """``GET /token?service=...&scope=...`` with basic auth -> ``{"token": JWT}``.

    Valid users get every action they ask for; anonymous requests get a token
    granting nothing (as Docker Hub does for private repositories); a wrong
    password gets 401. Issued tokens are counted.
    """

    def __init__(self, workdir: Path, users: dict[str, str]) -> None:
        self.signer = make_ca(workdir, "token-signer")
        self.users = users
        self.issued: list[dict[str, Any]] = []
        self.auth_headers: list[str] = []
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.signer.cert), "-outform", "DER"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=True,
        ).stdout
        self._x5c = base64.b64encode(der).decode()
        super().__init__({"GET": self._handle}, protocol="HTTP/1.0")
        self.realm = f"http://{self.host}/token"

    def _handle(self, req: http.server.BaseHTTPRequestHandler) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(req.path).query)
        auth = req.headers.get("Authorization", "")
        self.auth_headers.append(auth)
        subject = ""
        if auth.startswith("Basic "):
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            if self.users.get(user) != password:
                req.send_response(401)
                req.send_header("Content-Type", "application/json")
                req.end_headers()
                req.wfile.write(b'{"errors":[{"code":"UNAUTHORIZED"}]}')
                return
            subject = user
        access = []
        for scope in query.get("scope", []):
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if subject:
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": subject,
            "aud": query.get("service", [""])[0],
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": os.urandom(8).hex(),
            "access": access,
        }
        header = {"alg": "RS256", "typ": "JWT", "x5c": [self._x5c]}
        signing_input = (
            f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        )
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.signer.key)],
            input=signing_input.encode(),
            capture_output=True,
            check=True,
        ).stdout
        token = f"{signing_input}.{_b64url(signature)}"
        self.issued.append(claims)
        body = json.dumps({"token": token, "expires_in": 300}).encode()
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)


@dataclass
class Faults:
    """What the proxy does to the next requests; each count is used up one request at a time."""

    refuse_status: int = 0  # answer this status ...
    status_count: int = 0  # ... to this many requests
    reset_blobs: int = 0  # blob GETs cut off (TCP reset) after half their body
    stall_blobs: int = 0  # blob GETs that send headers and then go silent ...
    stall_seconds: float = 0.0  # ... for this long
    trickle_blobs: int = 0  # blob GETs sent slowly (in small pieces with pauses)
    corrupt_blobs: int = 0  # blob GETs with one byte changed (length kept)
    ignore_range: bool = False  # answer Range requests with the whole blob (200)
    min_blob_bytes: int = 4096  # blobs smaller than this (image configs) are left alone
    redirect_blobs_to: str = ""  # host:port: answer blob GETs 307 to the same path there
    max_inflight_blobs: int = 0  # most blob GETs in progress at one time
    seen: list[str] = field(default_factory=list)  # "METHOD path Range" of every request
    authorized: list[str] = field(default_factory=list)  # paths asked with an Authorization


class FaultProxy(_Loopback):
    """An HTTP proxy on 127.0.0.1 in front of *upstream* that misbehaves on request."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.faults = Faults()
        self._lock = threading.Lock()
        self._inflight = 0
        super().__init__({"GET": self._handle, "HEAD": self._handle})

    def reset(self, **faults: Any) -> Faults:
        with self._lock:
            self.faults = Faults(**faults)
            return self.faults

    def _take(self, name: str) -> bool:
        with self._lock:
            left = getattr(self.faults, name)
            if left > 0:
                setattr(self.faults, name, left - 1)
                return True
            return False

    def blob_requests(self) -> list[str]:
        return [r for r in self.faults.seen if r.startswith("GET ") and "/blobs/" in r]

    def _handle(self, req: http.server.BaseHTTPRequestHandler) -> None:
        is_blob = req.command == "GET" and "/blobs/" in req.path
        if not is_blob:
            self._forward(req, is_blob)
            return
        with self._lock:
            self._inflight += 1
            self.faults.max_inflight_blobs = max(self.faults.max_inflight_blobs, self._inflight)
        try:
            self._forward(req, is_blob)
        finally:
            with self._lock:
                self._inflight -= 1

    def _forward(self, req: http.server.BaseHTTPRequestHandler, is_blob: bool) -> None:
        self.faults.seen.append(f"{req.command} {req.path} {req.headers.get('Range', '')}".strip())
        if req.headers.get("Authorization"):
            self.faults.authorized.append(req.path)
        if is_blob and self.faults.redirect_blobs_to:
            req.send_response(307)
            req.send_header("Location", f"http://{self.faults.redirect_blobs_to}{req.path}")
            req.send_header("Content-Length", "0")
            req.end_headers()
            return
        if self._take("status_count"):
            body = b'{"errors":[{"code":"UNAVAILABLE","message":"injected"}]}'
            req.send_response(self.faults.refuse_status)
            req.send_header("Content-Length", str(len(body)))
            req.end_headers()
            req.wfile.write(body)
            return
        headers = {k: v for k, v in req.headers.items() if k.lower() not in ("host", "connection")}
        if self.faults.ignore_range:
            headers.pop("Range", None)
        conn = http.client.HTTPConnection(self.upstream, timeout=30)
        try:
            conn.request(req.command, req.path, headers=headers)
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        # Only blob bodies big enough to matter get faults.
        is_blob = is_blob and response.status in (200, 206)
        is_blob = is_blob and len(body) >= max(1, self.faults.min_blob_bytes)
        if is_blob and self._take("corrupt_blobs"):
            middle = len(body) // 2
            body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
        _send_head(req, response, len(body))
        if req.command == "HEAD":
            return
        if is_blob and self._take("reset_blobs"):
            req.wfile.write(body[: len(body) // 2])
            req.wfile.flush()
            # SO_LINGER 0: close() sends a TCP reset, not an orderly FIN.
            req.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            req.connection.close()
            req.close_connection = True
            return
        if is_blob and self._take("stall_blobs"):
            req.wfile.write(body[:1024])
            req.wfile.flush()
            time.sleep(self.faults.stall_seconds)
            req.close_connection = True
            with contextlib.suppress(OSError):
                req.wfile.write(body[1024:])
            return
        if is_blob and self._take("trickle_blobs"):
            step = max(1, len(body) // 20)
            for i in range(0, len(body), step):
                if i:
                    # Between pieces only: a sleep after the last would count a finished
                    # download as in flight while the client already opened the next.
                    time.sleep(0.05)
                req.wfile.write(body[i : i + step])
                req.wfile.flush()
            return
        req.wfile.write(body)


class ForwardProxy(_Loopback):
    """An egress proxy on 127.0.0.1: absolute-form GETs and CONNECT tunnels, as a cell's.

    It records each request's first line, so a test can tell it was used.
    """

    def __init__(self) -> None:
        self.seen: list[str] = []
        super().__init__({"GET": self._get, "CONNECT": self._connect})

    def _get(self, req: http.server.BaseHTTPRequestHandler) -> None:
        self.seen.append(f"GET {req.path}")
        url = urllib.parse.urlsplit(req.path)
        if url.scheme != "http":
            req.send_error(400, "absolute http URL expected")
            return
        headers = {k: v for k, v in req.headers.items() if k.lower() != "connection"}
        conn = http.client.HTTPConnection(url.netloc, timeout=30)
        try:
            conn.request("GET", url.path + (f"?{url.query}" if url.query else ""), headers=headers)
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        _send_head(req, response, len(body))
        req.wfile.write(body)

    def _connect(self, req: http.server.BaseHTTPRequestHandler) -> None:
        self.seen.append(f"CONNECT {req.path}")
        host, _, port = req.path.rpartition(":")
        upstream = socket.create_connection((host, int(port)), timeout=30)
        req.send_response(200, "Connection established")
        req.end_headers()
        req.close_connection = True
        client = req.connection
        with upstream:
            pair = {client: upstream, upstream: client}
            with selectors.DefaultSelector() as sel:
                for sock in pair:
                    sel.register(sock, selectors.EVENT_READ)
                while True:
                    for key, _ in sel.select(timeout=30):
                        data = key.fileobj.recv(1 << 16)  # type: ignore[union-attr]
                        if not data:
                            return
                        pair[key.fileobj].sendall(data)  # type: ignore[index]


@contextlib.contextmanager
def running(*servers: Any) -> Iterator[None]:
    started = []
    try:
        for server in servers:
            server.start()
            started.append(server)
        yield
    finally:
        for server in reversed(started):
            server.stop()
