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
