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

from pydicom import dcmread

from node.worker import RunOutcome
from pipelines.dicom import Equipment, OutputKind, write_results
from pipelines.results import NotAnalysable, NotAnalysed
from pipelines.run import run_pipeline
from pipelines.runtime import ModelRegistry
from pipelines.select import select_series, usable_instances
from pipelines.volume import load_volume

#: Elements larger than this (pixel data) are read only when used.
DEFER_BYTES = 64 * 1024


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
        try:
            task, modalities = str(getattr(manifest.task, "value", manifest.task)), list(manifest.modalities)
            chosen = select_series(headers, task=task, modalities=modalities)
            datasets = [headers[chosen][i] for i in usable_instances(headers[chosen], task, modalities)]
            volume = load_volume(datasets)
        except NotAnalysable as exc:
            return RunOutcome(not_analysed=str(exc.outcome))
        for ds in datasets:
            # The volume holds the pixels now; the writers need headers only (SC renders from the volume).
            ds.pop(0x7FE00010, None)
        t0 = time.monotonic()
        result = run_pipeline(model, volume, batch_size=self.batch_size)
        model_s = time.monotonic() - t0
        if isinstance(result, NotAnalysed):
            return RunOutcome(not_analysed=str(result), model_s=model_s)
        objects = write_results(
            result,
            datasets,
            self.equipment,
            [OutputKind(o) for o in sorted(outputs)],
            omit_empty_frames=self.omit_empty_frames,
        )
        return RunOutcome(datasets=list(objects), model_s=model_s)
