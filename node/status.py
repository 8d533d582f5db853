"""What the node's state is, read from its database and spool: studies, jobs (with the series each pipeline
chose), the outbox, the associations it rejected, the spool's free space.

Read-only queries, shared by ``ainode status`` (:mod:`node.operate.status` formats them) and the HTTP API.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session, sessionmaker

from db.models import (
    Association,
    AuditEvent,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Result,
    Series,
    Study,
    StudyState,
)
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
        "jobs": [job_dict(j, uid_by_id.get(j.study_id), selection.get(str(j.id))) for j in jobs],
        "deliveries": [delivery_dict(d, job_id, kind, sop_uid) for d, sop_uid, kind, job_id in deliveries[:limit]],
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


# -- records, as the HTTP API and `ainode status --json` show them --------------------------------
def job_dict(j: Job, study_uid: str | None, selection: str | None) -> dict[str, Any]:
    """A job: where it is, why, how long it took, and which series its pipeline chose."""
    return {
        "id": j.id,
        "study_instance_uid": study_uid,
        "version": j.study_version,
        "route": j.route,
        "pipeline": j.pipeline,
        "state": j.state.value,
        "reason": j.reason,
        "attempts": j.attempts,
        "priority": j.priority,
        "created_at": _iso(j.created_at),
        "started_at": _iso(j.started_at),
        "finished_at": _iso(j.finished_at),
        "model_s": j.model_s,
        "total_s": j.total_s,
        "selection": selection,
    }


def delivery_dict(d: Delivery, job_id: int, kind: str, sop_uid: str) -> dict[str, Any]:
    """One result to one destination, with its attempts and why it is not delivered yet."""
    return {
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


def _page(session: Session, stmt: Select[*tuple[Any, ...]], limit: int, offset: int) -> tuple[list[Any], int]:
    """One page of ``stmt``'s rows and how many rows there are in all."""
    total = session.scalar(select(func.count()).select_from(stmt.order_by(None).subquery())) or 0
    return list(session.execute(stmt.limit(limit).offset(offset)).all()), total


def _dicom_date(value: object) -> str | None:
    text = str(value or "").strip()
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) == 8 and text.isdigit() else (text or None)


#: What the API reads from a stored instance's header: the database keeps no names or descriptions.
_HEADER_TAGS = ["PatientName", "StudyDate", "SeriesNumber", "SeriesDescription"]


def _header(spool: Spool | None, relpath: str | None) -> Dataset | None:
    """The few attributes of ``_HEADER_TAGS`` of a spooled file; None when it is gone (retention) or unreadable."""
    if spool is None or relpath is None:
        return None
    try:
        return dcmread(spool.abspath(relpath), stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except (OSError, ValueError, InvalidDicomError):
        return None


def _study_fields(s: Study, modalities: list[str], header: Dataset | None, with_patient: bool) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "id": s.id,
        "study_instance_uid": s.study_instance_uid,
        "state": s.state.value,
        "version": s.version,
        "instances": s.instance_count,
        "sender": s.sender_ae,
        "last_received_at": _iso(s.last_received_at),
        "note": s.note,
        "study_date": _dicom_date(header.get("StudyDate")) if header is not None else None,
        "modalities": modalities,
    }
    if with_patient:  # PHI only for admin tokens: a viewer's answer has no such keys at all
        name = header.get("PatientName") if header is not None else None
        fields["patient_name"] = str(name) if name else None
        fields["patient_id"] = s.patient_id
    return fields


def _study_extras(session: Session, study_ids: list[int]) -> tuple[dict[int, list[str]], dict[int, str]]:
    """Per study: its modalities, and one of its instances' files (for the date and the patient's name)."""
    modalities: dict[int, list[str]] = {i: [] for i in study_ids}
    for study_id, modality in session.execute(
        select(Series.study_id, Series.modality)
        .where(Series.study_id.in_(study_ids), Series.modality.is_not(None))
        .distinct()
        .order_by(Series.study_id, Series.modality)
    ):
        if modality:
            modalities[study_id].append(modality)
    first_file = dict(
        session.execute(
            select(Series.study_id, func.min(Instance.path))
            .join(Instance, Instance.series_id == Series.id)
            .where(Series.study_id.in_(study_ids))
            .group_by(Series.study_id)
        ).all()
    )
    return modalities, first_file


def list_studies(
    sessions: sessionmaker[Session],
    spool: Spool | None,
    *,
    limit: int,
    offset: int = 0,
    in_state: StudyState | None = None,
    since: datetime | None = None,
    with_patient: bool = False,
) -> dict[str, Any]:
    """Studies, the most recently received first; ``since`` keeps those received at or after it."""
    stmt = select(Study).order_by(Study.last_received_at.desc(), Study.id.desc())
    if in_state is not None:
        stmt = stmt.where(Study.state == in_state)
    if since is not None:
        stmt = stmt.where(Study.last_received_at >= since)
    with sessions() as session:
        rows, total = _page(session, stmt, limit, offset)
        studies = [s for (s,) in rows]
        modalities, first_file = _study_extras(session, [s.id for s in studies])
    items = [_study_fields(s, modalities[s.id], _header(spool, first_file.get(s.id)), with_patient) for s in studies]
    return {"items": items, "total": total, "limit": limit, "offset": offset}


def _selections(session: Session, job_ids: list[int]) -> dict[str, str]:
    # The worker records which series each job's pipeline took (audit kind "selection", subject the job id).
    rows = session.execute(
        select(AuditEvent.subject, AuditEvent.detail)
        .where(AuditEvent.kind == "selection", AuditEvent.subject.in_([str(i) for i in job_ids]))
        .order_by(AuditEvent.id)
    ).all()
    return {subject: detail for subject, detail in rows if subject is not None and detail is not None}


def _results_and_deliveries(
    session: Session, spool: Spool | None, job_ids: list[int]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    results = session.execute(select(Result).where(Result.job_id.in_(job_ids)).order_by(Result.id)).scalars().all()
    result_items = []
    for r in results:
        header = _header(spool, r.path)
        number = header.get("SeriesNumber") if header is not None else None
        result_items.append(
            {
                "id": r.id,
                "job_id": r.job_id,
                "kind": r.kind,
                "sop_instance_uid": r.sop_instance_uid,
                "series_instance_uid": r.series_instance_uid,
                "series_number": int(number) if number is not None and str(number) != "" else None,
            }
        )
    deliveries = session.execute(
        select(Delivery, Result.job_id, Result.kind, Result.sop_instance_uid)
        .join(Result, Result.id == Delivery.result_id)
        .where(Result.job_id.in_(job_ids))
        .order_by(Delivery.id)
    ).all()
    return result_items, [delivery_dict(d, job_id, kind, sop) for d, job_id, kind, sop in deliveries]


def study_detail(
    sessions: sessionmaker[Session], spool: Spool | None, study_uid: str, *, with_patient: bool = False
) -> dict[str, Any] | None:
    """A study with its series (and the route each took, or why none), jobs, results and deliveries."""
    with sessions() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).first()
        if study is None:
            return None
        modalities, first_file = _study_extras(session, [study.id])
        series_rows = session.execute(
            select(Series, func.count(Instance.id), func.min(Instance.path))
            .outerjoin(Instance, Instance.series_id == Series.id)
            .where(Series.study_id == study.id)
            .group_by(Series.id)
            .order_by(Series.id)
        ).all()
        series = []
        for se, count, path in series_rows:
            header = _header(spool, path)
            number = header.get("SeriesNumber") if header is not None else None
            series.append(
                {
                    "series_instance_uid": se.series_instance_uid,
                    "number": int(number) if number is not None and str(number) != "" else None,
                    "description": str(header.get("SeriesDescription", "")) or None if header is not None else None,
                    "modality": se.modality,
                    "instances": count,
                    "route": se.route,
                    "route_reason": se.route_reason,
                }
            )
        jobs = session.execute(select(Job).where(Job.study_id == study.id).order_by(Job.id)).scalars().all()
        selection = _selections(session, [j.id for j in jobs])
        results, deliveries = _results_and_deliveries(session, spool, [j.id for j in jobs])
        fields = _study_fields(study, modalities[study.id], _header(spool, first_file.get(study.id)), with_patient)
        return {
            **fields,
            "series": series,
            "jobs": [job_dict(j, study_uid, selection.get(str(j.id))) for j in jobs],
            "results": results,
            "deliveries": deliveries,
        }


def list_jobs(
    sessions: sessionmaker[Session], *, limit: int, offset: int = 0, in_state: JobState | None = None
) -> dict[str, Any]:
    """Jobs, the newest first."""
    stmt = select(Job, Study.study_instance_uid).join(Study, Study.id == Job.study_id).order_by(Job.id.desc())
    if in_state is not None:
        stmt = stmt.where(Job.state == in_state)
    with sessions() as session:
        rows, total = _page(session, stmt, limit, offset)
        selection = _selections(session, [j.id for j, _ in rows])
        items = [job_dict(j, uid, selection.get(str(j.id))) for j, uid in rows]
    return {"items": items, "total": total, "limit": limit, "offset": offset}


def job_detail(sessions: sessionmaker[Session], spool: Spool | None, job_id: int) -> dict[str, Any] | None:
    """A job with its results and their deliveries."""
    with sessions() as session:
        row = session.execute(
            select(Job, Study.study_instance_uid).join(Study, Study.id == Job.study_id).where(Job.id == job_id)
        ).first()
        if row is None:
            return None
        job, uid = row
        results, deliveries = _results_and_deliveries(session, spool, [job.id])
        return {
            **job_dict(job, uid, _selections(session, [job.id]).get(str(job.id))),
            "results": results,
            "deliveries": deliveries,
        }


def list_deliveries(
    sessions: sessionmaker[Session], *, limit: int, offset: int = 0, in_state: DeliveryState | None = None
) -> dict[str, Any]:
    """The outbox, the newest first."""
    stmt = (
        select(Delivery, Result.job_id, Result.kind, Result.sop_instance_uid)
        .join(Result, Result.id == Delivery.result_id)
        .order_by(Delivery.id.desc())
    )
    if in_state is not None:
        stmt = stmt.where(Delivery.state == in_state)
    with sessions() as session:
        rows, total = _page(session, stmt, limit, offset)
        items = [delivery_dict(d, job_id, kind, sop) for d, job_id, kind, sop in rows]
    return {"items": items, "total": total, "limit": limit, "offset": offset}


def list_audit(
    sessions: sessionmaker[Session], *, limit: int, offset: int = 0, kind: str | None = None
) -> dict[str, Any]:
    """The audit trail, the newest first. Its details are PHI-free as written (keywords and UIDs, never values)."""
    stmt = select(AuditEvent).order_by(AuditEvent.id.desc())
    if kind is not None:
        stmt = stmt.where(AuditEvent.kind == kind)
    with sessions() as session:
        rows, total = _page(session, stmt, limit, offset)
        items = [
            {"id": e.id, "kind": e.kind, "actor": e.actor, "subject": e.subject, "detail": e.detail, "at": _iso(e.at)}
            for (e,) in rows
        ]
    return {"items": items, "total": total, "limit": limit, "offset": offset}


def list_associations(
    sessions: sessionmaker[Session], *, limit: int, offset: int = 0, outcome: str | None = None
) -> dict[str, Any]:
    """Associations the node took part in (accepted, rejected with why, released, aborted), the newest first."""
    stmt = select(Association).order_by(Association.id.desc())
    if outcome is not None:
        stmt = stmt.where(Association.outcome == outcome)
    with sessions() as session:
        rows, total = _page(session, stmt, limit, offset)
        items = [
            {
                "id": a.id,
                "direction": a.direction,
                "calling_ae": a.calling_ae,
                "called_ae": a.called_ae,
                "host": a.peer_host,
                "outcome": a.outcome,
                "reason": a.reason,
                "stored": a.stored,
                "failed": a.failed,
                "started_at": _iso(a.started_at),
                "ended_at": _iso(a.ended_at),
            }
            for (a,) in rows
        ]
    return {"items": items, "total": total, "limit": limit, "offset": offset}
