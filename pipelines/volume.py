"""Series -> geometry-aware volume.

Interface placeholder: the full implementation (sorting along the slice normal,
rescale, MONOCHROME1, multi-frame, every transfer syntax, suitability checks)
belongs to this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SourceFrame:
    """Which stored instance (and frame of it) a slice of a volume came from."""

    sop_class_uid: str
    sop_instance_uid: str
    #: 1-based frame number for multi-frame instances, None for single-frame ones.
    frame_number: int | None = None


@dataclass
class Volume:
    """Pixels of one series in patient space.

    ``pixels`` has shape (slices, rows, columns), float32, in modality units
    (Hounsfield units for CT after Rescale Slope/Intercept; MONOCHROME1 already
    inverted so that higher values are brighter). Slices are ordered along the
    slice normal (increasing ``slice_direction`` · ImagePositionPatient), never by
    InstanceNumber.
    """

    pixels: np.ndarray
    #: ImagePositionPatient of the first slice (mm, patient LPS).
    origin_mm: np.ndarray
    #: (between slices, between rows, between columns) in mm; row spacing = PixelSpacing[0].
    spacing_mm: tuple[float, float, float]
    #: Direction cosines: row direction (along a row, increasing column), column direction, slice normal.
    row_direction: np.ndarray
    column_direction: np.ndarray
    slice_direction: np.ndarray
    source_frames: list[SourceFrame]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str | None
    modality: str
