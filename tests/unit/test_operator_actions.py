"""Operator actions (:mod:`node.actions`), shared by ``ainode`` and the HTTP API: what each does to the rows,
and what it refuses. On the node's own parts, with an injected clock."""

from __future__ import annotations

import pytest

from db.models import AuditEvent, Delivery, DeliveryState, JobState, StudyState
from db.queue import claim_next_job
from db.states import set_delivery_state
from node import actions
from tests.support.node_parts import STABLE_AFTER_S, NodeParts, ct_study


def _queued_job(node: NodeParts) -> int:
    node.receive(ct_study(2))
    node.assembler.tick(now=node.clock.advance(STABLE_AFTER_S + 1))
    (job,) = node.jobs()
    assert job.state is JobState.QUEUED
    return job.id


def _operator_events(node: NodeParts) -> list[tuple[str | None, str | None, str | None]]:
    return [(e.actor, e.subject, e.detail) for e in node.rows(AuditEvent) if e.kind == "operator"]


def test_a_cancelled_job_is_failed_never_claimed_and_its_study_processed(node: NodeParts) -> None:
    job_id = _queued_job(node)
    with node.sessions() as session, session.begin():
        actions.cancel_job(session, job_id, "pacs-admin", node.clock.now)

    assert claim_next_job(node.sessions, "unit-host:1:w0", now=node.clock.advance(1)) is None
    (job,) = node.jobs()
    assert (job.state, job.reason, job.attempts, job.started_at) == (
        JobState.FAILED,
        "cancelled by pacs-admin",
        0,
        None,
    )
    assert node.study(ct_study(1)[0].StudyInstanceUID).state is StudyState.PROCESSED
    assert _operator_events(node) == [("pacs-admin", str(job_id), "cancelled (was queued)")]


def test_only_a_queued_job_can_be_cancelled_and_a_cancelled_one_can_be_retried(node: NodeParts) -> None:
    job_id = _queued_job(node)
    claimed = claim_next_job(node.sessions, "unit-host:1:w0", now=node.clock.advance(1))
    assert claimed is not None and claimed.id == job_id
    with pytest.raises(actions.WrongState, match=f"job {job_id} is running; only a queued job can be cancelled"):
        with node.sessions() as session, session.begin():
            actions.cancel_job(session, job_id, "pacs-admin", node.clock.now)
    with pytest.raises(actions.NotFound, match="no job 999"):
        with node.sessions() as session, session.begin():
            actions.cancel_job(session, 999, "pacs-admin", node.clock.now)
    assert _operator_events(node) == []


def test_retry_after_cancel_queues_the_job_again(node: NodeParts) -> None:
    job_id = _queued_job(node)
    with node.sessions() as session, session.begin():
        actions.cancel_job(session, job_id, "pacs-admin", node.clock.now)
    with node.sessions() as session, session.begin():
        assert actions.retry_job(session, job_id, "pacs-admin", node.clock.now) is JobState.FAILED
    with pytest.raises(actions.WrongState, match="is queued; nothing to retry"):
        with node.sessions() as session, session.begin():
            actions.retry_job(session, job_id, "pacs-admin", node.clock.now)
    claimed = claim_next_job(node.sessions, "unit-host:1:w0", now=node.clock.advance(1))
    assert claimed is not None and claimed.id == job_id


def test_reprocess_refuses_a_study_still_receiving_or_unknown(node: NodeParts) -> None:
    slices = ct_study(2)
    node.receive(slices)
    with pytest.raises(actions.WrongState, match="is still receiving"):
        with node.sessions() as session, session.begin():
            actions.reprocess_study(session, slices[0].StudyInstanceUID, "pacs-admin", node.clock.now)
    with pytest.raises(actions.NotFound, match="no study 1.2.3"):
        with node.sessions() as session, session.begin():
            actions.reprocess_study(session, "1.2.3", "pacs-admin", node.clock.now)


def test_reprocess_leaves_an_open_job_and_says_so(node: NodeParts) -> None:
    job_id = _queued_job(node)
    with node.sessions() as session, session.begin():
        done = actions.reprocess_study(session, ct_study(1)[0].StudyInstanceUID, "pacs-admin", node.clock.now)
    assert (done.queued, done.unchanged) == ([], [{"id": job_id, "route": "ct", "state": "queued"}])
    assert done.lines() == [f"job {job_id} (ct) is queued already"]


def test_a_delivery_is_made_due_unless_it_was_delivered(node: NodeParts) -> None:
    node.processed_study(ct_study(2))
    (row,) = node.deliveries()
    with node.sessions() as session, session.begin():
        assert actions.retry_delivery(session, row.id, "pacs-admin", node.clock.now) is row.state
    with node.sessions() as session, session.begin():
        delivery = session.get(Delivery, row.id)
        assert delivery is not None
        set_delivery_state(delivery, DeliveryState.DELIVERED, None, node.clock.now)
    with pytest.raises(actions.WrongState, match=f"delivery {row.id} is delivered"):
        with node.sessions() as session, session.begin():
            actions.retry_delivery(session, row.id, "pacs-admin", node.clock.now)
    with pytest.raises(actions.NotFound):
        with node.sessions() as session, session.begin():
            actions.retry_delivery(session, 999, "pacs-admin", node.clock.now)
