"""Classification pipeline: one radiograph -> probability of a finding, heat map and hot-spot box."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from pipelines.manifest import OutputKind
from pipelines.modelinput import check_modality, model_input
from pipelines.notanalysed import NotAnalysable, NotAnalysedReason
from pipelines.preprocess import resize_slices
from pipelines.results import ClassificationResult, ModelIdentity
from pipelines.runtime import LoadedModel
from pipelines.volume import Volume

#: Fraction of the heat map's maximum that outlines the hot spot.
HOTSPOT_LEVEL = 0.5


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def hotspot_box(heatmap: np.ndarray, level: float = HOTSPOT_LEVEL) -> tuple[float, float, float, float]:
    """Box around the connected region at or above ``level`` x max that contains the maximum.

    Returns (column_min, row_min, column_max, row_max) in DICOM image coordinates: pixel edges,
    so the box of the single top-left pixel is (0, 0, 1, 1).
    """
    peak = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    if heatmap[peak] <= 0:
        return (0.0, 0.0, float(heatmap.shape[1]), float(heatmap.shape[0]))
    regions, _ = ndi.label(heatmap >= level * heatmap[peak])
    rows, cols = np.nonzero(regions == regions[peak])
    return (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))


def classify(model: LoadedModel, volume: Volume) -> ClassificationResult:
    """Classify the single image of ``volume`` (a CR/DX instance).

    Raises
    ------
    NotAnalysable
        Wrong modality, or more than one image (the classifier looks at one frontal view).
    """
    manifest = model.manifest
    check_modality(manifest, volume)
    if volume.pixels.shape[0] != 1:
        raise NotAnalysable(
            NotAnalysedReason.NO_SUITABLE_SERIES,
            f"model {manifest.name} classifies one image; the series has {volume.pixels.shape[0]}",
        )
    rows, cols = volume.pixels.shape[1:]
    spacing_rc = (float(volume.spacing_mm[1]), float(volume.spacing_mm[2]))
    outputs = model.run(model_input(manifest, volume.pixels, spacing_rc))
    first = manifest.outputs[0]
    scores = np.asarray(outputs[0], dtype=np.float32).reshape(-1)
    if first.kind is OutputKind.LOGITS:
        scores = _sigmoid(scores) if scores.size == 1 else np.exp(scores) / np.exp(scores).sum()
    label = first.labels[0]
    # One sigmoid output is P(finding); several are per-class, indexed by label number.
    probability = float(scores[0] if scores.size == 1 else scores[label.number])

    heat_index = next((i for i, o in enumerate(manifest.outputs) if o.kind is OutputKind.HEATMAP), None)
    if heat_index is None:
        heatmap = np.zeros((rows, cols), np.float32)
    else:
        low = np.asarray(outputs[heat_index], dtype=np.float32)
        low = low.reshape(low.shape[-2:])
        heatmap = np.clip(resize_slices(low[None], (rows, cols))[0], 0.0, 1.0)
    return ClassificationResult(
        model=ModelIdentity.of(manifest),
        volume=volume,
        finding=label.type.to_code(),
        probability=probability,
        threshold=label.threshold if label.threshold is not None else 0.5,
        heatmap=heatmap,
        hotspot_box_rc=hotspot_box(heatmap),
    )
