"""A job that meets a full disk or an absent database waits and tries again; it does not fail for good.

Issue 12, item 9: when the spool was full the job failed "could not store results" and stayed failed after
space was freed. The spool here is the node's own, made to fail as a full disk does (ENOSPC) for a while.
"""

from __future__ import annotations

import errno
from datetime import timedelta

import pytest
from sqlalchemy import update

from db.models import AuditEvent, Job, JobState, utcnow
from node.receive.spool import SpoolError
from tests.support.node_parts import STABLE_AFTER_S, NodeParts, ct_study


def test_a_job_that_cannot_store_its_results_on_a_full_disk_waits_and_succeeds_when_space_is_freed(
    node: NodeParts, monkeypatch: pytest.MonkeyPatch
) -> None:
    node.receive(ct_study())
    assert node.assembler.tick(now=node.clock.advance(STABLE_AFTER_S + 1))
    write = node.spool.write_dataset

    def full_disk(*args: object, **kwargs: object) -> int:
        raise SpoolError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(node.spool, "write_dataset", full_disk)
    assert node.worker().run_once()

    (job,) = node.jobs()
    assert job.state is JobState.QUEUED and job.postponed == 1 and job.attempts == 0
    assert job.reason.startswith("could not store results: SpoolError: [Errno 28] No space left on device; retry in 10")
    assert job.retry_at is not None and job.retry_at > utcnow()
    assert not node.worker().run_once(), "claimed before its retry time"
    assert any(e.detail.startswith("postponed: ") for e in node.rows(AuditEvent) if e.kind == "job")

    monkeypatch.setattr(node.spool, "write_dataset", write)  # space freed
    with node.sessions() as session, session.begin():  # and the wait is over
        session.execute(update(Job).values(retry_at=utcnow() - timedelta(seconds=1)))
    assert node.worker().run_once()

    (job,) = node.jobs()
    assert job.state is JobState.DONE and len(node.results()) == 1


def test_the_wait_doubles_each_time_up_to_ten_minutes(node: NodeParts, monkeypatch: pytest.MonkeyPatch) -> None:
    node.receive(ct_study())
    assert node.assembler.tick(now=node.clock.advance(STABLE_AFTER_S + 1))

    def full_disk(*args: object, **kwargs: object) -> int:
        raise SpoolError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(node.spool, "write_dataset", full_disk)
    waits = []
    for _ in range(8):
        with node.sessions() as session, session.begin():
            session.execute(update(Job).values(retry_at=None))
        before = utcnow()
        assert node.worker().run_once()
        (job,) = node.jobs()
        waits.append(round((job.retry_at - before).total_seconds() / 10) * 10)
    assert waits == [10, 20, 40, 80, 160, 320, 600, 600]
    assert job.state is JobState.QUEUED
