"""Allowed values of the core's concepts, as enums (highdicom's ``enum.py`` per package).

A string from outside (the configuration, the command line, a database column) becomes one of these
once, where it enters; everything after works with the enum. The manifest's output kinds
(:class:`pipelines.manifest.OutputKind`) live with the manifest.
"""

from __future__ import annotations

from enum import Enum, StrEnum

from pydicom.dataset import Dataset
from pydicom.uid import (
    BasicTextSRStorage,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    ExtensibleSRStorage,
    SegmentationStorage,
)


class Task(str, Enum):
    """What a model does, and so which pipeline runs it (the manifest's ``task``)."""

    SEGMENTATION = "segmentation"
    CLASSIFICATION = "classification"
    SVM = "svm"


class ResultKind(StrEnum):
    """A kind of result object the node writes, as a destination asks for it (config ``peers.<name>.outputs``).

    The value is what the configuration, ``ainode run --outputs`` and the database (``results.kind``)
    spell; a ``StrEnum``, so that it compares, hashes and formats as that value.
    """

    #: DICOM Segmentation (binary), one segment per label.
    SEG = "seg"
    #: TID 1500 Measurement Report in a Comprehensive 3D SR.
    SR = "sr"
    #: Secondary Capture images with the result burned in, for viewers that show neither SEG nor SR.
    SC = "sc"


#: The SR storage SOP classes (PS3.4 B.5) whatever template they carry: a report, for a destination.
SR_CLASSES = frozenset(
    {BasicTextSRStorage, EnhancedSRStorage, ComprehensiveSRStorage, Comprehensive3DSRStorage, ExtensibleSRStorage}
)


def result_kind(ds: Dataset) -> ResultKind:
    """The kind of a result object by its SOP Class UID: SEG, SR, or SC (any image for plain viewers)."""
    sop_class = str(ds.SOPClassUID)
    if sop_class == SegmentationStorage:
        return ResultKind.SEG
    if sop_class in SR_CLASSES:
        return ResultKind.SR
    return ResultKind.SC
