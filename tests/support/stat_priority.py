"""A STAT study sent behind routine CT studies to a node with one worker (issue 13): who starts, who arrives first.

Shared by ``tests/test_priority.py`` (which asserts the order) and ``tests/bench/stat_priority.py``
(which prints the figures for the README).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import select

from db.engine import make_engine, make_session_factory
from db.models import Delivery, DeliveryState, Job, Result, Study, utcnow
from tests.support.nodeproc import NodeProcess, node_config
from tests.support.peers import OrthancServer, storescu
from tests.support.waiting import wait_for

#: The emergency department's scanner: its studies are STAT.
STAT_STATION = "ED-CT"
STAT_PRIORITY = 10


def write_ct_study(folder: Path, name: str, **attributes: object) -> str:
    """pydicom's CT test image as a study of its own (new Study, Series and SOP Instance UIDs); returns its UID."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["stat-priority", name, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["stat-priority", name, "series"])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
        entropy_srcs=["stat-priority", name, "instance"]
    )
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    out = folder / name
    out.mkdir(parents=True, exist_ok=True)
    ds.save_as(out / "ct.dcm", enforce_file_format=True)
    return str(ds.StudyInstanceUID)


def priority_config(workdir: Path, orthanc: OrthancServer) -> dict[str, Any]:
    """One worker; CT from the ED scanner routed STAT (priority 10), every other CT routine (priority 0)."""
    config = node_config(workdir, orthanc, node={"workers": 1})
    common = {"pipeline": "thumbnail", "destinations": ["pacs"], "stable_after_s": 1}
    config["routes"] = [
        # First matching route wins: the STAT rule comes before the catch-all CT rule.
        {"name": "ct-stat", "match": {"Modality": "CT", "StationName": STAT_STATION}, "priority": STAT_PRIORITY}
        | common,
        {"name": "ct-routine", "match": {"Modality": "CT"}} | common,
    ]
    return config


@dataclass(frozen=True)
class JobRecord:
    id: int
    route: str
    priority: int
    study_uid: str
    created_at: datetime
    started_at: datetime
    #: When the destination acknowledged the job's last result.
    delivered_at: datetime


@dataclass(frozen=True)
class StatRun:
    stat: JobRecord
    routine: list[JobRecord]
    #: When the sender had the STAT study's last instance acknowledged.
    stat_sent_at: datetime
    #: Study Instance UIDs of the results in the order the destination (Orthanc) stored them.
    arrival_order: list[str]

    @property
    def overtaken(self) -> list[JobRecord]:
        """The routine jobs that were still queued (made, not started) when the STAT job was queued."""
        return [j for j in self.routine if j.created_at <= self.stat.created_at < j.started_at]

    @property
    def start_position(self) -> int:
        """1-based: the STAT job was the n-th job of the run to start."""
        starts = sorted([self.stat, *self.routine], key=lambda j: (j.started_at, j.id))
        return starts.index(self.stat) + 1

    @property
    def started_before_stat_queued(self) -> int:
        return sum(1 for j in self.routine if j.started_at <= self.stat.created_at)

    @property
    def stat_result_s(self) -> float:
        return (self.stat.delivered_at - self.stat_sent_at).total_seconds()

    @property
    def last_routine_result_s(self) -> float:
        return (max(j.delivered_at for j in self.routine) - self.stat_sent_at).total_seconds()


def _orthanc_arrivals(orthanc: OrthancServer, after_seq: int) -> list[str]:
    changes = orthanc.rest(f"/changes?since={after_seq}&limit=10000")["Changes"]
    order = []
    for change in sorted(changes, key=lambda c: c["Seq"]):
        if change["ChangeType"] == "NewInstance":
            tags = orthanc.rest(f"/instances/{change['ID']}/simplified-tags")
            order.append(str(tags["StudyInstanceUID"]))
    return order


def _records(database_url: str) -> list[JobRecord] | None:
    """Every job with its last delivery time; None while a job or delivery is still open."""
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            rows = session.execute(
                select(Job, Study.study_instance_uid).join(Study, Study.id == Job.study_id).order_by(Job.id)
            ).all()
            records = []
            for job, study_uid in rows:
                delivered = session.scalars(
                    select(Delivery.delivered_at)
                    .join(Result, Result.id == Delivery.result_id)
                    .where(Result.job_id == job.id, Delivery.state == DeliveryState.DELIVERED)
                ).all()
                if job.started_at is None or not delivered or any(d is None for d in delivered):
                    return None
                last = max(d for d in delivered if d is not None)
                records.append(
                    JobRecord(job.id, job.route, job.priority, study_uid, job.created_at, job.started_at, last)
                )
            return records
    finally:
        engine.dispose()


def run_stat_behind_routine(
    workdir: Path, orthanc: OrthancServer, *, routine: int = 10, job_delay_s: float = 2.0
) -> StatRun:
    """Send ``routine`` CT studies, then one STAT study, to a one-worker node whose jobs take ``job_delay_s`` each."""
    studies = workdir / "studies"
    routine_uids = [write_ct_study(studies / "routine", f"routine-{i}", StationName="CT-2") for i in range(routine)]
    stat_uid = write_ct_study(studies / "stat", "stat", StationName=STAT_STATION)
    config = priority_config(workdir, orthanc)
    after_seq = int(orthanc.rest("/changes?last")["Last"])
    node = NodeProcess(config, workdir / "node", env={"AINODE_TEST_RUNNER_DELAY_S": str(job_delay_s)})
    with node:
        sent = storescu(studies / "routine", node.port, calling_ae="CTSCANNER")
        assert sent.returncode == 0, sent.stderr
        sent = storescu(studies / "stat", node.port, calling_ae="EDCT")
        assert sent.returncode == 0, sent.stderr
        stat_sent_at = utcnow()
        url = config["node"]["database_url"]
        records = wait_for(
            lambda: (r := _records(url)) is not None and len(r) == routine + 1 and r,
            timeout_s=120 + (routine + 1) * job_delay_s * 3,
            what="every job done and its result delivered",
            node=node,
        )
    assert isinstance(records, list)
    (stat,) = [r for r in records if r.study_uid == stat_uid]
    others = [r for r in records if r.study_uid != stat_uid]
    assert sorted(r.study_uid for r in others) == sorted(routine_uids)
    return StatRun(stat, others, stat_sent_at, _orthanc_arrivals(orthanc, after_seq))
