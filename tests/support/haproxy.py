"""HAProxy (Debian package) in front of node processes, as a site spreads DICOM associations (TCP mode).

The test runs it in the foreground on free loopback ports, with a config written to its own folder,
and stops only the process it started. Its statistics (CSV) say how many connections each backend got.
"""

from __future__ import annotations

import csv
import io
import socket
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.peers import free_port

HAPROXY = Path("/usr/sbin/haproxy")


@dataclass(frozen=True)
class Backend:
    """One receiver: its DICOM port, and the HTTP port whose ``/readyz`` says whether it takes associations."""

    name: str
    dicom_port: int
    api_port: int | None = None
    host: str = "127.0.0.1"


def haproxy_config(frontend_port: int, stats_port: int, backends: Sequence[Backend], balance: str) -> str:
    """TCP mode: HAProxy passes the bytes of each association to one receiver and never reads DICOM.

    A receiver with an API port is checked by ``GET /readyz`` (503 while its database, spool or DICOM
    port is not ready); HAProxy sends no new association to it until it answers 200 again.
    """
    if balance not in ("roundrobin", "leastconn"):
        raise ValueError(f"balance must be roundrobin or leastconn, not {balance!r}")
    servers = []
    for b in backends:
        check = f" check port {b.api_port} inter 1s fall 2 rise 1" if b.api_port is not None else ""
        servers.append(f"    server {b.name} {b.host}:{b.dicom_port}{check}")
    return "\n".join(
        [
            "global",
            "    maxconn 256",
            "defaults",
            "    mode tcp",
            "    timeout connect 5s",
            # An association may stay open for a whole study; DICOM's own timers end idle ones.
            "    timeout client 10m",
            "    timeout server 10m",
            "frontend dicom",
            f"    bind 127.0.0.1:{frontend_port}",
            "    default_backend receivers",
            "backend receivers",
            f"    balance {balance}",
            "    option httpchk GET /readyz",
            "    http-check expect status 200",
            *servers,
            "listen stats",
            "    mode http",
            f"    bind 127.0.0.1:{stats_port}",
            "    stats enable",
            "    stats uri /stats",
            "",
        ]
    )


class HAProxy:
    """``haproxy -db`` (foreground) on a free loopback port in front of ``backends``."""

    def __init__(self, workdir: Path, backends: Sequence[Backend], *, balance: str = "roundrobin") -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.stats_port = free_port()
        self.backends = list(backends)
        self.config_path = self.workdir / "haproxy.cfg"
        self.config_path.write_text(haproxy_config(self.port, self.stats_port, self.backends, balance))
        self.log_path = self.workdir / "haproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30) -> HAProxy:
        check = subprocess.run([str(HAPROXY), "-c", "-f", str(self.config_path)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy refuses {self.config_path}: {check.stdout}{check.stderr}")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(HAPROXY), "-db", "-f", str(self.config_path)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.proc.returncode}: {self.log_path.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.stats_port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"haproxy did not listen on {self.stats_port} within {timeout_s} s")

    def stats(self) -> dict[str, dict[str, str]]:
        """HAProxy's CSV statistics of the receivers' backend, by server name (``stot``: connections, ``status``)."""
        url = f"http://127.0.0.1:{self.stats_port}/stats;csv"
        with urllib.request.urlopen(url, timeout=10) as rsp:
            text = rsp.read().decode().lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {r["svname"]: r for r in rows if r["pxname"] == "receivers" and r["svname"] not in ("BACKEND",)}

    def wait_until_up(self, timeout_s: float = 60) -> None:
        """Until every checked backend is UP (its /readyz answered 200)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = {name: row["status"] for name, row in self.stats().items()}
            if all(s.startswith("UP") or s == "no check" for s in status.values()):
                return
            time.sleep(0.3)
        raise TimeoutError(f"receivers not up behind haproxy within {timeout_s} s: {status}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> HAProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
