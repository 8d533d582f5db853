"""Real peers for the tests, on loopback in temp dirs: DCMTK, Orthanc, PostgreSQL, dciodvfy, OpenJPH.

Nothing here is a mock: these are the programs a hospital runs. DCMTK is called by its full
path because pynetdicom installs console scripts with the same names.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom

DCMTK = Path("/usr/bin")
ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
PG_BIN = Path("/usr/lib/postgresql/15/bin")
DCIODVFY = Path("/usr/bin/dciodvfy")
OJPH_COMPRESS = Path("/usr/bin/ojph_compress")  # Debian openjph-tools


def stop_own_process(proc: subprocess.Popen[bytes] | None, sig: int) -> None:
    """Stop a server this test process started (its own session's group, never one found by name)."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- DCMTK ---------------------------------------------------------------------------------------
def storescu(
    files: Path | str | Sequence[Path | str],
    port: int,
    *,
    called_ae: str = "AINODE",
    calling_ae: str = "STORESCU",
    host: str = "127.0.0.1",
    extra_args: Iterable[str] = (),
    timeout_s: float = 300,
) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu as a scanner. Folders are sent recursively (+sd +r).

    storescu proposes only uncompressed syntaxes by default: pass ``-R`` (propose the files'
    own SOP classes and transfer syntaxes), ``-xs`` JPEG lossless, ``-xv`` J2K, ``-xr`` RLE, ...
    """
    paths = [files] if isinstance(files, str | Path) else list(files)
    args = [str(DCMTK / "storescu"), "-aet", calling_ae, "-aec", called_ae, *extra_args]
    if any(Path(p).is_dir() for p in paths):
        args += ["+sd", "+r"]
    args += [host, str(port), *map(str, paths)]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout_s)


def echoscu(
    port: int, *, called_ae: str = "AINODE", calling_ae: str = "ECHOSCU", host: str = "127.0.0.1"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DCMTK / "echoscu"), "-aet", calling_ae, "-aec", called_ae, host, str(port)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def dcmtk(tool: str, *args: str | Path) -> None:
    """Run a DCMTK tool (``dcmconv``, ``dcmcjpeg``, ...); skips the calling test when it is not installed."""
    import pytest

    exe = DCMTK / tool
    if not exe.is_file():
        pytest.skip(f"DCMTK {tool} not installed at {exe}")
    subprocess.run([str(exe), *map(str, args)], check=True, capture_output=True, timeout=60)


class StoreSCP:
    """DCMTK storescp writing what it receives, in the syntax it received it, into ``out``."""

    def __init__(self, out: Path, *options: str, aet: str = "STORESCP") -> None:
        self.out, self.aet, self.port = out, aet, free_port()
        out.mkdir(parents=True, exist_ok=True)
        self.log = open(out.parent / f"storescp-{self.port}.log", "wb")
        args = [str(DCMTK / "storescp"), *options, "-aet", aet, "-od", str(out), str(self.port)]
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:  # listening (a --refuse storescp answers no C-ECHO, so wait for the port)
            assert self.proc.poll() is None, "storescp exited"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "storescp does not listen"
                time.sleep(0.1)

    def received(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_file())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


class SiteCA:
    """A throw-away certification authority made with the ``openssl`` command, as a site's PKI issues them.

    Certificates name 127.0.0.1 and localhost, and serve as server and as client certificates
    (DICOM TLS peers are both). Keys are unencrypted PEM (DCMTK reads them with ``-pw``).
    """

    def __init__(self, folder: Path, name: str = "site-ca") -> None:
        self.folder, self.name = folder, name
        folder.mkdir(parents=True, exist_ok=True)
        self.key, self.cert = folder / f"{name}.key", folder / f"{name}.crt"
        self._openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", self.key, "-out", self.cert,
                      "-days", "2", "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
                      "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip

    @staticmethod
    def _openssl(*args: str | Path) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)

    def issue(self, name: str, folder: Path | None = None) -> tuple[Path, Path]:
        """A new key and certificate for ``name`` (its CN), signed by this CA: ``(key_file, cert_file)``."""
        folder = folder or self.folder
        folder.mkdir(parents=True, exist_ok=True)
        key, csr, cert, ext = (folder / f"{name}.{s}" for s in ("key", "csr", "crt", "ext"))
        ext.write_text(
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n"
        )
        self._openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
        self._openssl("x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.key, "-CAcreateserial",
                      "-out", cert, "-days", "2", "-extfile", ext)  # fmt: skip
        return key, cert


def dcmtk_tls(key: Path, cert: Path, ca: Path) -> list[str]:
    """DCMTK options for authenticated DICOM TLS (BCP 195 profile, the peer verified against ``ca``)."""
    return ["+tls", str(key), str(cert), "-pw", "+cf", str(ca)]


def dciodvfy_errors(path: Path | str) -> list[str]:
    """Lines starting with "Error" that dicom3tools' dciodvfy prints for ``path``."""
    out = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=300)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


# -- OpenJPH: High-Throughput JPEG 2000, which neither DCMTK 3.6.7 nor pydicom can write ------------
def htj2k_encode(src: Path, dst: Path, syntax: str, *options: str) -> None:
    """Write ``src`` as ``dst`` in an HTJ2K transfer syntax: one ``ojph_compress`` codestream per frame.

    ``options`` go to ``ojph_compress`` (``-reversible true`` for lossless; ``-qstep`` for lossy).
    Skips the calling test when OpenJPH is not installed.
    """
    import pytest
    from pydicom.encaps import encapsulate

    if not OJPH_COMPRESS.is_file():
        pytest.skip(f"OpenJPH encoder missing at {OJPH_COMPRESS} (apt-get install openjph-tools)")
    ds = pydicom.dcmread(src)
    signed = int(ds.PixelRepresentation) == 1
    codestreams = []
    for index, frame in enumerate(ds.pixel_array.reshape(-1, int(ds.Rows), int(ds.Columns))):
        raw, j2c = dst.with_suffix(f".{index}.yuv"), dst.with_suffix(f".{index}.j2c")
        frame.astype("<i2" if signed else "<u2").tofile(raw)  # raw samples of the stored values
        args = ["-i", raw, "-o", j2c, "-dims", f"{{{ds.Columns},{ds.Rows}}}", "-num_comps", "1",
                "-signed", str(signed).lower(), "-bit_depth", str(ds.BitsStored), "-downsamp", "{1,1}"]  # fmt: skip
        subprocess.run([str(OJPH_COMPRESS), *map(str, args), *options], check=True, capture_output=True, timeout=60)
        codestreams.append(j2c.read_bytes())
        raw.unlink()
        j2c.unlink()
    ds.PixelData = encapsulate(codestreams)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(syntax)
    ds.save_as(dst, enforce_file_format=True)


# -- Orthanc -------------------------------------------------------------------------------------
class OrthancServer:
    """Orthanc 1.10 with its DICOMweb plugin, on free loopback ports, storing in a temp dir.

    Stop and start again on the same storage to play a PACS that is down for a while.
    """

    def __init__(self, workdir: Path | None = None, aet: str = "ORTHANC", users: dict[str, str] | None = None) -> None:
        """``users``: user name -> password for HTTP basic authentication (REST and DICOMweb); None: none."""
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="orthanc-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.users = dict(users or {})
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.config_path = self.workdir / "orthanc.json"
        self.modalities: dict[str, list[Any]] = {}
        self._write_config()

    def _write_config(self) -> None:
        config = {
            "Name": "test-pacs",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "UnknownSopClassAccepted": True,
            "DicomModalities": self.modalities,
            "DicomModalitiesInDatabase": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False},
            "StableAge": 1,
            "HttpServerEnabled": True,
            "StorageCompression": False,
            "LogExportedResources": False,
        }
        if self.users:
            config["RegisteredUsers"] = self.users
        self.config_path.write_text(json.dumps(config, indent=2))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout_s: float = 60) -> OrthancServer:
        log = open(self.workdir / "orthanc.log", "ab")
        self.proc = subprocess.Popen(
            [str(ORTHANC), str(self.config_path)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.workdir / 'orthanc.log').read_text()[-2000:]}")
            try:
                self.rest("/system")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        raise TimeoutError("Orthanc did not answer its REST API")

    def stop(self) -> None:
        stop_own_process(self.proc, signal.SIGTERM)
        self.proc = None

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- REST ------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: bytes | dict | list | None = None) -> bytes:
        data = json.dumps(body).encode() if isinstance(body, dict | list) else body
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if self.users:  # the tests' own REST calls, as the first registered user
            user, password = next(iter(self.users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=60) as rsp:
            return rsp.read()

    def rest(self, path: str, body: Any = None, method: str | None = None) -> Any:
        raw = self.request(method or ("POST" if body is not None else "GET"), path, body)
        return json.loads(raw) if raw else None

    def studies(self) -> list[str]:
        return list(self.rest("/studies"))

    def instances(self) -> list[str]:
        return list(self.rest("/instances"))

    def find_instances(self, **query: str) -> list[str]:
        return list(self.rest("/tools/find", {"Level": "Instance", "Query": query}))

    def instance_dataset(self, instance_id: str) -> pydicom.Dataset:
        return pydicom.dcmread(BytesIO(self.request("GET", f"/instances/{instance_id}/file")))

    def upload(self, path: Path | str) -> str:
        """Store a file through REST; returns Orthanc's study id."""
        answer = json.loads(self.request("POST", "/instances", Path(path).read_bytes()))
        return str(answer["ParentStudy"])

    def clear(self) -> None:
        for study in self.studies():
            self.request("DELETE", f"/studies/{study}")

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        self.rest(f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port}, method="PUT")

    def send_study_to_modality(self, study_id: str, modality: str) -> None:
        self.rest(f"/modalities/{modality}/store", {"Resources": [study_id], "Synchronous": True})


def results_in_orthanc(orthanc: OrthancServer, study_uid: str) -> list[pydicom.Dataset]:
    """Instances in Orthanc made by the node for ``study_uid`` (our manufacturer, not the source images)."""
    found = []
    for instance_id in orthanc.find_instances(StudyInstanceUID=study_uid):
        ds = orthanc.instance_dataset(instance_id)
        if ds.get("Manufacturer") == "dicom-ai-node":
            found.append(ds)
    return found


# -- PostgreSQL ----------------------------------------------------------------------------------
class PostgresServer:
    """A throw-away PostgreSQL 15 cluster on a free loopback port.

    PostgreSQL refuses to run as root, so when the tests run as root the cluster belongs to
    the ``postgres`` OS user (created by Debian's package) and its commands run through runuser.
    """

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ainode-pg-"))
        self.port = free_port()
        self.data = self.dir / "data"
        self.proc: subprocess.Popen[bytes] | None = None
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self._as_user = ["runuser", "-u", "postgres", "--"]
        self._run([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8"])

    def _run(self, cmd: list[str]) -> str:
        out = subprocess.run(self._as_user + cmd, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr[-2000:]}")
        return out.stdout

    @property
    def url(self) -> str:
        return self.url_for("ainode")

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def start(self, timeout_s: float = 60) -> PostgresServer:
        log = open(self.dir / "postgres.log", "ab")
        cmd = [
            str(PG_BIN / "postgres"),
            "-D", str(self.data),
            "-p", str(self.port),
            "-h", "127.0.0.1",
            "-k", str(self.dir),
            "-c", "fsync=off",
            "-c", "max_connections=200",
        ]  # fmt: skip
        self.proc = subprocess.Popen(self._as_user + cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready = subprocess.run(
                [str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)], capture_output=True
            )
            if ready.returncode == 0:
                self._ensure_database("ainode")
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {(self.dir / 'postgres.log').read_text()[-2000:]}")
            time.sleep(0.2)
        raise TimeoutError("PostgreSQL did not start")

    def _psql(self, sql: str) -> str:
        return self._run([str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                          "-d", "postgres", "-tAc", sql])  # fmt: skip

    def _ensure_database(self, name: str) -> None:
        if not self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'").strip():
            self._psql(f'CREATE DATABASE "{name}"')

    def create_database(self, name: str) -> str:
        self._ensure_database(name)
        return self.url_for(name)

    def stop(self) -> None:
        stop_own_process(self.proc, signal.SIGINT)  # PostgreSQL: SIGINT is its fast shutdown
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
