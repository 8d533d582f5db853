"""Plain result objects returned by the pipelines and consumed by the DICOM writers.

These are deliberately small dataclasses over NumPy arrays and pydicom ``Code``
values: no DICOM is written here (that is :mod:`pipelines.dicom`), no network or
database is touched.  Every result knows the model that made it and the geometry
of the source it refers to, so that a writer can reference the exact source
instances and frame of reference.

As highdicom's content classes do, each constructor refuses nonsense on entry with a
:class:`TypeError` or :class:`ValueError` that names the argument: a label map that does not
fit its volume, a probability outside [0, 1], two segments with one number. A result that
exists can be written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from pydicom.sr.coding import Code

from pipelines.volume import Volume

if TYPE_CHECKING:
    from pipelines.manifest import ModelManifest

#: Largest Segment Number (US) a DICOM-SEG can hold.
MAX_SEGMENT_NUMBER = 65535


# -- argument checks (messages name the argument, as highdicom's do) ----------------------------
def _check_type(name: str, value: object, kind: type | tuple[type, ...], what: str) -> None:
    if not isinstance(value, kind):
        raise TypeError(f'Argument "{name}" must be {what}, not {type(value).__name__}.')


def _check_text(name: str, value: object) -> None:
    _check_type(name, value, str, "a string")
    if not str(value).strip():
        raise ValueError(f'Argument "{name}" must not be empty.')


def _check_code(name: str, value: object) -> None:
    _check_type(name, value, Code, "a pydicom Code")


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f'Argument "{name}" must be a number, not {type(value).__name__}.')
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f'Argument "{name}" must be a finite number, got {number}.')
    return number


def _check_probability(name: str, value: object) -> None:
    number = _check_number(name, value)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f'Argument "{name}" must be a probability in [0, 1], got {number}.')


def _check_index(name: str, value: object, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f'Argument "{name}" must be an integer, not {type(value).__name__}.')
    if value < low or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"from {low} to {high}"
        raise ValueError(f'Argument "{name}" must be {bounds}, got {value}.')


def _check_outline(name: str, points: object) -> None:
    """A closed polygon as (points, 2) image coordinates; an empty (0, 2) array means "no outline"."""
    _check_type(name, points, np.ndarray, "a NumPy array")
    assert isinstance(points, np.ndarray)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f'Argument "{name}" must have shape (points, 2) of (column, row), got {points.shape}.')
    if not np.all(np.isfinite(points)):
        raise ValueError(f'Argument "{name}" must hold finite coordinates.')


def _check_items(name: str, values: object, kind: type) -> None:
    _check_type(name, values, (list, tuple), f"a list of {kind.__name__}")
    assert isinstance(values, list | tuple)
    for i, value in enumerate(values):
        _check_type(f"{name}[{i}]", value, kind, kind.__name__)


# -- results -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelIdentity:
    """Which algorithm produced a result (DICOM "Algorithm Identification").

    Parameters
    ----------
    name
        Algorithm Name: the model's manifest name, also what routes refer to.
    version
        Algorithm Version; a new version makes new result UIDs.
    """

    name: str
    version: str

    def __post_init__(self) -> None:
        _check_text("name", self.name)
        _check_text("version", self.version)

    @classmethod
    def of(cls, manifest: ModelManifest) -> ModelIdentity:
        """The identity a model's manifest declares (its ``name`` and ``version``)."""
        return cls(name=manifest.name, version=manifest.version)


@dataclass(frozen=True)
class SegmentDefinition:
    """One segment of a segmentation, described as DICOM-SEG and TID 1500 need it."""

    #: Segment Number in the SEG object (1-based) and value of this segment in the label map.
    number: int
    label: str
    #: Segmented Property Category (CID 7150), e.g. SCT 91723000 "Anatomical structure".
    category: Code
    #: Segmented Property Type (CID 7151), e.g. SCT 39607008 "Lung".
    property_type: Code
    #: Optional laterality modifier, e.g. SCT 7771000 "Left".
    laterality: Code | None = None

    def __post_init__(self) -> None:
        _check_index("number", self.number, 1, MAX_SEGMENT_NUMBER)
        _check_text("label", self.label)
        _check_code("category", self.category)
        _check_code("property_type", self.property_type)
        if self.laterality is not None:
            _check_code("laterality", self.laterality)


@dataclass(frozen=True)
class SegmentStatistics:
    """Measurements made on one segment (what the TID 1411 volumetric ROI reports)."""

    number: int
    volume_ml: float
    mean_intensity: float
    #: UCUM unit of ``mean_intensity``: "[hnsf'U]" for CT, "1" for unit-less images.
    intensity_unit: str
    #: Index into the volume's slices of the slice where the segment has its largest area.
    largest_slice_index: int
    #: Outline of the segment on that slice, as (column, row) image coordinates, closed polygon.
    outline_rc: np.ndarray

    def __post_init__(self) -> None:
        _check_index("number", self.number, 1, MAX_SEGMENT_NUMBER)
        if _check_number("volume_ml", self.volume_ml) < 0:
            raise ValueError(f'Argument "volume_ml" must not be negative, got {self.volume_ml}.')
        _check_number("mean_intensity", self.mean_intensity)
        _check_text("intensity_unit", self.intensity_unit)
        _check_index("largest_slice_index", self.largest_slice_index, 0)
        _check_outline("outline_rc", self.outline_rc)


@dataclass
class SegmentationResult:
    model: ModelIdentity
    #: The source volume; its ``source_frames`` say which instance each slice came from.
    volume: Volume
    #: Label map aligned with ``volume.pixels`` (slices, rows, columns); 0 = background.
    labelmap: np.ndarray
    segments: list[SegmentDefinition]
    statistics: list[SegmentStatistics] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_type("model", self.model, ModelIdentity, "a ModelIdentity")
        _check_type("volume", self.volume, Volume, "a Volume")
        _check_type("labelmap", self.labelmap, np.ndarray, "a NumPy array")
        if self.labelmap.shape != self.volume.pixels.shape:
            raise ValueError(
                f'Argument "labelmap" must have the shape of the volume (slices, rows, columns) '
                f"{self.volume.pixels.shape}, got {self.labelmap.shape}."
            )
        if not np.issubdtype(self.labelmap.dtype, np.unsignedinteger):
            raise ValueError(f'Argument "labelmap" must hold unsigned integers, got {self.labelmap.dtype}.')
        _check_items("segments", self.segments, SegmentDefinition)
        if not self.segments:
            raise ValueError('Argument "segments" must hold at least one segment.')
        numbers = [s.number for s in self.segments]
        if len(set(numbers)) != len(numbers):
            raise ValueError(f'Argument "segments" must hold one segment per number, got numbers {numbers}.')
        if self.labelmap.size and int(self.labelmap.max()) > max(numbers):
            raise ValueError(
                f'Argument "labelmap" holds the value {int(self.labelmap.max())}, which no segment has '
                f"(segments {sorted(numbers)})."
            )
        _check_items("statistics", self.statistics, SegmentStatistics)
        measured = [s.number for s in self.statistics]
        if len(set(measured)) != len(measured) or not set(measured) <= set(numbers):
            raise ValueError(
                f'Argument "statistics" must measure each segment at most once, got numbers {measured} '
                f"for segments {numbers}."
            )
        for i, stats in enumerate(self.statistics):
            if stats.largest_slice_index >= self.labelmap.shape[0]:
                raise ValueError(
                    f'Argument "statistics[{i}]" names slice {stats.largest_slice_index} of a '
                    f"{self.labelmap.shape[0]}-slice volume."
                )


@dataclass
class ClassificationResult:
    model: ModelIdentity
    #: The single image (a one-slice volume) the classifier looked at.
    volume: Volume
    finding: Code
    probability: float
    threshold: float
    #: Class-activation heat map in the image's pixel grid (rows, columns), values 0..1.
    heatmap: np.ndarray
    #: Bounding box of the heat map's hot spot as (column_min, row_min, column_max, row_max).
    hotspot_box_rc: tuple[float, float, float, float]

    def __post_init__(self) -> None:
        _check_type("model", self.model, ModelIdentity, "a ModelIdentity")
        _check_type("volume", self.volume, Volume, "a Volume")
        _check_code("finding", self.finding)
        _check_probability("probability", self.probability)
        _check_probability("threshold", self.threshold)
        _check_type("heatmap", self.heatmap, np.ndarray, "a NumPy array")
        if self.heatmap.shape != self.volume.pixels.shape[1:]:
            raise ValueError(
                f'Argument "heatmap" must have the image\'s shape (rows, columns) {self.volume.pixels.shape[1:]}, '
                f"got {self.heatmap.shape}."
            )
        if self.heatmap.size and not (float(self.heatmap.min()) >= 0.0 and float(self.heatmap.max()) <= 1.0):
            raise ValueError('Argument "heatmap" must hold values from 0 to 1.')
        box = self.hotspot_box_rc
        if not isinstance(box, Sequence) or len(box) != 4:
            raise ValueError(
                f'Argument "hotspot_box_rc" must be (column_min, row_min, column_max, row_max), got {box}.'
            )
        c0, r0, c1, r1 = (_check_number(f"hotspot_box_rc[{i}]", v) for i, v in enumerate(box))
        if c0 > c1 or r0 > r1:
            raise ValueError(f'Argument "hotspot_box_rc" must have its minimum before its maximum, got {box}.')

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold


@dataclass(frozen=True)
class Feature:
    """One feature the SVM used, reported as a TID 1500 measurement."""

    name: str
    concept: Code
    value: float
    #: UCUM unit code, e.g. "1" for a ratio, "%" for a percentage.
    unit: str

    def __post_init__(self) -> None:
        _check_text("name", self.name)
        _check_code("concept", self.concept)
        _check_number("value", self.value)
        _check_text("unit", self.unit)


@dataclass
class DensityResult:
    model: ModelIdentity
    volume: Volume
    #: "A", "B", "C" or "D" (BI-RADS 5th edition breast composition).
    category: str
    #: Coded density category, for the SR's qualitative evaluation.
    category_code: Code
    #: Probability of each category, by category name.
    probabilities: dict[str, float]
    features: list[Feature]
    #: Outline of the breast region the features were computed on, (column, row) image coordinates, closed.
    breast_outline_rc: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))

    def __post_init__(self) -> None:
        _check_type("model", self.model, ModelIdentity, "a ModelIdentity")
        _check_type("volume", self.volume, Volume, "a Volume")
        _check_text("category", self.category)
        _check_code("category_code", self.category_code)
        _check_type("probabilities", self.probabilities, Mapping, "a mapping of category to probability")
        for name, probability in self.probabilities.items():
            _check_probability(f"probabilities[{name!r}]", probability)
        if self.category not in self.probabilities:
            raise ValueError(
                f'Argument "category" must be one of the categories of "probabilities" '
                f"({', '.join(self.probabilities)}), got {self.category!r}."
            )
        _check_items("features", self.features, Feature)
        _check_outline("breast_outline_rc", self.breast_outline_rc)


PipelineResult = SegmentationResult | ClassificationResult | DensityResult
