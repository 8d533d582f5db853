"""Allowed values of the core's concepts, as enums (highdicom's ``enum.py`` per package).

A string from outside (the configuration, the command line, a database column) becomes one of these
once, where it enters; everything after works with the enum. The manifest's own enums
(:class:`pipelines.manifest.Task`, :class:`pipelines.manifest.OutputKind`) live with the manifest.
"""

from __future__ import annotations

from enum import StrEnum


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
