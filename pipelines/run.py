"""One entry point for every model: dispatch on the manifest's task, turn bad input into "not analysed"."""

from __future__ import annotations

from pipelines.classification import classify
from pipelines.manifest import Task
from pipelines.results import NotAnalysable, NotAnalysed, PipelineResult
from pipelines.runtime import LoadedModel
from pipelines.segmentation import segment
from pipelines.svm import assess_density
from pipelines.volume import Volume


def run_pipeline(model: LoadedModel, volume: Volume, batch_size: int | None = None) -> PipelineResult | NotAnalysed:
    """Run ``model`` on ``volume`` and return its plain result.

    Unsuitable input (wrong modality, no pixels, not axial, not a single image...) comes back as
    :class:`~pipelines.results.NotAnalysed` with a specific reason; only genuine faults (a broken
    model, a bug) raise. ``batch_size`` overrides the manifest's slices per inference call (segmentation).
    """
    task = model.manifest.task
    try:
        if task is Task.SEGMENTATION:
            return segment(model, volume, batch_size)
        if task is Task.CLASSIFICATION:
            return classify(model, volume)
        if task is Task.SVM:
            return assess_density(model, volume)
    except NotAnalysable as exc:
        return exc.outcome
    raise ValueError(f"model {model.manifest.name}: no pipeline for task {task!r}")
