"""Analyse one study: choose the series a model takes, load it, run the model, write the result objects.

The core's one entry point for a whole study. The worker (``node/work/worker.py``) calls it for a
job and ``ainode run`` (``node/operate/offline.py``) for files on disk; both get the same objects
with the same UIDs. It reads the files it is given and returns DICOM datasets: it stores, sends and
records nothing. Unsuitable input ends as "not analysed" with the pipeline's own reason; anything
else that goes wrong is an exception, which fails that job alone and leaves the node serving.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pydicom import Dataset

from pipelines.enums import ResultKind, Task, result_kind
from pipelines.headercache import DEFER_BYTES, HeaderCache, read_header
from pipelines.notanalysed import NotAnalysable, NotAnalysed, NotAnalysedReason
from pipelines.select import Candidate, rank_series, select_series, usable_instances

if TYPE_CHECKING:
    # ONNX Runtime, highdicom and the pipelines are imported when a study is analysed, not with the
    # contract: the worker's process shape (and a receiver's memory) does not depend on them.
    from pipelines.dicom import Equipment
    from pipelines.results import PipelineResult
    from pipelines.runtime import LoadedModel, ModelRegistry
    from pipelines.slicecache import SliceCache
    from pipelines.volume import Volume

__all__ = [
    "DEFER_BYTES",
    "OnnxStudyRunner",
    "Preempted",
    "ResultKind",
    "ResultsNotBuilt",
    "RunOutcome",
    "StudyRunner",
    "describe_selection",
    "result_kind",
    "run_pipeline",
]


@dataclass
class RunOutcome:
    """What the analysis of one study produced."""

    #: The result objects, complete and with their UIDs fixed, in the order they should be sent.
    datasets: list[Dataset] = field(default_factory=list)
    #: Set when the study was not analysed (unsuitable input): the job ends "not-applicable".
    not_analysed: str | None = None
    model_s: float | None = None
    #: Which series the pipeline took and why each other was skipped (UIDs, series numbers and descriptions).
    selection: str | None = None
    #: Output kinds that could not be built, each with its one-line reason; the others are in ``datasets``.
    failed_outputs: dict[str, str] = field(default_factory=dict)
    #: Slices whose label rows were taken from the slice cache (analysed while the study arrived), of how many;
    #: None when no slice cache was used.
    slices_reused: tuple[int, int] | None = None
    #: Seconds spent in each step, in order ("read", "volume", "model", "write"), for the job's log line.
    steps_s: dict[str, float] = field(default_factory=dict)
    #: Made ahead, while the study was quiet, from the very files the job was given (:meth:`OnnxStudyRunner.prepare`).
    prepared: bool = False
    #: Of an outcome made ahead: where whoever made it wrote each object already (by SOP Instance UID), for the
    #: job to put in place rather than write (the node's spool; see ``finish`` of :meth:`OnnxStudyRunner.prepare`).
    written_ahead: dict[str, str] = field(default_factory=dict)
    #: Of an outcome made ahead: a token of the input it was made from, set by whoever made it (the node: a
    #: digest of the study's instance rows), for the job to compare with its own.
    made_from: str | None = None


class Preempted(Exception):
    """Work ahead given up: a job needs the machine, or the study changed."""


#: Outcomes made ahead and kept for their job, at most (each holds a study's SEG and SR: 20 MB for 300 slices).
MAX_PREPARED = 4
#: How long a job waits for a preparation of its very input that is under way, at most, before it starts over.
PREPARE_WAIT_S = 120.0


class ResultsNotBuilt(Exception):
    """No wanted result object could be built; the message names each kind and why."""


#: The attributes that identify a patient (Patient Module): every source of one result must agree on them.
PATIENT_IDENTITY = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate")


def patient_mismatch(headers: Mapping[str, Sequence[Dataset]]) -> str | None:
    """Which identifying attribute differs between the instances of one study, or None when they agree.

    The answer names the attribute and how many distinct values it has, never the values (they identify
    the patient). Absent and empty are the same value. Patient ID must be the same in every instance, empty
    or not; the issuer, name and birth date must not have two different non-empty values (an object made
    by another system, a key object say, often leaves them empty).
    """
    for keyword in PATIENT_IDENTITY:
        values = {str(ds.get(keyword, "") or "").strip() for series in headers.values() for ds in series}
        if keyword != "PatientID":
            values.discard("")
        if len(values) > 1:
            return f"the study's instances carry {len(values)} different {keyword} values; nothing is analysed or sent"
    return None


def files_key(series_files: Mapping[str, Sequence[Path]]) -> str:
    """A digest of the files given, in their order, as they are on disk: path, device, inode, time and size."""
    digest = hashlib.sha256()
    for series_uid, paths in series_files.items():
        digest.update(f"series {series_uid}\n".encode())
        for path in paths:
            st = os.stat(path)
            digest.update(f"{path}\0{st.st_dev}\0{st.st_ino}\0{st.st_mtime_ns}\0{st.st_size}\n".encode())
    return digest.hexdigest()


def _one_line(exc: BaseException) -> str:
    first = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}".rstrip(": ")


class StudyRunner(Protocol):
    """Analyses one study with one pipeline; what the worker and ``ainode run`` call."""

    def run(
        self, pipeline: str, series_files: Mapping[str, Sequence[Path]], outputs: Iterable[ResultKind | str]
    ) -> RunOutcome:
        """Analyse the study whose files are ``series_files`` (by Series Instance UID) with ``pipeline``.

        ``outputs`` are the kinds of result object wanted (their values, "seg", are taken too).
        """
        ...


def describe_selection(
    headers: Mapping[str, Sequence[Dataset]], candidates: Sequence[Candidate], rejected: Mapping[str, str]
) -> str:
    """One line for the operator: the series the pipeline takes, and why each other one is skipped.

    A series is named by its number, description and UID (what a PACS viewer lists), never by
    anything about the patient.
    """

    def name(uid: str) -> str:
        first = headers[uid][0] if headers.get(uid) else Dataset()
        number = first.get("SeriesNumber")
        text = str(first.get("SeriesDescription", "") or "").strip()
        label = f"series {'?' if number in (None, '') else number}"
        return f"{label} '{text}' {uid}" if text else f"{label} {uid}"

    skipped = [f"{name(uid)}: {why}" for uid, why in rejected.items()]
    skipped += [f"{name(c.series_instance_uid)}: ranked below the chosen series" for c in candidates[1:]]
    head = "no series chosen"
    if candidates:
        head = f"chose {name(candidates[0].series_instance_uid)} ({candidates[0].description})"
    return head + ("; skipped " + "; ".join(skipped) if skipped else "")


def run_pipeline(
    model: LoadedModel,
    volume: Volume,
    batch_size: int | None = None,
    headers: Sequence[Dataset] | None = None,
    slice_cache: SliceCache | None = None,
) -> PipelineResult | NotAnalysed:
    """Run ``model`` on ``volume`` with the pipeline of its manifest's task, and return its plain result.

    Unsuitable input (wrong modality, no pixels, not axial, not a single image...) comes back as
    :class:`~pipelines.notanalysed.NotAnalysed` with a specific reason; only genuine faults (a broken
    model, a bug) raise. ``batch_size`` overrides the manifest's slices per inference call (segmentation).

    Input outside the manifest's validated ``domain`` is not analysed (OUTSIDE_VALIDATED_DOMAIN), checked
    here, once, before any pipeline runs: ``headers`` are the source datasets of ``volume`` (the chosen
    series' instances), which the body part, view position and photometric interpretation bounds read;
    without them only the volume's own bounds (modality, geometry, input profile) are checked.

    ``slice_cache``: label rows of slices analysed before (segmentation; see :mod:`pipelines.streaming`).
    """
    from pipelines.classification import classify
    from pipelines.domain import check_domain
    from pipelines.segmentation import segment
    from pipelines.svm import assess_density

    task = model.manifest.task
    if task not in (Task.SEGMENTATION, Task.CLASSIFICATION, Task.SVM):
        raise ValueError(f"model {model.manifest.name}: no pipeline for task {task!r}")
    # The domain check and the pipeline run at once (both mostly NumPy, which leaves the interpreter lock):
    # a result counts only once the check has passed, and a refusal by the check is the outcome whatever the
    # pipeline did, as if the check had run first.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="domain-check") as pool:
        checked = pool.submit(check_domain, model.manifest, volume, headers)
        try:
            if task is Task.SEGMENTATION:
                result: PipelineResult | NotAnalysed = segment(model, volume, batch_size, cache=slice_cache)
            elif task is Task.CLASSIFICATION:
                result = classify(model, volume)
            else:
                result = assess_density(model, volume)
        except Exception as exc:
            failed: Exception | None = exc
        else:
            failed = None
        try:
            checked.result()
        except NotAnalysable as exc:
            return exc.outcome
    if isinstance(failed, NotAnalysable):
        return failed.outcome
    if failed is not None:
        raise failed
    return result


#: The modules a run imports when it first needs them (not with this module: a receiver's process does not load
#: them). A worker imports them at start (:meth:`OnnxStudyRunner.preload`): highdicom and the writers alone took
#: 0.3 s, which the node's first study after its start paid in its write step.
RUN_MODULES = ("pipelines.volume", "pipelines.domain", "pipelines.segmentation", "pipelines.classification",
               "pipelines.svm", "pipelines.slicecache", "pipelines.streaming", "pipelines.dicom")  # fmt: skip


class OnnxStudyRunner:
    """The :class:`StudyRunner` of the node: series selection, volume, ONNX pipeline, DICOM writers.

    Parameters
    ----------
    registry
        The models by name (a route's ``pipeline``).
    equipment
        The node as DICOM equipment, written into every result object (IHE AIR).
    omit_empty_frames
        Leave DICOM-SEG frames without any segment pixel out (config ``results.omit_empty_seg_frames``).
    batch_size
        Slices per inference call for every model (config ``runtime.batch_size``); None: each manifest's own.
    slice_cache
        The slice cache of a study, by Study Instance UID: label rows computed while it arrived
        (config ``runtime.stream_inference``); None: every slice is analysed when the study is complete.
    headers
        Headers parsed while the study arrived (by the analysis ahead): a file found there is not parsed again.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        equipment: Equipment,
        *,
        omit_empty_frames: bool = False,
        batch_size: int | None = None,
        max_volume_bytes: int | None = None,
        slice_cache: Callable[[str], SliceCache] | None = None,
        headers: HeaderCache | None = None,
    ) -> None:
        self.headers = headers
        self.max_volume_bytes = max_volume_bytes
        self.slice_cache = slice_cache
        self.registry = registry
        self.equipment = equipment
        self.omit_empty_frames = omit_empty_frames
        self.batch_size = batch_size
        #: Outcomes prepared ahead, by input key, with their Study Instance UID; and the preparations under way.
        self._prepared: dict[str, tuple[str, str, RunOutcome]] = {}
        self._preparing: dict[str, threading.Event] = {}
        #: Keys jobs wait for, with how many: their preparation goes on whatever else happens.
        self._awaited: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _check_volume_size(self, datasets: Sequence[Dataset]) -> None:
        """Refuse, before anything is decoded, a series whose pixels would exceed the job's memory budget."""
        if self.max_volume_bytes is None:
            return
        total = 0
        for ds in datasets:
            try:
                frames = int(ds.get("NumberOfFrames", 1) or 1)
                total += frames * int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * 4
            except (TypeError, ValueError):
                continue  # the loader refuses a header it cannot read, with its own reason
        if total > self.max_volume_bytes:
            raise NotAnalysable(
                NotAnalysedReason.VOLUME_TOO_LARGE,
                f"the series needs {total // 2**20} MB as a volume, more than runtime.max_volume_mb"
                f" {self.max_volume_bytes // 2**20}",
            )

    def preload(self, pipelines: Iterable[str]) -> dict[str, str]:
        """Load (verify checksum, create the session of) each routed model now; returns problems by name.

        At start, so that a missing or tampered model is reported when the node starts rather than at
        the first study, and the first study does not wait for a session to be created, nor for the modules
        a run imports (:data:`RUN_MODULES`) to be imported.
        """
        import importlib

        for module in RUN_MODULES:
            importlib.import_module(module)
        problems = {}
        for name in dict.fromkeys(pipelines):
            try:
                self.registry.get(name)
            except Exception as exc:  # reported to the operator; jobs routed to it fail with the same reason
                problems[name] = f"{type(exc).__name__}: {exc}"
        return problems

    # -- results made ahead --------------------------------------------------------------------
    def input_key(
        self, pipeline: str, series_files: Mapping[str, Sequence[Path]], outputs: Iterable[ResultKind | str]
    ) -> str:
        """A digest of everything :meth:`run` depends on, as it is now.

        The pipeline's manifest (with the SHA-256 of its ``model.onnx``), this runner's settings and equipment,
        the wanted kinds, and every file in the order given, as it is on disk: path, device, inode,
        modification time and size. The spool replaces a file by renaming a new one over it (a new inode), so
        a duplicate stored again, a new instance or a removed one each make another key.
        """
        return self._key(pipeline, outputs, files_key(series_files))

    def _key(self, pipeline: str, outputs: Iterable[ResultKind | str], files: str) -> str:
        """:meth:`input_key` of the files whose :func:`files_key` is ``files``."""
        manifest = self.registry.get(pipeline).manifest
        settings = (pipeline, manifest.model_dump_json(), sorted(ResultKind(o).value for o in outputs),
                    self.omit_empty_frames, self.batch_size, self.max_volume_bytes, repr(self.equipment))  # fmt: skip
        return hashlib.sha256(f"{settings!r}\n{files}".encode()).hexdigest()

    def prepare(
        self,
        study_uid: str,
        pipeline: str,
        series_files: Mapping[str, Sequence[Path]],
        outputs: Iterable[ResultKind | str],
        go_on: Callable[[], bool],
        finish: Callable[[str, RunOutcome], RunOutcome] | None = None,
    ) -> bool:
        """Analyse a study that is not complete yet, and keep the outcome for a :meth:`run` of the same input.

        Called while a study is quiet, before its stability wait ends, so that its job finds the results made.
        The outcome is kept under :meth:`input_key`, taken before any file is read: a run given the same
        files, unchanged on disk, gets it (once); any other input misses and is analysed as usual. So a
        result made ahead is the one the job would make: the same call on the same bytes.

        ``go_on`` is asked between steps (read, volume, model, write); False gives up (:class:`Preempted`,
        returned as False) unless a job already waits for this very preparation. A job that runs with this
        input while it is under way waits for it rather than starting over. Other errors propagate: the job
        meets them again and reports them. True when an outcome for this input is kept.

        ``finish(key, outcome)``, if given, is called before the outcome is kept, and what it returns is kept
        (the node writes the objects into its spool then, see :attr:`RunOutcome.written_ahead`). An outcome with
        an output that could not be built is not kept (:class:`ResultsNotBuilt`: the job tries again), nor one
        whose files changed while they were read (False). Outcomes of the same study made from other files
        are dropped: that input is gone (a study's files only grow or are replaced).
        """
        wanted = list(outputs)
        files = files_key(series_files)
        key = self._key(pipeline, wanted, files)
        with self._lock:
            if key in self._prepared:
                return True
            if key in self._preparing:
                return False
            done = self._preparing[key] = threading.Event()

        def keep_going() -> bool:
            if go_on():
                return True
            with self._lock:  # asked after go_on: a job that began to wait meanwhile is seen
                return self._awaited[key] > 0

        try:
            outcome = dataclasses.replace(self._run(pipeline, series_files, wanted, go_on=keep_going), prepared=True)
            if outcome.failed_outputs:  # perhaps for a passing reason: the job tries again
                raise ResultsNotBuilt(
                    "; ".join(f"{kind} not built: {why}" for kind, why in outcome.failed_outputs.items())
                )
            if files_key(series_files) != files:
                return False  # a file changed while it was read: this outcome is of no input the job can have
            if finish is not None:
                outcome = finish(key, outcome)
        except Preempted:
            return False
        else:
            with self._lock:
                # The study's outcomes made from other files are of an input that is gone (it only grows or changes).
                for older in [k for k, (uid, fk, _) in self._prepared.items() if uid == study_uid and fk != files]:
                    del self._prepared[older]
                self._prepared[key] = (study_uid, files, outcome)
                while len(self._prepared) > MAX_PREPARED:
                    del self._prepared[next(iter(self._prepared))]
            return True
        finally:
            with self._lock:
                del self._preparing[key]
            done.set()

    def forget_prepared(self, keep: Iterable[str]) -> int:
        """Drop the outcomes prepared for studies not in ``keep`` (those no longer open); how many went."""
        studies = set(keep)
        with self._lock:
            gone = [key for key, (uid, _, _) in self._prepared.items() if uid not in studies]
            for key in gone:
                del self._prepared[key]
        return len(gone)

    def _take_prepared(self, key: str) -> RunOutcome | None:
        with self._lock:
            kept = self._prepared.pop(key, None)
            under_way = self._preparing.get(key) if kept is None else None
            if under_way is not None:
                self._awaited[key] += 1
        if under_way is None:
            return kept[2] if kept is not None else None
        started = time.monotonic()
        under_way.wait(PREPARE_WAIT_S)
        with self._lock:
            self._awaited[key] -= 1
            if self._awaited[key] <= 0:
                del self._awaited[key]
            kept = self._prepared.pop(key, None)
        if kept is None:
            return None
        # The job's log says how long it waited for the end of the preparation (it began before the wait ended).
        outcome = kept[2]
        return dataclasses.replace(outcome, steps_s={**outcome.steps_s, "waited": time.monotonic() - started})

    def run(
        self, pipeline: str, series_files: Mapping[str, Sequence[Path]], outputs: Iterable[ResultKind | str]
    ) -> RunOutcome:
        """Analyse the study (see :class:`StudyRunner`); an outcome prepared ahead from this very input is taken."""
        wanted = list(outputs)
        if self._prepared or self._preparing:
            try:
                key: str | None = self.input_key(pipeline, series_files, wanted)
            except Exception:  # a file gone, a model that cannot load: the run below says what is wrong
                key = None
            prepared = self._take_prepared(key) if key is not None else None
            if prepared is not None:
                return prepared
        return self._run(pipeline, series_files, wanted)

    def _run(
        self,
        pipeline: str,
        series_files: Mapping[str, Sequence[Path]],
        outputs: Iterable[ResultKind | str],
        go_on: Callable[[], bool] | None = None,
    ) -> RunOutcome:
        from pipelines.dicom import write_each

        def check() -> None:
            if go_on is not None and not go_on():
                raise Preempted

        from pipelines.volume import load_volume

        wanted = sorted({ResultKind(o) for o in outputs})
        model = self.registry.get(pipeline)
        manifest = model.manifest
        steps: dict[str, float] = {}
        t0 = time.monotonic()
        # One parse per file: pixel data is deferred (read from the file when the volume is built), so the
        # headers that selection reads are the datasets that are then loaded.
        read = self.headers.read if self.headers is not None else read_header
        headers = {uid: [read(p) for p in paths] for uid, paths in series_files.items()}
        steps["read"] = time.monotonic() - t0
        check()
        mismatch = patient_mismatch(headers)
        if mismatch is not None:
            # A result carries the patient of its sources: with two patients in one study it would be wrong for one.
            return RunOutcome(not_analysed=str(NotAnalysed(NotAnalysedReason.PATIENT_MISMATCH, mismatch)))
        modalities = list(manifest.modalities)
        candidates, rejected = rank_series(headers, task=manifest.task, modalities=modalities)
        selection = describe_selection(headers, candidates, rejected)
        try:
            # With no candidate, select_series raises NotAnalysable(NO_SUITABLE_SERIES) with every reason.
            chosen = (
                candidates[0].series_instance_uid if candidates else select_series(headers, manifest.task, modalities)
            )
            datasets = [headers[chosen][i] for i in usable_instances(headers[chosen], manifest.task, modalities)]
            self._check_volume_size(datasets)
            # The writers need headers only (SC renders from the volume).
            volume = load_volume(datasets, release_pixel_data=True)
        except NotAnalysable as exc:
            return RunOutcome(not_analysed=str(exc.outcome), selection=selection)
        steps["volume"] = time.monotonic() - t0 - steps["read"]
        check()
        cache = None
        if self.slice_cache is not None:
            from pipelines.slicecache import CountingCache
            from pipelines.streaming import streams

            if streams(model):
                cache = CountingCache(self.slice_cache(volume.study_instance_uid))
        t1 = time.monotonic()
        result = run_pipeline(model, volume, batch_size=self.batch_size, headers=datasets, slice_cache=cache)
        model_s = steps["model"] = time.monotonic() - t1
        reused = None
        if cache is not None and (cache.reused or cache.computed):
            reused = (cache.reused, cache.reused + cache.computed)
        if isinstance(result, NotAnalysed):
            return RunOutcome(not_analysed=str(result), model_s=model_s, selection=selection)
        check()
        t1 = time.monotonic()
        written = write_each(result, datasets, self.equipment, wanted, omit_empty_frames=self.omit_empty_frames)
        steps["write"] = time.monotonic() - t1
        failed = {kind.value: _one_line(exc) for kind, exc in written.failed.items()}
        if not written.datasets and failed:
            raise ResultsNotBuilt("; ".join(f"{kind} not built: {why}" for kind, why in failed.items()))
        return RunOutcome(
            datasets=written.datasets,
            model_s=model_s,
            selection=selection,
            failed_outputs=failed,
            slices_reused=reused,
            steps_s=steps,
        )
