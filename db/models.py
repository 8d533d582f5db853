"""SQLAlchemy 2 models: the node's whole state.

Every state change of a study, a job and a delivery is a row change here, so a
restarted process resumes from the database alone (ARCHITECTURE.md, invariant 2).
Patient-identifying values are stored where an operator needs them (``ainode
status``) but never logged at INFO level.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given; use datetime.now(UTC)")
        if value is not None and dialect.name == "sqlite":
            return value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Store the enum's value (readable in SQL) in a VARCHAR rather than a native PostgreSQL
    # ENUM type, so migrations stay identical on both backends. No CHECK constraint either
    # (SQLAlchemy 2's default for non-native enums): a new state needs no migration.
    return Enum(cls, name=name, native_enum=False, values_callable=lambda e: [m.value for m in e], length=32)


class StudyState(str, enum.Enum):
    RECEIVING = "receiving"  # instances are (or may still be) arriving
    QUEUED = "queued"  # complete; jobs created
    UNROUTED = "unrouted"  # complete, but no route matched any series
    PROCESSED = "processed"  # every job of the current version has ended


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    NOT_APPLICABLE = "not-applicable"


class DeliveryState(str, enum.Enum):
    PENDING = "pending"
    DELIVERED = "delivered"
    #: Gave up after the retry policy's give_up_after_s, or the peer does not take this kind of result.
    FAILED = "failed"
    #: The destination names no configured peer (yet): re-checked periodically, no attempt counted,
    #: never given up. ``last_error`` says what is missing. The column has no CHECK constraint
    #: (non-native enum, SQLAlchemy 2 default), so this value needs no migration.
    WAITING = "waiting"


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    state: Mapped[StudyState] = mapped_column(_enum(StudyState, "study_state"), default=StudyState.RECEIVING)
    #: Incremented when instances arrive after the study was processed (late_instances: new-version).
    version: Mapped[int] = mapped_column(Integer, default=1)
    #: The first peer that sent this version of the study: where "sender" results go.
    sender_ae: Mapped[str | None] = mapped_column(String(16))
    sender_host: Mapped[str | None] = mapped_column(String(255))
    first_received_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    #: Set when a complete_on_release sender released its association: ready without waiting.
    complete_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    note: Mapped[str | None] = mapped_column(Text)

    series: Mapped[list[Series]] = relationship(back_populates="study")
    jobs: Mapped[list[Job]] = relationship(back_populates="study")

    __table_args__ = (Index("ix_studies_state_last", "state", "last_received_at"),)


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    #: Router decision for this series, made once from its first instance's header:
    #: the route's name, or None with ``route_reason`` saying why nothing matched.
    routed: Mapped[bool] = mapped_column(Boolean, default=False)
    route: Mapped[str | None] = mapped_column(String(64))
    route_reason: Mapped[str | None] = mapped_column(Text)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    #: Path of the file relative to the spool root.
    path: Mapped[str] = mapped_column(String(512))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    study_version: Mapped[int] = mapped_column(Integer, default=1)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id", ondelete="SET NULL"))

    series: Mapped[Series] = relationship(back_populates="instances")


class Association(Base):
    """Audit of every association: who called, from where, what was stored, how it ended."""

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    direction: Mapped[str] = mapped_column(String(8), default="in")  # "in" (we are SCP) or "out"
    calling_ae: Mapped[str] = mapped_column(String(16))
    called_ae: Mapped[str] = mapped_column(String(16))
    peer_host: Mapped[str | None] = mapped_column(String(255))
    peer_port: Mapped[int | None] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    #: accepted, rejected, released, aborted
    outcome: Mapped[str] = mapped_column(String(16), default="accepted")
    reason: Mapped[str | None] = mapped_column(Text)
    stored: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    study_version: Mapped[int] = mapped_column(Integer, default=1)
    route: Mapped[str] = mapped_column(String(64))
    pipeline: Mapped[str] = mapped_column(String(64))
    #: Destination names ("sender" or peer names) as configured on the route.
    destinations: Mapped[list[str]] = mapped_column(JSON, default=list)
    sender_ae: Mapped[str | None] = mapped_column(String(16))
    sender_host: Mapped[str | None] = mapped_column(String(255))
    state: Mapped[JobState] = mapped_column(_enum(JobState, "job_state"), default=JobState.QUEUED)
    reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    heartbeat_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    #: Seconds spent in the model and in the whole job, for operators and benchmarks.
    model_s: Mapped[float | None] = mapped_column(Float)
    total_s: Mapped[float | None] = mapped_column(Float)
    #: A queued job is not claimed before this time (it waits out a transient failure: disk full, database).
    retry_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    #: How many times a transient failure put this run off (the backoff grows with it).
    postponed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: The route's priority when the job was made: workers claim the highest first (STAT before routine).
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    study: Mapped[Study] = relationship(back_populates="jobs")
    results: Mapped[list[Result]] = relationship(back_populates="job")

    __table_args__ = (
        UniqueConstraint("study_id", "route", "study_version", name="uq_job_study_route_version"),
        Index("ix_jobs_state_id", "state", "id"),
        Index("ix_jobs_state_priority_id", "state", "priority", "id"),
    )


class Result(Base):
    """A DICOM object the node made; its UIDs are fixed here, before any delivery."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(8))  # seg, sr, sc
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)

    job: Mapped[Job] = relationship(back_populates="results")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="result")


class Delivery(Base):
    """One result to one destination: the outbox."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    ae_title: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    state: Mapped[DeliveryState] = mapped_column(_enum(DeliveryState, "delivery_state"), default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    #: A sender holds a delivery until this time; another process may take it over afterwards.
    leased_until: Mapped[datetime | None] = mapped_column(UtcDateTime())
    leased_by: Mapped[str | None] = mapped_column(String(128))
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column(UtcDateTime())

    result: Mapped[Result] = relationship(back_populates="deliveries")

    __table_args__ = (
        UniqueConstraint("result_id", "destination", name="uq_delivery_result_destination"),
        Index("ix_deliveries_state_next", "state", "next_attempt_at"),
    )


class AuditEvent(Base):
    """Operator-visible trail: associations, deliveries, operator actions, job transitions."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(32))  # association, delivery, operator, job, study
    actor: Mapped[str | None] = mapped_column(String(128))
    subject: Mapped[str | None] = mapped_column(String(128))
    detail: Mapped[str | None] = mapped_column(Text)
    #: When the event reached the site's audit repository (``audit.syslog``, node/audit/); None: not yet.
    #: A mark per event, not one "last id" cursor: PostgreSQL commits ids out of order, and a cursor
    #: past an id still being committed would skip that event for ever.
    forwarded_at: Mapped[datetime | None] = mapped_column(UtcDateTime())

    __table_args__ = (
        # Only the events not forwarded yet: the forwarder's one query, small once it has caught up.
        Index(
            "ix_audit_events_unforwarded",
            "id",
            postgresql_where=text("forwarded_at IS NULL"),
            sqlite_where=text("forwarded_at IS NULL"),
        ),
    )


class AuditForwarding(Base):
    """The audit trail's way to the site's audit repository: who forwards it now, and how that goes.

    One row per target (``syslog``). Of the processes sharing a database, the one holding the lease
    forwards, so events go out once and in order; another takes over when the lease runs out.
    """

    __tablename__ = "audit_forwarding"

    target: Mapped[str] = mapped_column(String(64), primary_key=True)
    leased_by: Mapped[str | None] = mapped_column(String(128))
    leased_until: Mapped[datetime | None] = mapped_column(UtcDateTime())
    #: Events forwarded in all, and the last time some were.
    forwarded: Mapped[int] = mapped_column(Integer, default=0)
    last_forwarded_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    #: Since when the target cannot be reached, and why; None while it can.
    failing_since: Mapped[datetime | None] = mapped_column(UtcDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)


class WebhookState(str, enum.Enum):
    PENDING = "pending"
    DELIVERED = "delivered"
    #: Given up after the hook's retry window (or the hook is no longer configured); ``last_error`` says why.
    FAILED = "failed"


class WebhookEvent(Base):
    """One event (a job ended, a delivery given up) to one configured webhook: the notifications' outbox.

    Written in the transaction of the state change it tells about (node/notify/record.py), so an event
    is neither lost nor told about a change that was rolled back. ``payload`` is the JSON body without
    its ``id`` (this row's id, added when sent): the same bytes at every retry.
    """

    __tablename__ = "webhook_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: The webhook's name in the config (``webhooks[].name``).
    hook: Mapped[str] = mapped_column(String(64))
    #: job.done, job.failed, job.not_analysed, delivery.failed
    event: Mapped[str] = mapped_column(String(32))
    #: What the event is about, for operators: "job 12", "delivery 40".
    subject: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict] = mapped_column(JSON)
    state: Mapped[WebhookState] = mapped_column(_enum(WebhookState, "webhook_state"), default=WebhookState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    #: A sender holds the row until this time; another process may take it over afterwards.
    leased_until: Mapped[datetime | None] = mapped_column(UtcDateTime())
    leased_by: Mapped[str | None] = mapped_column(String(128))
    #: The receiver's HTTP status of the last attempt (None: no answer).
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column(UtcDateTime())

    __table_args__ = (Index("ix_webhook_events_state_next", "state", "next_attempt_at"),)
