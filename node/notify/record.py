"""Write a webhook row in the same transaction as the job or delivery change it tells about.

The recorder listens to its session factory's flushes: whatever ends a job (a worker, the reclaimer
failing a job whose workers kept dying) or gives a delivery up (the outbox), the change and its
webhook rows commit together or not at all. One place sees every such change, so no caller can
forget to notify, and a node without webhooks installs no listener and writes nothing.

The payload is built here, once, from what the database holds at that moment: UIDs, route,
pipeline, state, reason, result kinds and counts. Never a patient's name, ID, birth date or
accession number (ARCHITECTURE.md invariant 8): job reasons are redacted by the worker already,
and every reason is redacted here again with the study's stored patient ID and accession number.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import event, func, select
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.attributes import get_history
from sqlalchemy.orm.base import PASSIVE_NO_INITIALIZE

from db.models import Delivery, DeliveryState, Job, JobState, Result, Study, WebhookEvent, WebhookState, utcnow
from db.states import set_webhook_state
from node.config import NotificationEvent, Webhook
from node.phi import MIN_LENGTH, redact

#: The job state each job event tells about.
JOB_EVENTS = {
    JobState.DONE: NotificationEvent.JOB_DONE,
    JobState.FAILED: NotificationEvent.JOB_FAILED,
    JobState.NOT_APPLICABLE: NotificationEvent.JOB_NOT_ANALYSED,
}
#: Reasons are long enough to say why, short enough for a chat message.
MAX_REASON_CHARS = 1000


class WebhookRecorder:
    """Adds the rows of the events the configured webhooks subscribe to, in the flush that makes the change.

    Parameters
    ----------
    hooks
        The configured webhooks (``Config.webhooks``).
    node
        Who the node is in every payload: ``{"ae_title": ..., "device_uid": ...}``.
    clock
        The time of an event whose row carries none (a delivery given up); a job's is its ``finished_at``.
    """

    def __init__(self, hooks: Sequence[Webhook], node: dict[str, str], clock: Callable[[], datetime] = utcnow) -> None:
        self.subscribers: dict[NotificationEvent, list[str]] = {}
        for hook in hooks:
            for name in hook.events:
                self.subscribers.setdefault(name, []).append(hook.name)
        self.node = dict(node)
        self.clock = clock

    def install(self, sessions: sessionmaker[Session]) -> bool:
        """Listen to the flushes of ``sessions``; False (nothing installed) when no webhook subscribes to anything."""
        if not self.subscribers:
            return False
        event.listen(sessions, "after_flush", self._after_flush)
        return True

    # -- the listener ------------------------------------------------------------------------------
    def _after_flush(self, session: Session, _context: object) -> None:
        # after_flush still shows the flush's objects as new/dirty with their attribute history, and
        # rows added here are flushed by the commit's next round (SQLAlchemy's documented pattern).
        # Queries here do not autoflush (the session is flushing).
        for obj in [*session.new, *session.dirty]:
            if isinstance(obj, Job):
                name = JOB_EVENTS.get(_moved_to(obj, JobState))  # type: ignore[arg-type]
                if name is not None and name in self.subscribers:
                    self._add(session, name, f"job {obj.id}", self.job_payload(session, obj, name))
            elif isinstance(obj, Delivery) and _moved_to(obj, DeliveryState) is DeliveryState.FAILED:
                name = NotificationEvent.DELIVERY_FAILED
                if name in self.subscribers:
                    self._add(session, name, f"delivery {obj.id}", self.delivery_payload(session, obj))

    def _add(self, session: Session, name: NotificationEvent, subject: str, payload: dict[str, Any]) -> None:
        now = self.clock()
        for hook in self.subscribers[name]:
            row = WebhookEvent(
                hook=hook, event=name.value, subject=subject, payload=payload, attempts=0, created_at=now,
                next_attempt_at=now,
            )  # fmt: skip
            set_webhook_state(row, WebhookState.PENDING, None, now)
            session.add(row)

    # -- payloads ----------------------------------------------------------------------------------
    def job_payload(self, session: Session, job: Job, name: NotificationEvent) -> dict[str, Any]:
        study = session.get(Study, job.study_id)
        results = session.execute(
            select(Result.kind, Result.sop_instance_uid, Result.series_instance_uid)
            .where(Result.job_id == job.id)
            .order_by(Result.id)
        ).all()
        deliveries = 0
        if results:
            deliveries = session.execute(
                select(func.count(Delivery.id))
                .join(Result, Result.id == Delivery.result_id)
                .where(Result.job_id == job.id)
            ).scalar_one()
        at = job.finished_at or self.clock()
        return {
            **self._head(name, at, study),
            "job_id": job.id,
            "route": job.route,
            "pipeline": job.pipeline,
            "state": _value(job.state),
            "reason": _safe_reason(job.reason, study),
            "results": [
                {"kind": kind, "sop_instance_uid": sop, "series_instance_uid": series} for kind, sop, series in results
            ],
            "counts": {
                "results": len(results),
                "deliveries": deliveries,
                "instances": study.instance_count if study is not None else 0,
                "attempts": job.attempts or 0,
            },
        }

    def delivery_payload(self, session: Session, row: Delivery) -> dict[str, Any]:
        found = session.execute(
            select(Result.kind, Result.sop_instance_uid, Result.series_instance_uid, Job)
            .join(Job, Job.id == Result.job_id)
            .where(Result.id == row.result_id)
        ).first()
        job: Job | None = found[3] if found is not None else None
        study = session.get(Study, job.study_id) if job is not None else None
        return {
            **self._head(NotificationEvent.DELIVERY_FAILED, self.clock(), study),
            "job_id": job.id if job is not None else None,
            "route": job.route if job is not None else None,
            "pipeline": job.pipeline if job is not None else None,
            "state": _value(row.state),
            "reason": _safe_reason(row.last_error, study),
            "delivery_id": row.id,
            # The destination's name in the config and the AE title last tried: no patient values.
            "destination": row.destination,
            "destination_ae_title": row.ae_title or None,
            "results": [{"kind": found[0], "sop_instance_uid": found[1], "series_instance_uid": found[2]}]
            if found is not None
            else [],
            "counts": {"attempts": row.attempts or 0},
        }

    def _head(self, name: NotificationEvent, at: datetime, study: Study | None) -> dict[str, Any]:
        return {
            "event": name.value,
            "at": at.isoformat(),
            "node": self.node,
            "study_instance_uid": study.study_instance_uid if study is not None else None,
        }


def _moved_to(obj: Job | Delivery, enum_type: type[JobState] | type[DeliveryState]) -> JobState | DeliveryState | None:
    """The state ``obj`` moved to in this flush, or None when its state did not change."""
    # PASSIVE_NO_INITIALIZE: a state not loaded was not changed, and is not loaded for the question.
    history = get_history(obj, "state", passive=PASSIVE_NO_INITIALIZE)
    if not history.added:
        return None
    new = enum_type(_value(history.added[-1]))
    old = [enum_type(_value(s)) for s in history.deleted if s is not None]
    return None if old and old[-1] is new else new


def _value(state: object) -> str:
    return str(getattr(state, "value", state))


def _safe_reason(reason: str | None, study: Study | None) -> str | None:
    """``reason``, cut short and with the study's stored identifiers redacted (a second guard, after the worker's)."""
    if not reason:
        return reason
    stored = (study.patient_id, study.accession_number) if study is not None else ()
    values = [v for v in stored if v and len(v) >= MIN_LENGTH]
    text = redact(reason, values) or ""
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"
