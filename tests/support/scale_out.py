"""A scaled-out site in one machine: receivers and workers as ``ainode serve`` processes, one PostgreSQL, one spool.

ARCHITECTURE.md (scale-out): every process runs the same program with its own ``node.role``; receivers
are reached through HAProxy (TCP mode), workers claim jobs with ``SKIP LOCKED``. Used by
``tests/test_scale_out.py`` and ``tests/bench/scale_out.py``.
"""

from __future__ import annotations

import ctypes
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db.engine import make_engine, make_session_factory
from db.models import Delivery, Instance, Job, Result, Series, Study
from tests.support.haproxy import Backend, HAProxy
from tests.support.nodeproc import NodeProcess, node_config, node_section
from tests.support.peers import OrthancServer, free_port, storescu


def ct_studies(folder: Path, count: int, instances_per_study: int = 2) -> dict[str, list[str]]:
    """``count`` distinct small CT studies (pydicom's CT_small with new UIDs), one folder each under ``folder``.

    Returns the SOP Instance UIDs of each study, by Study Instance UID.
    """
    template = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
    studies: dict[str, list[str]] = {}
    for s in range(count):
        study_uid, series_uid = generate_uid(), generate_uid()
        out = folder / f"study{s:02d}"
        out.mkdir(parents=True)
        studies[study_uid] = []
        for k in range(instances_per_study):
            ds = template.copy()
            sop_uid = generate_uid()
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, sop_uid
            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [-158.0, -179.0, -75.0 + 5.0 * k]
            ds.save_as(out / f"{k:03d}.dcm", enforce_file_format=True)
            studies[study_uid].append(sop_uid)
    return studies


_CLONE_NEWUTS = 0x04000000


def _own_hostname(name: str) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets a UTS namespace of its own, named ``name``, as if on another machine."""

    def enter() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(_CLONE_NEWUTS) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUTS)")
        socket.sethostname(name)

    return enter


def can_name_hosts() -> bool:
    """Whether this test process may start a child under another host name (root, or CAP_SYS_ADMIN)."""
    try:
        out = subprocess.run(["hostname"], preexec_fn=_own_hostname("probe-host"), capture_output=True, text=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.stdout.strip() == "probe-host"


def ready(api_port: int) -> bool:
    """``GET /readyz`` answers 200: database, spool, models (workers) and DICOM port (receivers) are ready."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/readyz", timeout=5) as rsp:
            return bool(rsp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@dataclass(frozen=True)
class JobRow:
    study_uid: str
    state: str
    attempts: int
    claimed_by: str | None
    reason: str | None


class ScaleOutSite:
    """Receivers and workers of one site, sharing ``database_url`` and ``tmp_path/spool``; results go to ``orthanc``.

    ``worker_env`` is given to every worker (e.g. ``AINODE_TEST_RUNNER_DELAY_S``); ``job_lease_s`` is
    every process's lease (a worker's heartbeat renews it every quarter of it).
    """

    def __init__(
        self,
        tmp_path: Path,
        orthanc: OrthancServer,
        database_url: str,
        *,
        job_lease_s: float = 120.0,
        worker_env: dict[str, str] | None = None,
        pipeline: str = "thumbnail",
    ) -> None:
        self.tmp_path = Path(tmp_path)
        self.orthanc = orthanc
        self.database_url = database_url
        self.job_lease_s = job_lease_s
        self.worker_env = dict(worker_env or {})
        #: "thumbnail": the tests' runner (launch_node); another name: the real ``ainode serve`` and its models.
        self.pipeline = pipeline
        self.receivers: list[NodeProcess] = []
        self.workers: list[NodeProcess] = []
        self.balancer: HAProxy | None = None
        self.engine = make_engine(database_url)
        self.sessions: sessionmaker[Session] = make_session_factory(self.engine)

    @property
    def spool_root(self) -> Path:
        return self.tmp_path / "spool"

    def config(self, role: str) -> dict[str, Any]:
        # Every process: the same routes and peers, the same database and spool; its own ports.
        node = node_section(self.tmp_path, role=role, database_url=self.database_url, min_free_disk_mb=0, workers=1)
        config = node_config(self.tmp_path, self.orthanc, node=node, api={"host": "127.0.0.1", "port": free_port()})
        if self.pipeline != "thumbnail":
            config["routes"][0]["pipeline"] = self.pipeline
            config["peers"]["pacs"]["outputs"] = ["seg", "sr"]
        return config

    def _start(self, role: str, name: str, env: dict[str, str] | None, hostname: str | None = None) -> NodeProcess:
        config = self.config(role)
        cli = self.pipeline != "thumbnail"
        preexec = _own_hostname(hostname) if hostname else None
        proc = NodeProcess(
            config, self.tmp_path / name, env=env, job_lease_s=self.job_lease_s, cli=cli, preexec_fn=preexec
        )
        proc.start(wait=False)
        api_port = int(config["api"]["port"])
        deadline = time.monotonic() + 120
        while not ready(api_port):
            assert proc.proc is not None
            if proc.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.proc.returncode}:\n{proc.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not ready within 120 s:\n{proc.log_text()[-3000:]}")
            time.sleep(0.2)
        return proc

    def add_receiver(self) -> NodeProcess:
        proc = self._start("receiver", f"receiver{len(self.receivers) + 1}", None)
        self.receivers.append(proc)
        return proc

    def add_worker(self, env: dict[str, str] | None = None, hostname: str | None = None) -> NodeProcess:
        """A worker process; ``hostname``: as if on a machine of that name (see :func:`can_name_hosts`)."""
        name = f"worker{len(self.workers) + 1}"
        proc = self._start("worker", name, {**self.worker_env, **(env or {})}, hostname)
        self.workers.append(proc)
        return proc

    def start_balancer(self, balance: str = "roundrobin") -> HAProxy:
        backends = [
            Backend(f"receiver{i + 1}", r.port, int(r.config["api"]["port"])) for i, r in enumerate(self.receivers)
        ]
        self.balancer = HAProxy(self.tmp_path / "haproxy", backends, balance=balance).start()
        self.balancer.wait_until_up()
        return self.balancer

    def send(self, study_dirs: Sequence[Path], senders: int = 4) -> list[subprocess.CompletedProcess[str]]:
        """DCMTK storescu from ``senders`` concurrent scanners through HAProxy, one association per study."""
        assert self.balancer is not None
        port = self.balancer.port

        def scanner(i: int) -> list[subprocess.CompletedProcess[str]]:
            return [storescu(d, port, calling_ae=f"CT{i + 1}") for d in study_dirs[i::senders]]

        with ThreadPoolExecutor(senders) as pool:
            return [out for outs in pool.map(scanner, range(senders)) for out in outs]

    # -- what the database says ----------------------------------------------------------------
    def jobs(self) -> list[JobRow]:
        with self.sessions() as session:
            rows = session.execute(
                select(Study.study_instance_uid, Job.state, Job.attempts, Job.claimed_by, Job.reason).join(Job.study)
            )
            return [JobRow(uid, state.value, attempts, by, reason) for uid, state, attempts, by, reason in rows]

    def instances(self) -> dict[str, str]:
        """Spool path of every received instance, by SOP Instance UID."""
        with self.sessions() as session:
            return dict(session.execute(select(Instance.sop_instance_uid, Instance.path)).all())

    def instances_by_study(self) -> dict[str, set[str]]:
        with self.sessions() as session:
            rows = session.execute(
                select(Study.study_instance_uid, Instance.sop_instance_uid).join(Series.study).join(Series.instances)
            )
            found: dict[str, set[str]] = {}
            for study_uid, sop_uid in rows:
                found.setdefault(study_uid, set()).add(sop_uid)
            return found

    def deliveries(self) -> list[tuple[str, str, str, int]]:
        """(study UID, result SOP Instance UID, delivery state, attempts) of every delivery."""
        with self.sessions() as session:
            rows = session.execute(
                select(Study.study_instance_uid, Result.sop_instance_uid, Delivery.state, Delivery.attempts)
                .join(Job.study)
                .join(Job.results)
                .join(Result.deliveries)
            )
            return [(study, sop, state.value, attempts) for study, sop, state, attempts in rows]

    def job_times(self) -> tuple[float, float, float]:
        """(first job started, last job finished, last delivery made) as POSIX seconds."""
        with self.sessions() as session:
            started, finished = session.execute(select(func.min(Job.started_at), func.max(Job.finished_at))).one()
            delivered = session.execute(select(func.max(Delivery.delivered_at))).scalar_one()
        if started is None or finished is None or delivered is None:
            raise RuntimeError("no job has run and been delivered yet")
        return started.timestamp(), finished.timestamp(), delivered.timestamp()

    def close(self) -> None:
        if self.balancer is not None:
            self.balancer.stop()
        for proc in [*self.workers, *self.receivers]:
            proc.stop()
        self.engine.dispose()
