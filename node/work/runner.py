"""The default StudyRunner: series selection, volume, ONNX pipeline, DICOM writers.

It glues the pure core together for one job: pick the series the model wants, load it,
run the model, turn the result into DICOM objects. Unsuitable input ends as "not analysed"
with the pipeline's own reason; anything else that goes wrong is an exception that fails
the job (worker.py) and leaves the node serving.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from pydicom import Dataset, dcmread

from node.work.worker import RunOutcome
from pipelines.dicom import Equipment, OutputKind, write_results
from pipelines.results import NotAnalysable, NotAnalysed
from pipelines.run import run_pipeline
from pipelines.runtime import ModelRegistry
from pipelines.select import Candidate, rank_series, select_series, usable_instances
from pipelines.volume import load_volume

#: Elements larger than this (pixel data) are read only when used.
DEFER_BYTES = 64 * 1024


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


class OnnxStudyRunner:
    def __init__(
        self,
        registry: ModelRegistry,
        equipment: Equipment,
        *,
        omit_empty_frames: bool = False,
        batch_size: int | None = None,
    ) -> None:
        self.registry = registry
        self.equipment = equipment
        self.omit_empty_frames = omit_empty_frames
        #: Slices per inference call for every model (config ``runtime.batch_size``); None: each manifest's own.
        self.batch_size = batch_size

    def preload(self, pipelines: Iterable[str]) -> dict[str, str]:
        """Load (verify checksum, create the session of) each routed model now; returns problems by name.

        At start, so that a missing or tampered model is reported when the node starts rather than at
        the first study, and the first study does not wait for a session to be created.
        """
        problems = {}
        for name in dict.fromkeys(pipelines):
            try:
                self.registry.get(name)
            except Exception as exc:  # reported to the operator; jobs routed to it fail with the same reason
                problems[name] = f"{type(exc).__name__}: {exc}"
        return problems

    def run(self, pipeline: str, series_files: Mapping[str, Sequence[Path]], outputs: set[str]) -> RunOutcome:
        model = self.registry.get(pipeline)
        manifest = model.manifest
        # One parse per file: pixel data is deferred (read from the file when the volume is built), so the
        # headers that selection reads are the datasets that are then loaded.
        headers = {uid: [dcmread(p, defer_size=DEFER_BYTES) for p in paths] for uid, paths in series_files.items()}
        task, modalities = str(getattr(manifest.task, "value", manifest.task)), list(manifest.modalities)
        candidates, rejected = rank_series(headers, task=task, modalities=modalities)
        selection = describe_selection(headers, candidates, rejected)
        try:
            # With no candidate, select_series raises NotAnalysable(NO_SUITABLE_SERIES) with every reason.
            chosen = candidates[0].series_instance_uid if candidates else select_series(headers, task, modalities)
            datasets = [headers[chosen][i] for i in usable_instances(headers[chosen], task, modalities)]
            volume = load_volume(datasets)
        except NotAnalysable as exc:
            return RunOutcome(not_analysed=str(exc.outcome), selection=selection)
        for ds in datasets:
            # The volume holds the pixels now; the writers need headers only (SC renders from the volume).
            ds.pop(0x7FE00010, None)
        t0 = time.monotonic()
        result = run_pipeline(model, volume, batch_size=self.batch_size)
        model_s = time.monotonic() - t0
        if isinstance(result, NotAnalysed):
            return RunOutcome(not_analysed=str(result), model_s=model_s, selection=selection)
        objects = write_results(
            result,
            datasets,
            self.equipment,
            [OutputKind(o) for o in sorted(outputs)],
            omit_empty_frames=self.omit_empty_frames,
        )
        return RunOutcome(datasets=list(objects), model_s=model_s, selection=selection)
