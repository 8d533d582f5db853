"""What ``ainode status`` shows: studies, jobs and the outbox with their states."""

from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Delivery, Job, Result, Study


def _iso(value: Any) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


def collect_status(sessions: sessionmaker[Session], limit: int = 50) -> dict[str, Any]:
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
    outbox_states = Counter(d.state for d, *_ in deliveries)
    return {
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
    }


def format_status(status: dict[str, Any]) -> str:
    lines = []
    c = status["counts"]
    for title in ("studies", "jobs", "deliveries"):
        parts = ", ".join(f"{k} {v}" for k, v in sorted(c[title].items())) or "none"
        lines.append(f"{title}: {parts}")
    lines.append("")
    lines.append("STUDY INSTANCE UID                                               STATE       V  INST  SENDER")
    for s in status["studies"]:
        lines.append(
            f"{s['study_instance_uid']:<64} {s['state']:<11} {s['version']:>1} {s['instances']:>5}  "
            f"{s['sender'] or '-'}" + (f"  ({s['note']})" if s["note"] else "")
        )
    lines.append("")
    lines.append("JOB  STATE           ROUTE/PIPELINE                 TRIES  REASON")
    for j in status["jobs"]:
        rp = f"{j['route']}/{j['pipeline']}"
        lines.append(f"{j['id']:<4} {j['state']:<15} {rp:<30} {j['attempts']:>5}  {j['reason'] or ''}")
    lines.append("")
    lines.append("DELIVERY  STATE      KIND  DESTINATION            TRIES  NEXT / ERROR")
    for d in status["deliveries"]:
        extra = d["next_attempt_at"] or d["delivered_at"] or ""
        if d["last_error"]:
            extra = f"{extra} {d['last_error']}".strip()
        lines.append(
            f"{d['id']:<9} {d['state']:<10} {d['kind']:<5} {d['destination'] + ' ' + d['peer']:<22} "
            f"{d['attempts']:>5}  {extra}"
        )
    return "\n".join(lines)
