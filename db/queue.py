"""The job queue and the outbox lease: atomic claims shared by many processes.

PostgreSQL: ``SELECT … FOR UPDATE SKIP LOCKED`` lets several node processes on several
machines take different rows at once without waiting on each other. SQLite: the engine
begins every transaction with ``BEGIN IMMEDIATE`` (db.engine), which serialises writers,
so the same select-then-update is atomic there too.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from db.engine import is_postgres
from db.models import AuditEvent, Delivery, DeliveryState, Job, JobState, Study, utcnow
from db.states import finish_job, set_job_state


def process_identity(suffix: str = "") -> str:
    """``host:pid[:suffix]`` — who holds a claim, so a restarted host can reclaim its own."""
    ident = f"{socket.gethostname()}:{os.getpid()}"
    return f"{ident}:{suffix}" if suffix else ident


def claim_next_job(sessions: sessionmaker[Session], worker_id: str, now: datetime | None = None) -> Job | None:
    """Move the queued job of highest priority (then the oldest) to running for ``worker_id``; None when none is due.

    A STAT route's job overtakes the routine ones still queued, not those already running. A job put off
    by a transient failure (``retry_at``) is not due before that time, whatever its priority.
    """
    now = now or utcnow()
    with sessions() as session, session.begin():
        stmt = (
            select(Job)
            .where(Job.state == JobState.QUEUED, or_(Job.retry_at.is_(None), Job.retry_at <= now))
            .order_by(Job.priority.desc(), Job.id)
            .limit(1)
        )
        if is_postgres(session.get_bind()):
            stmt = stmt.with_for_update(skip_locked=True)
        job = session.scalars(stmt).first()
        if job is None:
            return None
        set_job_state(job, JobState.RUNNING, job.reason, now, worker=worker_id)
        session.flush()
        session.expunge(job)
        return job


def next_due_study(sessions: sessionmaker[Session], now: datetime | None = None) -> str | None:
    """The Study Instance UID of the job :func:`claim_next_job` would take now (not claimed); None when none is due."""
    now = now or utcnow()
    with sessions() as session:
        return session.scalars(
            select(Study.study_instance_uid)
            .join(Job, Job.study_id == Study.id)
            .where(Job.state == JobState.QUEUED, or_(Job.retry_at.is_(None), Job.retry_at <= now))
            .order_by(Job.priority.desc(), Job.id)
            .limit(1)
        ).first()


def heartbeat(sessions: sessionmaker[Session], job_ids: list[int], now: datetime | None = None) -> None:
    if not job_ids:
        return
    with sessions() as session, session.begin():
        session.execute(
            update(Job).where(Job.id.in_(job_ids), Job.state == JobState.RUNNING).values(heartbeat_at=now or utcnow())
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reclaim_stale_jobs(
    sessions: sessionmaker[Session],
    *,
    lease_s: float,
    max_attempts: int,
    now: datetime | None = None,
) -> list[int]:
    """Requeue running jobs whose process died.

    A job is stale when its heartbeat is older than ``lease_s`` (any host), or at once when
    it was claimed on this host by a process that no longer exists (a restart after a
    crash need not wait for the lease). A job that has crashed its worker ``max_attempts``
    times fails instead, so one poisonous study cannot loop for ever.
    """
    now = now or utcnow()
    host = socket.gethostname()
    reclaimed: list[int] = []
    with sessions() as session, session.begin():
        stmt = select(Job).where(Job.state == JobState.RUNNING)
        if is_postgres(session.get_bind()):
            stmt = stmt.with_for_update(skip_locked=True)
        for job in session.scalars(stmt):
            dead_here = _held_by_dead_process_here(job.claimed_by, host)
            expired = job.heartbeat_at is None or job.heartbeat_at < now - timedelta(seconds=lease_s)
            if not (dead_here or expired):
                continue
            if job.attempts >= max_attempts:
                # finish_job, not set_job_state: the study must leave "queued" with its last job (a study left
                # queued for ever was found by the kill -9 campaign).
                why = f"worker died {job.attempts} times while running this job"
                finish_job(session, job, JobState.FAILED, why, now)
            else:
                set_job_state(job, JobState.QUEUED, f"requeued: worker {job.claimed_by} stopped while running it", now)
            job.claimed_by = None
            reclaimed.append(job.id)
    return reclaimed


def _held_by_dead_process_here(owner: str | None, host: str) -> bool:
    owner_host, _, rest = (owner or "").partition(":")
    pid_text = rest.partition(":")[0]
    return owner_host == host and pid_text.isdigit() and not _pid_alive(int(pid_text))


def reclaim_dead_deliveries(sessions: sessionmaker[Session], now: datetime | None = None) -> list[int]:
    """Release at once the deliveries leased by a process of this host that no longer exists.

    A sender killed during an attempt leaves its lease until it expires (minutes): the results wait
    that long after a restart, and a PACS that stored them before the kill gets them again later.
    Released now, they are sent again at once, with the same SOP Instance UIDs (a PACS keeps one
    copy), and each is audited as a re-delivery: the attempt may have reached the peer.
    """
    now = now or utcnow()
    host = socket.gethostname()
    released: list[int] = []
    with sessions() as session, session.begin():
        stmt = select(Delivery).where(
            Delivery.state.in_([DeliveryState.PENDING, DeliveryState.WAITING]),
            Delivery.leased_until.is_not(None),
            Delivery.leased_until >= now,
        )
        if is_postgres(session.get_bind()):
            stmt = stmt.with_for_update(skip_locked=True)
        for row in session.scalars(stmt):
            if not _held_by_dead_process_here(row.leased_by, host):
                continue
            session.add(
                AuditEvent(
                    kind="redelivery",
                    actor=row.leased_by,
                    subject=str(row.id),
                    detail=f"sender {row.leased_by} died during an attempt to {row.destination}; the result may have"
                    " reached the peer and is sent again with the same SOP Instance UID",
                )
            )
            row.leased_until = None
            row.leased_by = None
            released.append(row.id)
    return released


def lease_due_deliveries(
    sessions: sessionmaker[Session],
    owner: str,
    *,
    lease_s: float,
    limit: int = 200,
    now: datetime | None = None,
    only: Sequence[int] | None = None,
) -> list[int]:
    """Take the deliveries that are due and not held by another sender; returns their ids.

    Pending deliveries are due for an attempt; waiting ones for a new look at the configuration
    (is their peer known now?). ``only`` restricts the lease to these delivery ids. Rows this
    owner holds already (an operator's retry leases what it made due) are taken too.
    """
    now = now or utcnow()
    with sessions() as session, session.begin():
        stmt = (
            select(Delivery)
            .where(
                Delivery.state.in_([DeliveryState.PENDING, DeliveryState.WAITING]),
                Delivery.next_attempt_at <= now,
                or_(Delivery.leased_until.is_(None), Delivery.leased_until < now, Delivery.leased_by == owner),
            )
            .order_by(Delivery.next_attempt_at, Delivery.id)
            .limit(limit)
        )
        if only is not None:
            stmt = stmt.where(Delivery.id.in_(list(only)))
        if is_postgres(session.get_bind()):
            stmt = stmt.with_for_update(skip_locked=True)
        rows = list(session.scalars(stmt))
        for row in rows:
            row.leased_until = now + timedelta(seconds=lease_s)
            row.leased_by = owner
        return [row.id for row in rows]
