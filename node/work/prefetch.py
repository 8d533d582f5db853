"""Analyse slices while their study arrives, so that a complete study has only its whole-volume steps left.

A loop of the worker process (roles all and worker), never the C-STORE handler: a C-STORE success
still means fsync and commit only. Every pass it looks for instances of open studies (receiving, or
queued) whose series is routed to a model that labels slices one by one (a 2D segmentation), reads
each as the job will, runs the model on small batches and keeps the label rows in the spool's slice
cache (:mod:`node.work.slicestore`). The job then takes them by a key made of the model, the geometry
and the slice's own pixel values (:mod:`pipelines.slicecache`), so that streaming never changes a result.

It yields to real work: a pass runs only while this process's workers are idle, and checks again
before each batch, so a job that arrives waits at most one batch. What it does not manage (a
failure, a slice it skipped, a job that came first) the job computes itself; its errors are logged at
DEBUG and fail nothing.

Once every slice of a study is analysed and the study has been quiet for a moment (``prepare_after_s``),
the loop also makes the job's whole outcome ahead: the same runner call on the same files the job will be
given, with the outputs its destinations take (:meth:`pipelines.study.OnnxStudyRunner.prepare`). A scanner
that sends with gaps then has its results made when the stability wait ends; the job takes them only if
its input is exactly the one they were made from, and otherwise analyses the study as usual. A
preparation gives up between steps when a job needs the machine or an instance arrives. Each time a study
was made ahead, or its preparation gave up because more arrived, it waits twice as long before the next
try, at most a quarter of its route's stability wait (a sender that pauses often costs a few preparations,
not one per pause, and the last one still starts well before the study is complete).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Instance, Series, Study, StudyState, utcnow
from node.phi import redact, study_identifying_values
from node.reasons import one_line_reason
from node.receive.spool import Spool
from node.work.slicestore import SliceStore
from node.work.worker import study_files

if TYPE_CHECKING:
    from pipelines.headercache import HeaderCache
    from pipelines.runtime import LoadedModel
    from pipelines.streaming import StoredSlice
    from pipelines.study import RunOutcome

log = logging.getLogger("ainode.prefetch")

#: Studies whose slices are analysed ahead, and whose slice caches are kept.
OPEN_STATES = (StudyState.RECEIVING, StudyState.QUEUED)
#: Slices read and analysed in one pass at most (a pass also ends as soon as a worker takes a job).
MAX_SLICES_PER_PASS = 32
#: Slices per inference call: small, so that a job that arrives waits for one short batch at most.
BATCH_SLICES = 4
#: A slice cache entry older than this goes whatever its study's state (a study that is never completed).
MAX_AGE = timedelta(days=1)
#: How often entries are checked for their age.
AGE_CHECK_EVERY = timedelta(minutes=10)
#: A process that analyses a study ahead renews its lease every pass; another takes it over this long after.
LEASE_S = 30.0
#: A study whose slices are all analysed has its results made ahead once it has been quiet this long.
PREPARE_AFTER_S = 0.3
#: The longest quiet wait before a study is made ahead again (and at most a quarter of its stable_after_s).
MAX_PREPARE_AFTER_S = 30.0


@runtime_checkable
class PreparesAhead(Protocol):
    """What makes a job's results ahead (the node's :class:`~pipelines.study.OnnxStudyRunner`)."""

    def prepare(
        self,
        study_uid: str,
        pipeline: str,
        series_files: Mapping[str, Sequence[Path]],
        outputs: Iterable[str],
        go_on: Callable[[], bool],
        finish: Callable[[str, RunOutcome], RunOutcome] | None = None,
    ) -> bool: ...

    def forget_prepared(self, keep: Iterable[str]) -> int: ...


#: The kinds of result object a job of a route makes for a study of this sender (AE title, host).
RouteOutputs = Callable[[str, str | None, str | None], Iterable[str]]


class Prefetcher:
    """One pass (:meth:`step`) of analysing stored slices ahead of their job.

    Parameters
    ----------
    sessions, spool
        The node's database and spool.
    store
        The slice cache the jobs read (the node's :class:`~pipelines.study.OnnxStudyRunner` is given the same).
    model
        The loaded model of a pipeline name (the runner's registry: the sessions the workers use).
    routes
        Pipeline of each route name.
    idle
        True while no worker of this process runs a job.
    headers
        Where the headers parsed here are kept for the job (the runner's), so that it does not parse them again.
    owner
        This process (its identity): of several worker processes sharing the spool (scale-out), one analyses
        each study ahead, the one that holds its lease (:meth:`~node.work.slicestore.StudySlices.claim`);
        None: every study is analysed here.
    prepare, route_outputs
        Where a study's results are made ahead once its slices are analysed and it is quiet for
        ``prepare_after_s`` (the runner the workers use), and the outputs a route's job makes; None: no
        results are made ahead.
    stable_after
        Each route's ``stable_after_s`` (the quiet wait before a study made ahead again is at most a quarter of it).
    """

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        spool: Spool,
        store: SliceStore,
        model: Callable[[str], LoadedModel],
        routes: Mapping[str, str],
        idle: Callable[[], bool],
        max_slices_per_pass: int = MAX_SLICES_PER_PASS,
        batch_slices: int = BATCH_SLICES,
        headers: HeaderCache | None = None,
        owner: str | None = None,
        lease_s: float = LEASE_S,
        prepare: PreparesAhead | None = None,
        route_outputs: RouteOutputs | None = None,
        prepare_after_s: float = PREPARE_AFTER_S,
        stable_after: Mapping[str, float] | None = None,
    ) -> None:
        #: Each route's stability wait: a study is made ahead at the latest a quarter of it after its last instance.
        self.stable_after = dict(stable_after or {})
        self.prepare = prepare if route_outputs is not None else None
        self.route_outputs = route_outputs
        self.prepare_after_s = prepare_after_s
        #: Per study: the last arrival its results were made ahead for (or failed for), and its quiet wait now.
        self._prepared_at: dict[str, datetime] = {}
        self._prepare_after: dict[str, float] = {}
        #: Result files written ahead, by study (until their job puts them in place or the study is no longer open).
        self._written_ahead: dict[str, list[str]] = {}
        #: Studies this process analyses ahead (it holds their lease), from the last pass.
        self._ours: set[str] = set()
        #: Outcomes made ahead since the start (for the log and the tests).
        self.prepared = 0
        self.headers = headers
        self.owner = owner
        self.lease_s = lease_s
        self.sessions = sessions
        self.spool = spool
        self.store = store
        self.model = model
        self.routes = dict(routes)
        self.idle = idle
        self.max_slices_per_pass = max_slices_per_pass
        self.batch_slices = batch_slices
        #: Whether each pipeline's model labels slices one by one (None: it could not be loaded).
        self._streams: dict[str, bool] = {}
        #: Instances read already (by row id), with the time they were stored then: a replaced one is read again.
        self._seen: dict[int, datetime] = {}
        self._age_checked: datetime | None = None
        #: Slices analysed ahead since the start (for the log and the tests).
        self.slices_analysed = 0

    # -- the loop's step ---------------------------------------------------------------------
    def step(self, now: datetime | None = None) -> bool:
        """Clean up, then analyse up to ``max_slices_per_pass`` new slices; True when it read any.

        Nothing here may fail anything: an error (the database busy, a file gone) is logged at DEBUG and the
        pass ends; the jobs compute what is missing.
        """
        try:
            return self._step(now or utcnow())
        except Exception as exc:
            log.debug("analysis ahead paused: %s", one_line_reason(exc))  # a database error without its SQL
            return False

    def _step(self, now: datetime) -> bool:
        self.clean_up(now)
        if not self.idle():
            return False
        routes = [name for name, pipeline in self.routes.items() if self._pipeline_streams(pipeline)]
        if not routes:
            return False
        todo = self._new_instances(routes)
        if not todo:
            # Every slice is analysed: what is left to do ahead is a quiet study's whole outcome.
            return self.prepare is not None and self._prepare_one(now, routes)
        self._analyse(todo)
        return True  # there may be more: the loop steps again at once (a waiting job ends that at the next check)

    def clean_up(self, now: datetime) -> None:
        """Remove the slice caches of studies no longer open, and, every few minutes, entries a day old."""
        cached = self.store.studies()
        if cached:
            with self.sessions() as session:
                open_uids = set(
                    session.execute(
                        select(Study.study_instance_uid).where(
                            Study.study_instance_uid.in_(cached), Study.state.in_(OPEN_STATES)
                        )
                    ).scalars()
                )
            for uid in self.store.remove_finished(open_uids):
                log.debug("slice cache of study %s removed: the study is no longer open", uid)
        if self.prepare is not None:
            with self.sessions() as session:
                still_open = set(
                    session.execute(select(Study.study_instance_uid).where(Study.state.in_(OPEN_STATES))).scalars()
                )
            self.prepare.forget_prepared(still_open)
            for uid in [u for u in self._written_ahead if u not in still_open]:
                self.spool.discard(self._written_ahead.pop(uid))
            self._prepared_at = {u: t for u, t in self._prepared_at.items() if u in still_open}
            self._prepare_after = {u: s for u, s in self._prepare_after.items() if u in still_open}
        if self.headers is not None and len(self.headers):
            # Kept for the job of an open study only: memory stays bounded by what is arriving.
            with self.sessions() as session:
                paths = session.execute(
                    select(Instance.path)
                    .join(Series, Instance.series_id == Series.id)
                    .join(Study, Series.study_id == Study.id)
                    .where(Study.state.in_(OPEN_STATES))
                ).scalars()
                self.headers.forget({str(self.spool.abspath(p)) for p in paths})
        if self._age_checked is None or now - self._age_checked >= AGE_CHECK_EVERY:
            self._age_checked = now
            removed = self.store.remove_older_than(now - MAX_AGE)
            if removed:
                log.info("slice cache: %d entries older than %s removed", removed, MAX_AGE)

    # -- the parts ---------------------------------------------------------------------------
    def _pipeline_streams(self, pipeline: str) -> bool:
        if pipeline not in self._streams:
            from pipelines.streaming import streams

            try:
                self._streams[pipeline] = streams(self.model(pipeline))
            except Exception as exc:  # the job reports a model that cannot be loaded, with its reason
                log.debug("pipeline %s: no analysis ahead: %s", pipeline, exc)
                self._streams[pipeline] = False
        return self._streams[pipeline]

    def _new_instances(self, routes: list[str]) -> list[tuple[int, datetime, str, str, str]]:
        """(instance id, received at, path, pipeline, Study Instance UID) of instances not read yet, oldest first."""
        with self.sessions() as session:
            rows = session.execute(
                select(Instance.id, Instance.received_at, Instance.path, Series.route, Study.study_instance_uid)
                .join(Series, Instance.series_id == Series.id)
                .join(Study, Series.study_id == Study.id)
                .where(Study.state.in_(OPEN_STATES), Series.route.in_(routes))
                .order_by(Instance.id)
            ).all()
        # Forget instances of studies that are no longer open: memory stays bounded by the open studies.
        self._seen = {row.id: self._seen[row.id] for row in rows if row.id in self._seen}
        # One process analyses each study ahead; the others leave it (and take it over if that one stops).
        ours = {
            uid: self.owner is None or self.store.study(uid).claim(self.owner, self.lease_s)
            for uid in dict.fromkeys(row.study_instance_uid for row in rows)
        }
        self._ours = {uid for uid, mine in ours.items() if mine}
        todo = []
        for row in rows:
            if ours[row.study_instance_uid] and self._seen.get(row.id) != row.received_at:
                todo.append((row.id, row.received_at, row.path, self.routes[row.route], row.study_instance_uid))
                if len(todo) >= self.max_slices_per_pass:
                    break
        return todo

    def _analyse(self, todo: list[tuple[int, datetime, str, str, str]]) -> int:
        from pipelines.streaming import infer_slices, read_stored_slice

        pending: dict[tuple[str, str], list[tuple[int, datetime, StoredSlice]]] = {}
        for instance_id, received_at, relpath, pipeline, study_uid in todo:
            if not self.idle():  # a job took the machine: the rest waits for the next idle pass
                break
            try:
                path = self.spool.abspath(relpath)
                item = self.headers.read(path) if self.headers is not None else path
                stored = read_stored_slice(self.model(pipeline), item)
            except Exception as exc:  # the job reads it again and says what is wrong, if anything
                why = redact(one_line_reason(exc), study_identifying_values({"": [self.spool.abspath(relpath)]}))
                log.debug("slice %s not analysed ahead: %s", relpath, why)  # said without the patient's values
                stored = None
            if stored is None or stored.key in self.store.study(study_uid):
                self._seen[instance_id] = received_at
            else:
                pending.setdefault((pipeline, study_uid), []).append((instance_id, received_at, stored))
        analysed = 0
        for (pipeline, study_uid), slices in pending.items():
            failed = False
            try:
                done = set(
                    infer_slices(
                        self.model(pipeline),
                        [s for _, _, s in slices],
                        self.store.study(study_uid),
                        self.batch_slices,
                        go_on=self.idle,
                    )
                )
            except Exception as exc:  # the job runs the model itself, and fails with the reason if it must
                # The model's error on pixel arrays: no header value is in it.
                log.debug("slices of study %s not analysed ahead: %s", study_uid, one_line_reason(exc))
                done, failed = set(), True  # not tried again: the job computes them
            for instance_id, received_at, stored in slices:
                if failed or stored.key in done:
                    self._seen[instance_id] = received_at
            analysed += len(done)
        self.slices_analysed += analysed
        return analysed

    def _prepare_one(self, now: datetime, routes: list[str]) -> bool:
        """Make ahead the outcome of one quiet study of ours whose slices are all analysed; True when one was made.

        A study released by its sender (``complete_on_release``) is left alone: its job comes at once.
        """
        assert self.prepare is not None and self.route_outputs is not None
        with self.sessions() as session:
            studies = session.execute(
                select(Study.id, Study.study_instance_uid, Study.version, Study.last_received_at, Study.sender_ae,
                       Study.sender_host)
                .where(Study.state == StudyState.RECEIVING, Study.complete_requested.is_(False))
                .order_by(Study.last_received_at)
            ).all()  # fmt: skip
        for study in studies:
            uid = study.study_instance_uid
            if uid not in self._ours or self._prepared_at.get(uid) == study.last_received_at:
                continue
            wait_s = self._prepare_after.get(uid, self.prepare_after_s)
            if (now - study.last_received_at).total_seconds() < wait_s:
                continue
            study_routes = self._job_routes(study.id, study.version, routes)
            if not study_routes:
                self._prepared_at[uid] = study.last_received_at  # nothing to make ahead until more arrives
                continue
            _, files, generation = study_files(self.sessions, self.spool, study.id)
            busy = [False]

            def go_on(
                study_id: int = study.id, last: datetime = study.last_received_at, busy: list[bool] = busy
            ) -> bool:
                if not self.idle():
                    busy[0] = True
                    return False
                with self.sessions() as session:
                    latest = session.execute(select(Study.last_received_at).where(Study.id == study_id)).scalar()
                return latest == last

            def finish(key: str, outcome: RunOutcome, uid: str = uid, generation: str = generation) -> RunOutcome:
                return self._write_ahead(uid, generation, outcome)

            # What was written ahead for this study before is of an input that is gone: more arrived since.
            self.spool.discard(self._written_ahead.pop(uid, []))
            started = time.monotonic()
            made = True
            try:
                for route in study_routes:
                    outputs = self.route_outputs(route, study.sender_ae, study.sender_host)
                    if not self.prepare.prepare(uid, self.routes[route], files, outputs, go_on, finish):
                        made = False
                        break
            except Exception as exc:  # the job meets it again and reports it
                # Said without the patient's names, IDs or dates, as the job says its failures.
                why = redact(one_line_reason(exc), study_identifying_values(files))
                log.debug("study %s: results not made ahead: %s", uid, why)
                self._prepared_at[uid] = study.last_received_at
                continue
            # Each preparation of a study, made or given up because more arrived, doubles its quiet wait before the
            # next (a sender that pauses often costs a few preparations, not one per pause), at most a quarter of
            # its stability wait: the last one still ends before the study is complete.
            if made or not busy[0]:
                self._prepare_after[uid] = min(wait_s * 2, self._longest_wait(study_routes))
            if not made:
                log.debug("study %s: making results ahead given up; next try after %.1f s quiet", uid,
                          self._prepare_after.get(uid, wait_s))  # fmt: skip
                return False
            self._prepared_at[uid] = study.last_received_at
            self.prepared += 1
            log.info("study %s: results made ahead in %.1f s, after %.1f s quiet (before it is complete)", uid,
                     time.monotonic() - started, wait_s)  # fmt: skip
            return True
        return False

    def _job_routes(self, study_id: int, version: int, routes: list[str]) -> list[str]:
        """Of ``routes``, those the assembler will make jobs of: of the study's series with instances in ``version``."""
        with self.sessions() as session:
            found = session.execute(
                select(Series.route).where(
                    Series.study_id == study_id,
                    Series.route.in_(routes),
                    Series.id.in_(select(Instance.series_id).where(Instance.study_version == version).distinct()),
                )
            ).scalars()
            return sorted({route for route in found if route is not None})

    def _longest_wait(self, routes: list[str]) -> float:
        """The longest quiet wait before a study of these routes is made ahead: a quarter of its stability wait."""
        stable = [self.stable_after[r] for r in routes if r in self.stable_after]
        quarter = min(stable) / 4 if stable else MAX_PREPARE_AFTER_S
        return max(self.prepare_after_s, min(MAX_PREPARE_AFTER_S, quarter))

    def _write_ahead(self, study_uid: str, generation: str, outcome: RunOutcome) -> RunOutcome:
        """Write the objects made ahead into the spool now (fsynced, under temp names): the job only renames them.

        The outcome is marked with the ``generation`` of the study's instance rows it was made from, which the
        job compares with its own (:func:`~node.work.worker.study_files`).
        """
        by_uid = {}
        written = self._written_ahead.setdefault(study_uid, [])
        for ds in outcome.datasets:
            relpath = Spool.result_relpath(study_uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
            staged = self.spool.write_ahead(relpath, ds)
            written.append(staged)
            by_uid[str(ds.SOPInstanceUID)] = staged
        return dataclasses.replace(outcome, written_ahead=by_uid, made_from=generation)

    def close(self) -> None:
        """Remove the files written ahead that no job put in place (the node stops)."""
        for uid in list(self._written_ahead):
            self.spool.discard(self._written_ahead.pop(uid))
