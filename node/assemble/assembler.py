"""Decide when a study is complete and create its jobs.

DICOM has no "end of study" message: a study is ready when no instance arrived for the
route's ``stable_after_s``, or at once when a sender marked ``complete_on_release``
released its association (the PACS "send to AI" button sends one study per association).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from pydicom import Dataset
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from db.models import AuditEvent, Instance, Job, JobState, Series, Study, StudyState, utcnow
from db.states import set_job_state, set_study_state
from node.config import DEFAULT_STABLE_AFTER_S
from node.receive.spool import Spool

log = logging.getLogger("ainode.assembler")


class RouteLike(Protocol):
    name: str
    pipeline: str
    destinations: list[str]
    stable_after_s: float
    priority: int


class RouterLike(Protocol):
    def route(self, ds: Dataset) -> object: ...


@dataclass(frozen=True)
class CreatedJob:
    job_id: int
    study_instance_uid: str
    route: str
    pipeline: str


class StudyAssembler:
    """Turns quiet (or released) studies into queued jobs, one per matched route and version."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        spool: Spool,
        router: RouterLike,
        routes: Iterable[RouteLike],
        default_stable_after_s: float = DEFAULT_STABLE_AFTER_S,
    ) -> None:
        self.sessions = sessions
        self.spool = spool
        self.router = router
        self.routes: Mapping[str, RouteLike] = {r.name: r for r in routes}
        self.default_stable_after_s = default_stable_after_s
        #: After a tick: seconds until the first study still receiving becomes quiet for long enough (None: none).
        self.next_due_s: float | None = None

    # -- events from the receiver ----------------------------------------------------------
    def request_complete(self, study_ids: Iterable[int]) -> None:
        """A ``complete_on_release`` sender released its association: these studies are whole."""
        ids = list(study_ids)
        if not ids:
            return
        with self.sessions() as session, session.begin():
            session.execute(
                update(Study)
                .where(Study.id.in_(ids), Study.state == StudyState.RECEIVING)
                .values(complete_requested=True)
            )

    # -- the periodic decision -------------------------------------------------------------
    def _route_new_series(self, session: Session, study_id: int) -> None:
        pending = session.execute(
            select(Series.id, func.min(Instance.path))
            .join(Instance, Instance.series_id == Series.id)
            .where(Series.study_id == study_id, Series.routed.is_(False))
            .group_by(Series.id)
        ).all()
        for series_id, relpath in pending:
            try:
                header = self.spool.read(relpath, headers_only=True)
                decision = self.router.route(header)
                route = getattr(decision, "route", None)
                name, reason = (route.name if route else None), str(getattr(decision, "reason", ""))
            except Exception as exc:  # an unreadable file must not stop the assembler
                name, reason = None, f"header unreadable: {type(exc).__name__}: {exc}"
            session.execute(
                update(Series).where(Series.id == series_id).values(routed=True, route=name, route_reason=reason)
            )

    def _stable_after(self, route_names: set[str]) -> float:
        values = [self.routes[n].stable_after_s for n in route_names if n in self.routes]
        return max(values) if values else self.default_stable_after_s

    def tick(self, now: datetime | None = None) -> list[CreatedJob]:
        now = now or utcnow()
        self.next_due_s = None  # set again below; a tick that fails leaves it unknown, not stale
        created: list[CreatedJob] = []
        with self.sessions() as session:
            candidates = (
                session.execute(
                    select(Study.id).where(Study.state == StudyState.RECEIVING).order_by(Study.last_received_at)
                )
                .scalars()
                .all()
            )
        for study_id in candidates:
            created.extend(self._consider(study_id, now))
        return created

    def _due_in(self, seconds: float) -> None:
        self.next_due_s = seconds if self.next_due_s is None else min(self.next_due_s, seconds)

    def _consider(self, study_id: int, now: datetime) -> list[CreatedJob]:
        with self.sessions() as session, session.begin():
            study = session.get(Study, study_id, with_for_update=True)
            if study is None or study.state != StudyState.RECEIVING:
                return []
            self._route_new_series(session, study_id)
            # Routes of the series that received instances in this version of the study.
            rows = session.execute(
                select(Series.route, Series.route_reason)
                .where(Series.study_id == study_id)
                .where(
                    Series.id.in_(select(Instance.series_id).where(Instance.study_version == study.version).distinct())
                )
            ).all()
            route_names = {r for r, _ in rows if r}
            quiet_s = (now - study.last_received_at).total_seconds()
            if not study.complete_requested and quiet_s < self._stable_after(route_names):
                self._due_in(self._stable_after(route_names) - quiet_s)
                return []

            if not route_names:
                reasons = "; ".join(sorted({reason for _, reason in rows if reason}))[:2000]
                ended = StudyState.UNROUTED if study.version == 1 else StudyState.PROCESSED
                set_study_state(study, ended, f"no route matched: {reasons}", now)
                log.info("study %s complete, not routed: %s", study.study_instance_uid, reasons)
                session.add(AuditEvent(kind="study", subject=study.study_instance_uid, detail=study.note))
                return []

            created = []
            for name in sorted(route_names):
                route = self.routes[name]
                job = Job(
                    study_id=study.id,
                    study_version=study.version,
                    route=name,
                    pipeline=route.pipeline,
                    destinations=list(route.destinations),
                    sender_ae=study.sender_ae,
                    sender_host=study.sender_host,
                    priority=route.priority,
                )
                set_job_state(job, JobState.QUEUED, None, now)
                session.add(job)
                session.flush()
                created.append(CreatedJob(job.id, study.study_instance_uid, name, route.pipeline))
            set_study_state(study, StudyState.QUEUED, None, now)
            why = "released by sender" if study.complete_requested else f"quiet for {quiet_s:.1f} s"
            for c in created:
                log.info(
                    "study %s v%d complete (%s, %d instances): job %d route %s pipeline %s",
                    study.study_instance_uid,
                    study.version,
                    why,
                    study.instance_count,
                    c.job_id,
                    c.route,
                    c.pipeline,
                )
            return created
