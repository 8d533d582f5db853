"""Do the sizes a header declares fit the pixel bytes that are actually there?

Checked before anything is allocated from a header's numbers: a 512 KB CT instance declaring
Number of Frames 2147483647 made a worker build an object per declared frame until it died of
MemoryError, and a dataset whose Pixel Data was cut in half was stored as if it were whole.
The C-STORE handler refuses such a dataset (it never reaches the spool), and the volume loader
refuses one already on disk, before its frames are listed.

A leaf module: it imports nothing of ``pipelines`` or ``node``.
"""

from __future__ import annotations

import os

from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.encaps import generate_fragments
from pydicom.tag import Tag
from pydicom.uid import UID

#: The elements that can hold an instance's pixels.
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
#: Bits per sample of the float pixel data elements (their Bits Allocated is fixed).
_FLOAT_BITS = {"FloatPixelData": 32, "DoubleFloatPixelData": 64}


def _count(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    """A US/IS value as an int; None when absent without default, or when it is not a whole number."""
    try:
        value = ds.get(keyword)
    except (TypeError, ValueError, OverflowError):
        return None
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number


def _bytes_present(ds: Dataset, keyword: str) -> int:
    """How many bytes of ``keyword``'s value there are, without reading a value that the reader deferred.

    A deferred value (``dcmread(defer_size=...)``) is read from the file when the pixels are decoded: its
    bytes are the length the element declares, as far as the file holds them. Reading them only to count
    them would hold a whole series' pixel data at once, beside the volume it is decoded into.
    """
    raw = ds._dict.get(Tag(keyword))
    filename = getattr(ds, "filename", None)
    if isinstance(raw, RawDataElement) and raw.value is None and raw.length and isinstance(filename, str):
        try:
            return max(0, min(raw.length, os.path.getsize(filename) - raw.value_tell))
        except OSError:
            pass  # read it, and fail there if it is gone
    value = ds[keyword].value
    return len(value) if value is not None else 0


def pixel_data_problem(ds: Dataset, transfer_syntax_uid: str | UID | None = None) -> str | None:
    """Why the pixel data of ``ds`` cannot be what its header declares, or None when it can.

    Native (uncompressed) pixel data must hold at least Rows x Columns x Samples per Pixel x Number of
    Frames samples of Bits Allocated each; encapsulated pixel data at least one fragment per frame.
    The message names attributes and sizes, never values that identify anyone.

    Parameters
    ----------
    transfer_syntax_uid
        How the dataset is encoded (the presentation context's syntax on the network); by default its
        File Meta Information's.
    """
    keyword = next((k for k in PIXEL_KEYWORDS if k in ds), None)
    if keyword is None:
        return None
    rows, columns = _count(ds, "Rows"), _count(ds, "Columns")
    samples, frames = _count(ds, "SamplesPerPixel", 1), _count(ds, "NumberOfFrames", 1)
    bits = _FLOAT_BITS.get(keyword) or _count(ds, "BitsAllocated")
    for name, value in (("Rows", rows), ("Columns", columns), ("Samples per Pixel", samples),
                        ("Number of Frames", frames), ("Bits Allocated", bits)):  # fmt: skip
        if value is None or value < 1:
            return f"{name} is missing or not a positive whole number"
    assert rows and columns and samples and frames and bits  # checked just above, for the type checker
    if transfer_syntax_uid is None:
        transfer_syntax_uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    syntax = UID(str(transfer_syntax_uid)) if transfer_syntax_uid else None
    if keyword == "PixelData" and syntax is not None and syntax.is_encapsulated:
        try:
            # The first item is the Basic Offset Table (PS3.5 A.4), possibly empty; every frame needs a fragment.
            fragments = sum(1 for _ in generate_fragments(ds[keyword].value)) - 1
        except (ValueError, TypeError) as exc:
            return f"encapsulated Pixel Data cannot be parsed ({type(exc).__name__})"
        if frames > max(fragments, 0):
            return f"Number of Frames is {frames} but the encapsulated Pixel Data has {fragments} fragment(s)"
        return None
    present = _bytes_present(ds, keyword)
    needed = (rows * columns * samples * frames * bits + 7) // 8
    if present < needed:
        return (
            f"{keyword} has {present} bytes; Rows x Columns x Samples per Pixel x Number of Frames x Bits Allocated"
            f" ({rows} x {columns} x {samples} x {frames} x {bits} bits) need {needed}"
        )
    return None
