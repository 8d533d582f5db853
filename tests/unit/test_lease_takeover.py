"""A job whose lease expired is taken over by another worker; the first worker's late outcome is dropped.

One thread plays both: worker A's pipeline, while it runs, lets the lease expire (the reclaimer runs
with an injected clock past ``lease_s``) and worker B claim and finish the job; then A's pipeline
returns. Whatever A brings back — results or an exception — must not replace B's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from db.models import AuditEvent, JobState, StudyState
from db.queue import reclaim_stale_jobs
from node.work.worker import Worker
from pipelines.study import RunOutcome
from tests.support.node_parts import NodeParts, ct_study
from tests.support.runners import ThumbnailRunner

LEASE_S = 120.0
WORKER_A, WORKER_B = "host-a:101:w0", "host-b:202:w0"


class OvertakenRunner:
    """Worker A's pipeline: while it runs, the lease expires and worker B runs the same job to its end."""

    def __init__(self, node: NodeParts, late: str) -> None:
        self.node = node
        self.late = late
        self.worker_b: Worker = node.worker(WORKER_B)
        self.sop_instance_uid = generate_uid(entropy_srcs=["worker A's late result"])

    def run(self, pipeline: str, series_files: Mapping[str, Sequence[Path]], outputs: set[str]) -> RunOutcome:
        expired = self.node.clock.advance(LEASE_S + 1)
        assert reclaim_stale_jobs(self.node.sessions, lease_s=LEASE_S, max_attempts=3, now=expired) == [1]
        assert self.worker_b.run_once(), "worker B found no job to take over"
        if self.late == "exception":
            raise RuntimeError("worker A's pipeline crashed after its lease expired")
        outcome = ThumbnailRunner().run(pipeline, series_files, outputs)
        (ds,) = outcome.datasets
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = self.sop_instance_uid
        return outcome


def test_a_job_whose_lease_expired_is_taken_over_and_the_first_workers_late_results_are_dropped(
    node: NodeParts, caplog: pytest.LogCaptureFixture
) -> None:
    study = ct_study()
    node.receive(study)
    node.assembler.tick(now=node.clock.advance(60))
    runner = OvertakenRunner(node, late="results")

    with caplog.at_level(logging.WARNING, logger="ainode.worker"):
        assert node.worker(WORKER_A, runner).run_once()

    (job,) = node.jobs()
    assert (job.state, job.claimed_by, job.attempts) == (JobState.DONE, WORKER_B, 2)
    # Only B's result is kept and delivered; A's never gets a row, so it is never sent.
    (result,) = node.results()
    assert result.sop_instance_uid != runner.sop_instance_uid
    assert [d.result_id for d in node.deliveries()] == [result.id]
    assert node.study(study[0].StudyInstanceUID).state == StudyState.PROCESSED
    # The drop is in the log and in the audit an operator reads.
    dropped = [r for r in caplog.records if r.name == "ainode.worker" and r.levelno == logging.WARNING]
    assert [r.getMessage() for r in dropped] == [f"job {job.id} was taken over by {WORKER_B}; dropping our results"]
    audit = [(e.actor, e.subject, e.detail) for e in node.rows(AuditEvent) if e.detail.startswith("results dropped")]
    assert audit == [(WORKER_A, str(job.id), f"results dropped: the job was taken over by {WORKER_B}")]


def test_a_late_failure_of_the_first_worker_does_not_fail_the_job_the_second_worker_finished(
    node: NodeParts,
) -> None:
    node.receive(ct_study())
    node.assembler.tick(now=node.clock.advance(60))

    assert node.worker(WORKER_A, OvertakenRunner(node, late="exception")).run_once()

    (job,) = node.jobs()
    assert (job.state, job.claimed_by) == (JobState.DONE, WORKER_B)
    assert "crashed" not in (job.reason or "")
    assert len(node.results()) == 1
