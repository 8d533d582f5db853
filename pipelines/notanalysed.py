"""The outcome "not analysed": input a pipeline cannot use, with a specific reason.

A leaf module (it imports nothing of ``pipelines``): the volume loader, series selection and every
pipeline raise :class:`NotAnalysable`, and :mod:`pipelines.study` turns it into :class:`NotAnalysed`
at its edge, so that none of them has to import another to refuse input.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


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
    #: No valid Pixel Spacing where a pipeline measures in millimetres (absent, 0\\0, negative, not a number).
    UNKNOWN_PIXEL_SPACING = "unknown-pixel-spacing"
    #: Rescale Slope / Intercept (or another value the pixels are computed from) not a finite number.
    INVALID_PIXEL_VALUES = "invalid-pixel-values"
    #: The instances of one study name more than one patient: no result may carry a patient some sources lack.
    PATIENT_MISMATCH = "patient-mismatch"
    #: The series' pixels would need more memory than a job may take (runtime.max_volume_mb).
    VOLUME_TOO_LARGE = "volume-too-large"
    #: The input lies outside what the model's manifest says it was validated on (the measured value and bound).
    OUTSIDE_VALIDATED_DOMAIN = "outside-validated-domain"


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
