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
from db.models import Delivery, DeliveryState, Job, JobState, utcnow
from db.states import set_job_state


def process_identity(suffix: str = "") -> str:
    """``host:pid[:suffix]`` — who holds a claim, so a restarted host can reclaim its own."""
    ident = f"{socket.gethostname()}:{os.getpid()}"
    return f"{ident}:{suffix}" if suffix else ident


def claim_next_job(sessions: sessionmaker[Session], worker_id: str, now: datetime | None = None) -> Job | None:
    """Move the oldest queued job to running for ``worker_id``; None when the queue is empty."""
    now = now or utcnow()
    with sessions() as session, session.begin():
        stmt = select(Job).where(Job.state == JobState.QUEUED).order_by(Job.id).limit(1)
        if is_postgres(session.get_bind()):
            stmt = stmt.with_for_update(skip_locked=True)
        job = session.scalars(stmt).first()
        if job is None:
            return None
        set_job_state(job, JobState.RUNNING, job.reason, now, worker=worker_id)
        session.flush()
        session.expunge(job)
        return job


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
            owner_host, _, rest = (job.claimed_by or "").partition(":")
            pid_text = rest.partition(":")[0]
            dead_here = owner_host == host and pid_text.isdigit() and not _pid_alive(int(pid_text))
            expired = job.heartbeat_at is None or job.heartbeat_at < now - timedelta(seconds=lease_s)
            if not (dead_here or expired):
                continue
            if job.attempts >= max_attempts:
                set_job_state(job, JobState.FAILED, f"worker died {job.attempts} times while running this job", now)
            else:
                set_job_state(job, JobState.QUEUED, f"requeued: worker {job.claimed_by} stopped while running it", now)
            job.claimed_by = None
            reclaimed.append(job.id)
    return reclaimed


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
