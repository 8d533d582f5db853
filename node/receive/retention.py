"""Retention: the received images of a study are deleted a while after its results went out.

What the node made (result objects, their rows and delivery records) stays; only the source
instances the spool kept for the analysis go, with their rows, and the study's note says so.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, delete, select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Delivery, DeliveryState, Instance, Job, Series, Study, StudyState, utcnow
from db.states import OPEN_JOB_STATES
from node.receive.spool import Spool

log = logging.getLogger("ainode.retention")


class Retention:
    """Deletes received images ``retention_days`` after a study's last delivery (None: keeps them)."""

    def __init__(self, sessions: sessionmaker[Session], spool: Spool, retention_days: float | None) -> None:
        self.sessions = sessions
        self.spool = spool
        self.retention_days = retention_days

    def run(self, now: datetime | None = None) -> int:
        """Delete received images of studies whose results were delivered ``retention_days`` ago or more.

        A study qualifies once it is processed (or unrouted), no job of it is open, no delivery of it
        is pending or waiting, and both its last instance and its last delivery are older than the
        cutoff: a study whose PACS took the results only yesterday keeps its images.
        """
        if self.retention_days is None:
            return 0
        cutoff = (now or utcnow()) - timedelta(days=self.retention_days)
        expired: list[tuple[int, str]] = []
        with self.sessions() as session:
            candidates = session.execute(
                select(Study.id, Study.study_instance_uid).where(
                    Study.state.in_([StudyState.PROCESSED, StudyState.UNROUTED]),
                    Study.last_received_at < cutoff,
                )
            ).all()
            for study_id, study_uid in candidates:
                deliveries = select(Delivery).join(Delivery.result).join(Job).where(Job.study_id == study_id)
                unsent = session.execute(
                    deliveries.where(Delivery.state.in_([DeliveryState.PENDING, DeliveryState.WAITING]))
                ).first()
                open_job = session.execute(
                    select(Job.id).where(Job.study_id == study_id, Job.state.in_(OPEN_JOB_STATES))
                ).first()
                last_delivered = session.scalars(
                    deliveries.where(Delivery.delivered_at.is_not(None)).order_by(Delivery.delivered_at.desc())
                ).first()
                delivered_recently = (
                    last_delivered is not None
                    and last_delivered.delivered_at is not None
                    and last_delivered.delivered_at >= cutoff
                )
                if unsent is None and open_job is None and not delivered_recently:
                    expired.append((study_id, study_uid))
        # The reading transaction ends before anything is deleted: on SQLite it holds the write lock
        # (BEGIN IMMEDIATE), and a second transaction inside it would wait for it until "database is locked".
        for study_id, study_uid in expired:
            self._forget_images(study_id, study_uid)
        return len(expired)

    def _forget_images(self, study_id: int, study_uid: str) -> None:
        with self.sessions() as session, session.begin():
            series_ids = select(Series.id).where(Series.study_id == study_id)
            deleted = session.execute(delete(Instance).where(Instance.series_id.in_(series_ids)))
            removed = cast(CursorResult[Any], deleted).rowcount
            study = session.get(Study, study_id)
            if study is not None:
                study.note = f"received images removed by retention ({removed} instances)"
        self.spool.remove_study(study_uid)
        log.info("retention: removed %d received images of study %s", removed, study_uid)
