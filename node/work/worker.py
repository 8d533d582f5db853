"""Claim a job, run its pipeline on the study, put the result objects in the outbox.

The worker is the only place where the node's shell meets the pure pipelines: it reads
files from the spool, hands them to a :class:`~pipelines.study.StudyRunner`, and writes what comes back
(already complete DICOM objects with their UIDs fixed) to the spool and the database in
one transaction, together with one delivery row per destination.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import logging
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

from pydicom import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import (
    AuditEvent,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Result,
    Series,
    Study,
    utcnow,
)
from db.queue import claim_next_job, heartbeat, next_due_study
from db.states import finish_job, make_delivery_due, postpone_job, set_delivery_state
from node.loops import Loop
from node.phi import redact, study_identifying_values
from node.reasons import one_line_reason
from node.receive.spool import Spool
from node.work.destinations import Destination, PeerResolver, resolve_destinations, wanted_outputs
from pipelines.study import ResultKind, RunOutcome, StudyRunner, result_kind

log = logging.getLogger("ainode.worker")

#: A job postponed by a transient failure waits this long first, twice as long each time after, at most the cap.
FIRST_POSTPONE_S = 10.0
#: How long a worker leaves a due job to the process that analysed its study ahead (see Worker.defer).
DEFER_S = 0.3
MAX_POSTPONE_S = 600.0
#: errno values of a full or failing disk: the spool will take the results again once space is freed.
_TRANSIENT_ERRNO = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN}


def transient(exc: BaseException) -> bool:
    """A failure that passes by itself (disk full, database unreachable), as opposed to one in the job."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNO:
        return True
    return isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated)


def release_freed_memory() -> None:
    """Give the memory a job freed back to the system (glibc keeps freed heap pages, per thread arena, otherwise:
    a worker process that analysed one 300-slice CT stayed at 770 MB). Nothing where glibc is not the allocator."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


class StudyFiles(NamedTuple):
    """A study's files as the database records them now (see :func:`study_files`)."""

    study_uid: str
    #: The files of its instances by Series Instance UID, in the order they were recorded.
    files: dict[str, list[Path]]
    #: A digest of its instance rows (id, path, when each was stored): any instance stored since, or stored
    #: again (a duplicate replaced), makes another one, whatever the file system says of the files.
    generation: str


def study_files(sessions: sessionmaker[Session], spool: Spool, study_id: int) -> StudyFiles:
    """What a job gives its pipeline, and what a preparation ahead must give it too (the same query)."""
    with sessions() as session:
        study_uid = session.execute(select(Study.study_instance_uid).where(Study.id == study_id)).scalar_one()
        rows = session.execute(
            select(Series.series_instance_uid, Instance.id, Instance.path, Instance.received_at)
            .join(Instance, Instance.series_id == Series.id)
            .where(Series.study_id == study_id)
            .order_by(Instance.id)
        ).all()
    files: dict[str, list[Path]] = defaultdict(list)
    digest = hashlib.sha256()
    for series_uid, instance_id, relpath, received_at in rows:
        files[series_uid].append(spool.abspath(relpath))
        digest.update(f"{instance_id}\0{relpath}\0{received_at.isoformat()}\n".encode())
    return StudyFiles(study_uid, dict(files), digest.hexdigest())


class Worker:
    """Runs jobs one at a time; several Workers (threads, processes, machines) share the queue."""

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        spool: Spool,
        runner: StudyRunner,
        resolve: PeerResolver,
        worker_id: str,
        on_result: Callable[[], None] | None = None,
        defer: Callable[[str], bool] | None = None,
    ) -> None:
        self.sessions = sessions
        self.spool = spool
        self.runner = runner
        self.resolve = resolve
        self.worker_id = worker_id
        self.on_result = on_result
        #: Whether another process is better placed for a study's job (it analysed the study ahead, and holds
        #: its parsed headers): this worker then gives it DEFER_S to take the job first.
        self.defer = defer
        self.current_job: int | None = None

    def run_once(self) -> bool:
        if self.defer is not None:
            study_uid = next_due_study(self.sessions)
            if study_uid is not None and self.defer(study_uid):
                time.sleep(DEFER_S)  # that process was woken too: it takes the job now if it is free
        job = claim_next_job(self.sessions, self.worker_id)
        if job is None:
            return False
        self.current_job = job.id
        try:
            self.process(job)
        finally:
            self.current_job = None
            release_freed_memory()
        return True

    # -- one job ---------------------------------------------------------------------------
    def process(self, job: Job) -> None:
        started = time.monotonic()
        study_uid, files, generation = study_files(self.sessions, self.spool, job.study_id)
        # Every reason this job records or logs is said without the patient's names, IDs or dates.
        phi = study_identifying_values(files)
        try:
            destinations, unresolved = resolve_destinations(
                self.resolve, job.destinations, job.sender_ae, job.sender_host
            )
            outputs = wanted_outputs(destinations)
            outcome = self.runner.run(job.pipeline, files, outputs)
            if outcome.prepared and outcome.made_from != generation:
                # The files look unchanged, but the database says an instance was stored since the results were
                # made ahead (a file system that reuses inodes within its time resolution): made again, here.
                log.warning("job %d study %s: results made ahead not used: the study changed since", job.id,
                            study_uid)  # fmt: skip
                outcome = self.runner.run(job.pipeline, files, outputs)
        except Exception as exc:  # a pipeline exception fails this job only (invariant 6)
            reason = redact(one_line_reason(exc), phi) or ""
            log.error("job %d study %s failed: %s", job.id, study_uid, reason)
            log.debug("job %d traceback:\n%s", job.id, redact(traceback.format_exc(), phi))
            self._finish(job.id, JobState.FAILED, reason, time.monotonic() - started, None)
            return
        outcome = dataclasses.replace(
            outcome,
            not_analysed=redact(outcome.not_analysed, phi),
            selection=redact(outcome.selection, phi),
            failed_outputs={kind: redact(why, phi) or "" for kind, why in outcome.failed_outputs.items()},
        )
        if outcome.selection is not None:  # shown by `ainode status` with the job
            with self.sessions() as session, session.begin():
                session.add(AuditEvent(kind="selection", actor=self.worker_id, subject=str(job.id),
                                       detail=outcome.selection))  # fmt: skip
        if outcome.prepared:
            ahead = ", ".join(f"{step} {seconds:.2f}" for step, seconds in outcome.steps_s.items())
            log.info("job %d study %s: results prepared while the study was quiet (%s), from the same files",
                     job.id, study_uid, ahead or "not analysed")  # fmt: skip
        if outcome.slices_reused is not None:
            reused, total = outcome.slices_reused
            log.info("job %d study %s: %d of %d slices analysed while the study arrived", job.id, study_uid, reused,
                     total)  # fmt: skip
        if outcome.not_analysed is not None:
            log.info("job %d study %s not analysed: %s", job.id, study_uid, outcome.not_analysed)
            self._finish(
                job.id, JobState.NOT_APPLICABLE, outcome.not_analysed, time.monotonic() - started, outcome.model_s
            )
            return
        try:
            self._store_results(job, study_uid, outcome, destinations, unresolved, started)
        except Exception as exc:
            reason = f"could not store results: {redact(one_line_reason(exc), phi)}"
            if transient(exc):
                # Disk full or database away: the results are made again and stored when it has passed.
                self._postpone(job, reason, study_uid)
                return
            log.error("job %d study %s failed: %s", job.id, study_uid, reason)
            log.debug("job %d traceback:\n%s", job.id, redact(traceback.format_exc(), phi))
            self._finish(job.id, JobState.FAILED, reason, time.monotonic() - started, outcome.model_s)
            return
        if self.on_result is not None:
            self.on_result()

    def _postpone(self, job: Job, reason: str, study_uid: str) -> None:
        delay_s = min(MAX_POSTPONE_S, FIRST_POSTPONE_S * 2 ** (job.postponed or 0))
        now = utcnow()
        try:
            with self.sessions() as session, session.begin():
                row = session.get(Job, job.id, with_for_update=True)
                if row is None or row.claimed_by != self.worker_id or row.state != JobState.RUNNING:
                    return
                why = f"{reason}; retry in {delay_s:.0f} s"
                postpone_job(row, why, now, now + timedelta(seconds=delay_s))
                detail = f"postponed: {why}"
                session.add(AuditEvent(kind="job", actor=self.worker_id, subject=str(job.id), detail=detail))
        except Exception as exc:  # the database itself away: the lease runs out and the reclaimer requeues it
            log.error("job %d could not be postponed: %s", job.id, one_line_reason(exc))
            return
        log.warning("job %d study %s: %s; retry in %.0f s", job.id, study_uid, reason, delay_s)

    def _store_results(
        self,
        job: Job,
        study_uid: str,
        outcome: RunOutcome,
        destinations: list[Destination],
        unresolved: list[tuple[str, str]],
        started: float,
    ) -> None:
        # Files first (fsynced), rows second: a crash in between leaves orphan files that no
        # row points to, never a row that points to nothing.
        store_started = time.monotonic()
        stored: list[tuple[Dataset, str, ResultKind]] = []
        for ds in outcome.datasets:
            relpath = Spool.result_relpath(study_uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
            # An object made ahead was written then: it is put in place (or written now, if that file is gone).
            ahead = outcome.written_ahead.get(str(ds.SOPInstanceUID)) if outcome.prepared else None
            if ahead is None or not self.spool.publish(ahead, relpath):
                self.spool.write_dataset(relpath, ds)
            stored.append((ds, relpath, result_kind(ds)))
        now = utcnow()
        with self.sessions() as session, session.begin():
            row = session.get(Job, job.id, with_for_update=True)
            if row is None or row.state != JobState.RUNNING or row.claimed_by != self.worker_id:
                # Another worker took the job over (our lease expired): its results win.
                taken_by = row.claimed_by if row is not None else None
                log.warning("job %d was taken over by %s; dropping our results", job.id, taken_by)
                # Recorded where an operator looks (the audit), not only in this process's log.
                session.add(
                    AuditEvent(
                        kind="job",
                        actor=self.worker_id,
                        subject=str(job.id),
                        detail=f"results dropped: the job was taken over by {taken_by or 'another worker'}",
                    )
                )
                return
            remade = 0
            for ds, relpath, kind in stored:
                result, deliveries = self._result_row(session, job.id, ds, relpath, kind)
                remade += bool(deliveries)
                for dest in destinations:
                    if kind in dest.outputs:
                        delivery = self._due_delivery(session, result, deliveries, dest.name, now)
                        delivery.ae_title, delivery.host, delivery.port = dest.ae_title, dest.host, dest.port
                for name, why in unresolved:
                    # Which peer takes it is decided when the outbox tries (the configuration then).
                    delivery = self._due_delivery(session, result, deliveries, name, now)
                    delivery.ae_title, delivery.host = (job.sender_ae or "")[:16], job.sender_host or ""
                    delivery.port = 0
                    set_delivery_state(delivery, DeliveryState.WAITING, f"waiting for a peer: {why}", now)
            if remade:
                log.info("job %d: %d result objects made again with the same UIDs; sending them again", job.id, remade)
            notes = [f"{kind} not built: {why}" for kind, why in outcome.failed_outputs.items()]
            notes += [f"destination {n} waits for a peer: {w}" for n, w in unresolved]
            reason = "; ".join(notes) or None
            self._set_finished(session, row, JobState.DONE, reason, time.monotonic() - started, outcome.model_s)
        kinds = ",".join(sorted({k for _, _, k in stored}))
        # The steps of a result prepared ahead were logged when the job took it: this job only stored it.
        steps = {**({} if outcome.prepared else outcome.steps_s), "store": time.monotonic() - store_started}
        log.info(
            "job %d study %s done in %.1f s (%s): %d result objects (%s) for %s",
            job.id,
            study_uid,
            time.monotonic() - started,
            ", ".join(f"{step} {seconds:.2f}" for step, seconds in steps.items()),
            len(stored),
            kinds or "none",
            ",".join(d.name for d in destinations) or "no destination",
        )
        for failed, why in outcome.failed_outputs.items():
            log.warning("job %d study %s: %s not built (the others are sent): %s", job.id, study_uid, failed, why)
        for name, why in unresolved:
            log.warning("job %d: results for destination %s wait for a peer: %s", job.id, name, why)

    @staticmethod
    def _result_row(
        session: Session, job_id: int, ds: Dataset, relpath: str, kind: ResultKind
    ) -> tuple[Result, dict[str, Delivery]]:
        """The Result row of ``ds`` and its deliveries by destination.

        The same model version on the same source instances makes the same UIDs (invariant 3):
        a re-run (operator retry, reprocess) finds the row of the earlier run and takes it over,
        so the object stays one row and one copy in the PACS. New UIDs get a new row.
        """
        uid = str(ds.SOPInstanceUID)
        result = session.scalars(select(Result).where(Result.sop_instance_uid == uid)).first()
        if result is None:
            result = Result(sop_instance_uid=uid)
            session.add(result)
        result.job_id = job_id
        result.kind = kind.value  # the database keeps the kind's value: seg, sr, sc
        result.sop_class_uid = str(ds.SOPClassUID)
        result.series_instance_uid = str(ds.SeriesInstanceUID)
        result.path = relpath
        session.flush()
        return result, {d.destination: d for d in result.deliveries}

    @staticmethod
    def _due_delivery(
        session: Session, result: Result, deliveries: dict[str, Delivery], name: str, now: datetime
    ) -> Delivery:
        """The delivery of ``result`` to ``name``, due now: the earlier run's row reset, or a new row."""
        delivery = deliveries.get(name)
        if delivery is None:
            delivery = Delivery(result_id=result.id, destination=name, attempts=0, created_at=now)
            session.add(delivery)
            deliveries[name] = delivery
        make_delivery_due(delivery, now)
        return delivery

    def _finish(self, job_id: int, state: JobState, reason: str | None, total_s: float, model_s: float | None) -> None:
        with self.sessions() as session, session.begin():
            row = session.get(Job, job_id, with_for_update=True)
            if row is not None and row.claimed_by == self.worker_id and row.state == JobState.RUNNING:
                self._set_finished(session, row, state, reason, total_s, model_s)

    @staticmethod
    def _set_finished(
        session: Session, row: Job, state: JobState, reason: str | None, total_s: float, model_s: float | None
    ) -> None:
        finish_job(session, row, state, reason, utcnow())
        row.total_s = total_s
        row.model_s = model_s
        session.add(
            AuditEvent(kind="job", actor=row.claimed_by, subject=str(row.id), detail=f"{state.value}: {reason or ''}")
        )


class WorkerPool:
    """N worker loops in this process plus one heartbeat loop for their running jobs."""

    def __init__(self, workers: list[Worker], sessions: sessionmaker[Session], heartbeat_s: float = 10.0) -> None:
        self.workers = workers
        self.sessions = sessions
        self.heartbeat_s = heartbeat_s
        # A worker that ran a job looks for the next one at once; an idle one looks every second.
        self._worker_loops = [
            Loop(f"worker-{w.worker_id}", w.run_once, 1.0, again_while_busy=True, log=log) for w in workers
        ]
        self._loops = [*self._worker_loops, Loop("job-heartbeat", self._heartbeat, heartbeat_s, log=log)]

    @property
    def idle(self) -> bool:
        """No worker of this pool runs a job now (work that must never delay a job may use the machine)."""
        return all(w.current_job is None for w in self.workers)

    def wake(self) -> None:
        """New jobs are queued: idle workers look now."""
        for loop in self._worker_loops:
            loop.wake()

    def start(self) -> None:
        for loop in self._loops:
            loop.start()

    def stop(self, timeout_s: float = 30) -> None:
        # Every loop is told first, so that no worker claims a new job while another one finishes.
        for loop in self._loops:
            loop.request_stop()
        for loop in self._loops:
            loop.join(timeout_s)

    def _heartbeat(self) -> None:
        heartbeat(self.sessions, [w.current_job for w in self.workers if w.current_job is not None])
        self.restart_dead_workers()

    def restart_dead_workers(self) -> int:
        """A node is never left without workers: a worker thread that died is started again.

        Its job, no longer heartbeated, is requeued by the reclaimer when its lease runs out, and fails
        after a bounded number of such deaths ("worker died N times").
        """
        restarted = 0
        for loop in self._worker_loops:
            if loop.died:
                log.error("%s stopped unexpectedly; started again", loop.name)
                loop.restart()
                restarted += 1
        return restarted
