"""Plain result objects returned by the pipelines and consumed by the DICOM writers.

These are deliberately small dataclasses over NumPy arrays and pydicom ``Code``
values: no DICOM is written here (that is :mod:`pipelines.dicom`), no network or
database is touched.  Every result knows the model that made it and the geometry
of the source it refers to, so that a writer can reference the exact source
instances and frame of reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np
from pydicom.sr.coding import Code

if TYPE_CHECKING:  # volume.py raises NotAnalysable from here: import only for type checkers
    from pipelines.volume import Volume


@dataclass(frozen=True)
class ModelIdentity:
    """Which algorithm produced a result (DICOM "Algorithm Identification")."""

    name: str
    version: str
    #: Free-text family shown to users; DICOM's code is CID 7162 "Artificial Intelligence".
    family: str = "Artificial Intelligence"


class NotAnalysedReason(str, Enum):
    """Why a series (or study) could not be analysed; each value is a stable machine-readable code."""

    NO_SUITABLE_SERIES = "no-suitable-series"
    TOO_FEW_SLICES = "too-few-slices"
    UNEVEN_SPACING = "uneven-spacing"
    GANTRY_TILT = "gantry-tilt"
    MISSING_PIXEL_DATA = "missing-pixel-data"
    UNSUPPORTED_PHOTOMETRIC = "unsupported-photometric-interpretation"
    INCONSISTENT_GEOMETRY = "inconsistent-geometry"
    UNDECODABLE = "undecodable-pixel-data"
    WRONG_MODALITY = "wrong-modality"


@dataclass(frozen=True)
class NotAnalysed:
    """The outcome "not analysed", with a specific reason a PACS administrator can act on."""

    reason: NotAnalysedReason
    detail: str

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}"


class NotAnalysable(Exception):
    """Raised inside a pipeline when input is unsuitable; turned into :class:`NotAnalysed` at its edge."""

    def __init__(self, reason: NotAnalysedReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.outcome = NotAnalysed(reason, detail)


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


@dataclass
class SegmentationResult:
    model: ModelIdentity
    #: The source volume; its ``source_frames`` say which instance each slice came from.
    volume: Volume
    #: Label map aligned with ``volume.pixels`` (slices, rows, columns); 0 = background.
    labelmap: np.ndarray
    segments: list[SegmentDefinition]
    statistics: list[SegmentStatistics] = field(default_factory=list)


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


@dataclass
class DensityResult:
    model: ModelIdentity
    volume: Volume
    #: "A", "B", "C" or "D" (BI-RADS 5th edition breast composition).
    category: str
    #: Coded density category, for the SR's qualitative evaluation.
    category_code: Code
    probabilities: dict[str, float]
    features: list[Feature]
    #: Outline of the breast region the features were computed on, (column, row) image coordinates, closed.
    breast_outline_rc: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))


PipelineResult = SegmentationResult | ClassificationResult | DensityResult
