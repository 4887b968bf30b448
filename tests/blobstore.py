"""A droplet blobstore for tests and the benchmark: Debian's nginx on loopback.

Cloud Foundry's WebDAV blobstore is nginx serving files over HTTPS and, on a
cell, asking for the client certificate Garden renders as
``remote-layer.cert``. This runs the same: ``nginx`` as root with a config of
its own (free port on 127.0.0.1, its own pid file, temp and log paths; never
the packaged service), serving a directory, TLS with a server certificate,
optionally requiring a client certificate signed by a given CA (a request
without one, or with another, gets nginx's 400, as a real blobstore answers).
Also plain HTTP. ``/status/500`` and ``/status/503`` always fail with that
status. The access log records each request's path and status.

Nothing here depends on pytest, so ``bench/`` uses it too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from registry import Cert, _wait_for_port, free_port

NGINX_BIN = "/usr/sbin/nginx"


class Blobstore:
    """``nginx`` serving *root* on ``127.0.0.1:<free port>``; a context manager."""

    def __init__(
        self,
        workdir: Path,
        root: Path,
        *,
        tls: Cert | None = None,
        client_ca: Path | None = None,
    ) -> None:
        self.workdir = workdir
        self.root = root
        self.tls = tls
        self.client_ca = client_ca
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.access_log = workdir / "access.log"
        self.error_log = workdir / "error.log"

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def _config(self) -> str:
        w = self.workdir
        tls = ""
        if self.tls:
            tls = (
                f"ssl_certificate {self.tls.cert}; ssl_certificate_key {self.tls.key};\n"
                "ssl_protocols TLSv1.2 TLSv1.3;\n"
            )
            if self.client_ca:
                tls += f"ssl_client_certificate {self.client_ca}; ssl_verify_client on;\n"
        listen = f"127.0.0.1:{self.port}" + (" ssl" if self.tls else "")
        temps = "".join(
            f"{kind}_temp_path {w}/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        return f"""
daemon off;
user root;  # the served files live in 0700 temporary directories
master_process on;
worker_processes 1;
pid {w}/nginx.pid;
error_log {self.error_log} info;
events {{ worker_connections 64; }}
http {{
  log_format blob '$request_method $uri $status $body_bytes_sent';
  access_log {self.access_log} blob;
  {temps}
  default_type application/octet-stream;
  sendfile on;
  server {{
    listen {listen};
    {tls}
    root {self.root};
    location / {{ }}
    location /status/500 {{ return 500; }}
    location /status/503 {{ return 503; }}
  }}
}}
"""

    def start(self) -> Blobstore:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "nginx.conf"
        conf.write_text(self._config())
        with open(self.workdir / "nginx.stderr", "wb") as log:
            self.proc = subprocess.Popen(
                [NGINX_BIN, "-c", str(conf), "-p", str(self.workdir), "-e", str(self.error_log)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        try:
            _wait_for_port(self.port, self.proc, self.error_log)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # SIGTERM to the master (our child) only: it stops its own worker.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> Blobstore:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def requests(self, path: str = "") -> list[str]:
        """Access-log lines (``GET /uri status bytes``) whose uri contains *path*."""
        time.sleep(0.05)  # nginx writes the line after the response
        if not self.access_log.exists():
            return []
        return [line for line in self.access_log.read_text().splitlines() if path in line]
