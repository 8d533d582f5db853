"""What the node's state is, read from its database and spool: studies, jobs (with the series each pipeline
chose), the outbox, the associations it rejected, the spool's free space.

Read-only queries, shared by ``ainode status`` (:mod:`node.operate.status` formats them) and the HTTP API.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Association, AuditEvent, Delivery, Job, Result, Study
from node.receive.spool import Spool


def _iso(value: Any) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


def spool_status(spool: Spool) -> dict[str, Any]:
    """Free space of the spool's disk, its watermark, and whether the node refuses C-STOREs because of it."""
    return {
        "free_mb": spool.free_bytes() // 2**20,
        "min_free_mb": spool.min_free_bytes // 2**20,
        "refusing": spool.below_watermark(),
    }


def collect_status(sessions: sessionmaker[Session], limit: int = 50, spool: Spool | None = None) -> dict[str, Any]:
    with sessions() as session:
        studies = session.execute(select(Study).order_by(Study.last_received_at.desc()).limit(limit)).scalars().all()
        uid_by_id = dict(session.execute(select(Study.id, Study.study_instance_uid)).all())
        jobs = session.execute(select(Job).order_by(Job.id.desc()).limit(limit)).scalars().all()
        deliveries = session.execute(
            select(Delivery, Result.sop_instance_uid, Result.kind, Result.job_id)
            .join(Result, Result.id == Delivery.result_id)
            .order_by(Delivery.id.desc())
        ).all()
        study_states = Counter(s for (s,) in session.execute(select(Study.state)).all())
        job_states = Counter(s for (s,) in session.execute(select(Job.state)).all())
        # The worker records which series each job's pipeline took (audit kind "selection", subject the job id).
        selection = dict(
            session.execute(
                select(AuditEvent.subject, AuditEvent.detail)
                .where(AuditEvent.kind == "selection", AuditEvent.subject.in_([str(j.id) for j in jobs]))
                .order_by(AuditEvent.id)
            ).all()
        )
        rejected = (
            session.execute(
                select(Association)
                .where(Association.direction == "in", Association.outcome == "rejected")
                .order_by(Association.id.desc())
                .limit(limit)
            )
            .scalars()
            .all()
        )
    outbox_states = Counter(d.state for d, *_ in deliveries)
    return {
        "spool": spool_status(spool) if spool is not None else None,
        "counts": {
            "studies": {k.value: v for k, v in study_states.items()},
            "jobs": {k.value: v for k, v in job_states.items()},
            "deliveries": {k.value: v for k, v in outbox_states.items()},
        },
        "studies": [
            {
                "study_instance_uid": s.study_instance_uid,
                "state": s.state.value,
                "version": s.version,
                "instances": s.instance_count,
                "sender": s.sender_ae,
                "last_received_at": _iso(s.last_received_at),
                "note": s.note,
            }
            for s in studies
        ],
        "jobs": [
            {
                "id": j.id,
                "study_instance_uid": uid_by_id.get(j.study_id),
                "version": j.study_version,
                "route": j.route,
                "pipeline": j.pipeline,
                "state": j.state.value,
                "reason": j.reason,
                "attempts": j.attempts,
                "created_at": _iso(j.created_at),
                "finished_at": _iso(j.finished_at),
                "model_s": j.model_s,
                "total_s": j.total_s,
                "selection": selection.get(str(j.id)),
            }
            for j in jobs
        ],
        "deliveries": [
            {
                "id": d.id,
                "job_id": job_id,
                "kind": kind,
                "sop_instance_uid": sop_uid,
                "destination": d.destination,
                "peer": f"{d.ae_title}@{d.host}:{d.port}",
                "state": d.state.value,
                "attempts": d.attempts,
                "next_attempt_at": _iso(d.next_attempt_at) if d.state.value == "pending" else None,
                "last_error": d.last_error,
                "delivered_at": _iso(d.delivered_at),
            }
            for d, sop_uid, kind, job_id in deliveries[:limit]
        ],
        "rejected_associations": [
            {
                "at": _iso(a.started_at),
                "calling_ae": a.calling_ae,
                "called_ae": a.called_ae,
                "host": a.peer_host,
                "reason": a.reason,
            }
            for a in rejected
        ],
    }
