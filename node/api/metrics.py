"""Prometheus metrics computed from the database at scrape time.

The database already holds every count a monitor asks for (studies, jobs, deliveries,
associations, instances), so the collector reads it when scraped instead of keeping a second
set of counters that a restart or another process of the node would not see. Labels are
pipelines, states and outcomes only: never a UID, a patient ID or an AE title.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import case, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker

from db.models import (
    Association,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Study,
    WebhookEvent,
    utcnow,
)
from node.receive.spool import Spool

#: Upper bounds (seconds) of the job duration and inference time histograms.
DURATION_BUCKETS_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class NodeCollector(Collector):
    """The node's state as Prometheus metrics, read from the database at each scrape.

    Parameters
    ----------
    sessions
        The node's database.
    spool
        The spool whose disk's free space is reported.
    now
        The clock for the age of the oldest pending delivery.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        spool: Spool,
        now: Callable[[], datetime] = utcnow,
        rejected_instances: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        self.sessions = sessions
        self.spool = spool
        self.now = now
        self.rejected_instances = rejected_instances

    def collect(self) -> Iterator[Metric]:
        with self.sessions() as session:
            yield _by_labels(
                "ainode_studies", "Studies by state.", ["state"],
                session.execute(select(Study.state, func.count()).group_by(Study.state)).all(),
            )  # fmt: skip
            yield _by_labels(
                "ainode_jobs", "Jobs by pipeline and state.", ["pipeline", "state"],
                session.execute(select(Job.pipeline, Job.state, func.count()).group_by(Job.pipeline, Job.state)).all(),
            )  # fmt: skip
            yield _by_labels(
                "ainode_deliveries", "Deliveries (results to a destination) by state.", ["state"],
                session.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all(),
            )  # fmt: skip
            yield _by_labels(
                "ainode_webhook_events", "Webhook notifications (an event to a webhook) by webhook and state.",
                ["hook", "state"],
                session.execute(
                    select(WebhookEvent.hook, WebhookEvent.state, func.count())
                    .group_by(WebhookEvent.hook, WebhookEvent.state)
                ).all(),
            )  # fmt: skip
            oldest = session.execute(
                select(func.min(Delivery.created_at)).where(Delivery.state == DeliveryState.PENDING)
            ).scalar_one()
            age = GaugeMetricFamily(
                "ainode_oldest_pending_delivery_age_seconds",
                "Age of the oldest delivery not yet delivered nor given up (0: none pending).",
            )
            age.add_metric([], max(0.0, (self.now() - _aware(oldest)).total_seconds()) if oldest is not None else 0.0)
            yield age
            count, size = session.execute(select(func.count(), func.coalesce(func.sum(Instance.size_bytes), 0))).one()
            yield GaugeMetricFamily("ainode_received_instances", "Instances received and kept (rows).", value=count)
            yield GaugeMetricFamily("ainode_received_bytes", "Bytes of the instances received and kept.", value=size)
            yield _by_labels(
                "ainode_associations", "Incoming associations by outcome.", ["outcome"],
                session.execute(
                    select(Association.outcome, func.count())
                    .where(Association.direction == "in")
                    .group_by(Association.outcome)
                ).all(),
            )  # fmt: skip
            yield _histogram(session, "ainode_job_duration_seconds", "Time of finished jobs, whole job.", Job.total_s)
            yield _histogram(session, "ainode_job_model_seconds", "Time of finished jobs in the model.", Job.model_s)
        free = GaugeMetricFamily("ainode_spool_free_bytes", "Free space on the spool's disk.")
        free.add_metric([], self.spool.free_bytes())
        yield free
        if self.rejected_instances is not None:
            # Refused C-STOREs leave no row: this process counts them (a counter, from 0 at its start).
            rejected = CounterMetricFamily(
                "ainode_rejected_instances", "C-STOREs this process refused, by reason.", labels=["reason"]
            )
            for reason, count in sorted(self.rejected_instances().items()):
                rejected.add_metric([reason], count)
            yield rejected


def make_registry(collector: Collector) -> CollectorRegistry:
    """A registry of its own (not the process-wide default): several nodes may run in one process."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def _by_labels(name: str, documentation: str, labels: list[str], rows: Sequence[Any]) -> GaugeMetricFamily:
    metric = GaugeMetricFamily(name, documentation, labels=labels)
    for *values, count in rows:
        metric.add_metric([getattr(v, "value", v) for v in values], count)
    return metric


def _histogram(
    session: Session, name: str, documentation: str, column: InstrumentedAttribute[float | None]
) -> HistogramMetricFamily:
    """A histogram by pipeline over the ``column`` seconds of the jobs that ended with it recorded."""
    rows = session.execute(
        select(
            Job.pipeline,
            func.count(),
            func.sum(column),
            *(func.sum(case((column <= bound, 1), else_=0)) for bound in DURATION_BUCKETS_S),
        )
        .where(column.is_not(None), Job.state.in_([JobState.DONE, JobState.NOT_APPLICABLE, JobState.FAILED]))
        .group_by(Job.pipeline)
    ).all()
    metric = HistogramMetricFamily(name, documentation, labels=["pipeline"])
    for pipeline, count, total, *within in rows:
        buckets = [(str(bound), n) for bound, n in zip(DURATION_BUCKETS_S, within, strict=True)] + [("+Inf", count)]
        metric.add_metric([pipeline], buckets, total)
    return metric


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
