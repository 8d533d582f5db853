"""Every state change of a study, a job and a delivery: the allowed transitions, written once.

ARCHITECTURE.md, invariant 9: this module is the only one that assigns a ``state``. Each table
below maps a state (``None``: a row being made) to the states it may go to. Each transition
function checks its move against its table, raises :class:`TransitionError` naming both states
when the table does not allow it, and sets the columns that belong to the move (who claimed a
job and when, when it ended, why a delivery is not delivered). What is the caller's own business
stays with the caller: when to try a delivery next, the model time of a job, audit events.

Time comes in as ``now`` (STYLE.md): no transition reads the clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from enum import Enum
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Delivery, DeliveryState, Job, JobState, Study, StudyState, WebhookEvent, WebhookState

S = TypeVar("S", bound=Enum)

_RECEIVING, _QUEUED, _UNROUTED, _PROCESSED = (
    StudyState.RECEIVING,
    StudyState.QUEUED,
    StudyState.UNROUTED,
    StudyState.PROCESSED,
)

#: Study: receiving until complete; then queued (jobs made) or, with no route, unrouted (version 1)
#: or processed (a later version: the study was analysed before); processed once every job of its
#: version has ended; queued again when a job of its version runs again; receiving again when a
#: late instance opens a new version (late_instances: new-version).
STUDY_TRANSITIONS: Mapping[StudyState | None, frozenset[StudyState]] = {
    None: frozenset({_RECEIVING}),
    _RECEIVING: frozenset({_QUEUED, _UNROUTED, _PROCESSED}),
    _QUEUED: frozenset({_PROCESSED, _RECEIVING}),
    _PROCESSED: frozenset({_QUEUED, _RECEIVING}),
    _UNROUTED: frozenset({_QUEUED, _RECEIVING}),
}

#: Job: queued when made; running once a worker claims it; ended (done, failed, not-applicable)
#: by its worker; queued again when its worker died (the reclaimer) or by an operator's re-run;
#: failed without running when an operator cancels it while it is queued.
JOB_TRANSITIONS: Mapping[JobState | None, frozenset[JobState]] = {
    None: frozenset({JobState.QUEUED}),
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED}),
    JobState.RUNNING: frozenset({JobState.DONE, JobState.FAILED, JobState.NOT_APPLICABLE, JobState.QUEUED}),
    JobState.DONE: frozenset({JobState.QUEUED}),
    JobState.FAILED: frozenset({JobState.QUEUED}),
    JobState.NOT_APPLICABLE: frozenset({JobState.QUEUED}),
}

#: Delivery: pending when made (or made due again); waiting while its destination names no
#: configured peer; after an attempt delivered, pending again (retry later) or failed (given up,
#: or the peer does not take its kind); a failed or delivered one is made due again by an
#: operator's retry or a re-made result.
DELIVERY_TRANSITIONS: Mapping[DeliveryState | None, frozenset[DeliveryState]] = {
    None: frozenset({DeliveryState.PENDING}),
    DeliveryState.PENDING: frozenset(
        {DeliveryState.PENDING, DeliveryState.WAITING, DeliveryState.DELIVERED, DeliveryState.FAILED}
    ),
    DeliveryState.WAITING: frozenset(
        {DeliveryState.WAITING, DeliveryState.PENDING, DeliveryState.DELIVERED, DeliveryState.FAILED}
    ),
    DeliveryState.FAILED: frozenset({DeliveryState.PENDING}),
    DeliveryState.DELIVERED: frozenset({DeliveryState.PENDING}),
}

#: A job that is queued or running: not ended, so its study is not processed yet.
OPEN_JOB_STATES = (JobState.QUEUED, JobState.RUNNING)
ENDED_JOB_STATES = (JobState.DONE, JobState.FAILED, JobState.NOT_APPLICABLE)


class TransitionError(ValueError):
    """A state change its table does not allow; the message names the row and both states."""

    def __init__(self, entity: str, ident: object, old: Enum | None, new: Enum, allowed: str) -> None:
        was = "new" if old is None else old.value
        super().__init__(f"{entity} {ident}: {was} -> {new.value} is not allowed ({allowed})")
        self.old = old
        self.new = new


def _check(entity: str, ident: object, table: Mapping[S | None, frozenset[S]], old: S | str | None, new: S) -> S | None:
    """``old`` as its enum (the hot path reads it as a string); raises when ``old -> new`` is not in ``table``."""
    was = type(new)(old) if isinstance(old, str) and not isinstance(old, type(new)) else old
    allowed = table.get(was, frozenset())  # type: ignore[arg-type]
    if new not in allowed:
        may = ", ".join(sorted(s.value for s in allowed)) or "nothing"
        raise TransitionError(entity, ident, was, new, f"from {'new' if was is None else was.value}: {may}")
    return was  # type: ignore[return-value]


# -- studies ------------------------------------------------------------------------------------
def study_values(study_uid: str, old: StudyState | str | None, new: StudyState, reason: str | None = None) -> dict:
    """The columns a study's move from ``old`` to ``new`` sets, as values for Core SQL.

    For the receiver's hot path (:mod:`node.receive.ingest`), which reads and writes studies with
    Core statements; ``state`` is given as its stored value. A study that starts receiving (again)
    is not complete, whatever its sender asked of an earlier version. ``reason``, when given,
    becomes the study's note.
    """
    _check("study", study_uid, STUDY_TRANSITIONS, old, new)
    values: dict[str, Any] = {"state": new.value}
    if new is _RECEIVING:
        values["complete_requested"] = False
    if reason is not None:
        values["note"] = reason
    return values


def set_study_state(study: Study, new: StudyState, reason: str | None, now: datetime) -> StudyState | None:
    """Move ``study`` to ``new``; ``reason`` (when given) becomes its note. Returns the state it had.

    ``now`` is taken as every transition takes it; a study keeps no time of change (its clock,
    ``last_received_at``, is the receiver's).
    """
    old = study.state
    for column, value in study_values(study.study_instance_uid, old, new, reason).items():
        setattr(study, column, new if column == "state" else value)
    return old


def queue_study_for(study: Study, job: Job, now: datetime) -> None:
    """``job`` is queued (again): its study, when processed (or unrouted) in that version, is queued until it ends."""
    if study.version == job.study_version and study.state in (_PROCESSED, _UNROUTED):
        set_study_state(study, _QUEUED, None, now)


# -- jobs ---------------------------------------------------------------------------------------
def set_job_state(
    job: Job, new: JobState, reason: str | None, now: datetime, *, worker: str | None = None
) -> JobState | None:
    """Move ``job`` to ``new`` with ``reason`` (None clears it); returns the state it had.

    Running: claimed by ``worker`` at ``now``, one more attempt. Queued: unclaimed; a job that had
    ended (an operator's re-run) starts its crash counter again, a re-run being a new run. Ended
    (done, failed, not-applicable): finished at ``now``.
    """
    old = _check("job", job.id or "(new)", JOB_TRANSITIONS, job.state, new)
    if new is JobState.RUNNING:
        if worker is None:
            raise ValueError(f"job {job.id}: a running job needs the worker that claimed it")
        job.claimed_by, job.started_at, job.heartbeat_at = worker, now, now
        job.attempts = (job.attempts or 0) + 1
    elif new is JobState.QUEUED:
        job.claimed_by = None
        job.finished_at = None
        if old in ENDED_JOB_STATES:
            job.attempts = 0
    else:
        job.finished_at = now
    job.state = new
    job.reason = reason
    return old


def finish_job(session: Session, job: Job, new: JobState, reason: str | None, now: datetime) -> None:
    """End a running ``job``; its study is processed once every job of its current version has ended."""
    set_job_state(job, new, reason, now)
    study = session.get(Study, job.study_id, with_for_update=True)
    if study is None or study.state != _QUEUED or study.version != job.study_version:
        return
    open_jobs = session.execute(
        select(Job.id).where(
            Job.study_id == study.id,
            Job.study_version == study.version,
            Job.id != job.id,
            Job.state.in_(OPEN_JOB_STATES),
        )
    ).first()
    if open_jobs is None:
        set_study_state(study, _PROCESSED, None, now)


def postpone_job(job: Job, reason: str, now: datetime, retry_at: datetime) -> None:
    """A running job that met a transient failure (disk full, database away) waits, queued, until ``retry_at``.

    The run did not crash its worker, so it does not count towards the crash limit; ``postponed`` counts
    the waits (the backoff grows with it). Its study stays queued.
    """
    set_job_state(job, JobState.QUEUED, reason, now)
    job.attempts = max(0, (job.attempts or 0) - 1)
    job.postponed = (job.postponed or 0) + 1
    job.retry_at = retry_at


def requeue_job(session: Session, job: Job, reason: str, now: datetime) -> JobState:
    """Queue an ended job again (operator retry or reprocess); returns the state it had.

    The crash counter starts again (a re-run is a new run), and a processed study of the same
    version becomes queued until this job ends too. Raises :class:`TransitionError` for a queued
    or running job: only the reclaimer requeues a running job, whose worker died.
    """
    previous = job.state
    if previous not in ENDED_JOB_STATES:
        ended = ", ".join(s.value for s in ENDED_JOB_STATES)
        raise TransitionError("job", job.id, previous, JobState.QUEUED, f"a re-run queues an ended job: {ended}")
    set_job_state(job, JobState.QUEUED, reason, now)
    job.retry_at, job.postponed = None, 0  # an operator's re-run runs now
    study = session.get(Study, job.study_id)
    if study is not None:
        queue_study_for(study, job, now)
    return previous


# -- deliveries ---------------------------------------------------------------------------------
def set_delivery_state(row: Delivery, new: DeliveryState, reason: str | None, now: datetime) -> DeliveryState | None:
    """Move ``row`` to ``new``; ``reason`` is why it is not delivered (None clears it). Returns the state it had.

    Delivered: at ``now``. When the next attempt is due is the outbox's business.
    """
    old = _check("delivery", row.id or "(new)", DELIVERY_TRANSITIONS, row.state, new)
    row.state = new
    row.last_error = reason
    if new is DeliveryState.DELIVERED:
        row.delivered_at = now
    return old


def make_delivery_due(row: Delivery, now: datetime) -> None:
    """Send this delivery again from the start (a re-made result, an operator's retry).

    A live lease is left alone: the sender holding it records the outcome of the attempt it is
    making, and no row is ever sent by two processes at once. The attempt count starts again, so
    the retry policy gives the new sending its whole give-up window.
    """
    set_delivery_state(row, DeliveryState.PENDING, None, now)
    row.attempts = 0
    row.next_attempt_at = now
    row.last_status = None
    row.delivered_at = None


# -- webhook events -----------------------------------------------------------------------------
#: A webhook event (node/notify/): pending when made, until its receiver answers 2xx (delivered) or
#: its webhook's retry window runs out (failed). Neither is sent again.
WEBHOOK_TRANSITIONS: Mapping[WebhookState | None, frozenset[WebhookState]] = {
    None: frozenset({WebhookState.PENDING}),
    WebhookState.PENDING: frozenset({WebhookState.DELIVERED, WebhookState.FAILED}),
}


def set_webhook_state(row: WebhookEvent, new: WebhookState, reason: str | None, now: datetime) -> WebhookState | None:
    """Move ``row`` to ``new``; ``reason`` is why it is not delivered (None clears it). Returns the state it had.

    Delivered: at ``now``. When the next attempt is due is the sender's business.
    """
    old = _check("webhook event", row.id or "(new)", WEBHOOK_TRANSITIONS, row.state, new)
    row.state = new
    row.last_error = reason
    if new is WebhookState.DELIVERED:
        row.delivered_at = now
    return old
