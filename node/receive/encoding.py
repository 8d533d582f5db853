"""Is a C-STORE's data set encoded as negotiated, complete, and of a size the node can afford to read?

pynetdicom hands the handler a data set decoded leniently: pydicom reads explicit VR bytes sent on an
implicit VR context (it guesses, and warns), keeps a last element shorter than its declared length, and
inflates a Deflated Explicit VR data set whole before anyone looks at it (a 3 MB deflate bomb took the
node to 1.8 GB). Stored as received, such a file is what its File Meta says it is not: readers that
trust the transfer syntax (DCMTK, the PACS the results go to) fail on it later. These checks run on the
bytes before the data set is used, each answering "cannot understand" (0xC000) with what is wrong.
"""

from __future__ import annotations

import io
import zlib

from pydicom import Dataset
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.filereader import read_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

#: A deflated data set may inflate to at most this many times its size, and never beyond the cap: real
#: data sets deflate 2-10 fold; a bomb a thousand fold.
MAX_INFLATE_RATIO = 20
MAX_INFLATED_BYTES = 1 << 30
_UNDEFINED = 0xFFFFFFFF
_VRS = {
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB", b"OD", b"OF",
    b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI", b"UL", b"UN",
    b"UR", b"US", b"UT", b"UV",
}  # fmt: skip


class EncodingProblem(ValueError):
    """The data set's bytes are not what the negotiated transfer syntax says; the message says how."""


def inflate(deflated: bytes | memoryview) -> bytes:
    """A Deflated Explicit VR data set's bytes, inflated within :data:`MAX_INFLATE_RATIO` and the cap."""
    limit = min(MAX_INFLATED_BYTES, max(1 << 20, MAX_INFLATE_RATIO * len(deflated)))
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # PS3.5 A.5: raw deflate, no zlib header
    try:
        inflated = inflater.decompress(bytes(deflated), limit)
    except zlib.error as exc:
        raise EncodingProblem(f"deflated data set cannot be inflated ({exc})") from None
    if inflater.unconsumed_tail:
        raise EncodingProblem(f"deflated data set inflates beyond {limit} bytes ({len(deflated)} sent)")
    return inflated


def _looks_explicit(data: bytes) -> bool:
    """The first element has a VR where explicit VR puts one (bytes 4-5), as PS3.5 7.1.2 lays it out."""
    return len(data) >= 8 and data[4:6] in _VRS


def decode(encoded: bytes | memoryview, transfer_syntax_uid: str) -> Dataset:
    """The data set of a C-STORE, decoded as its presentation context's transfer syntax says it is encoded.

    Raises
    ------
    EncodingProblem
        Bytes of another encoding than negotiated (explicit VR on an implicit context or the reverse), a
        deflated data set that inflates beyond the limit, or an element shorter than its declared length.
    """
    syntax = UID(transfer_syntax_uid)
    data = inflate(encoded) if syntax == DeflatedExplicitVRLittleEndian else bytes(encoded)
    implicit = syntax.is_implicit_VR
    if data and _looks_explicit(data) == implicit:
        # Implicit VR data never has a VR there... except by chance; so look twice: the tag's own VR.
        tag = int.from_bytes(data[0:2], "little") << 16 | int.from_bytes(data[2:4], "little")
        try:
            own_vr = dictionary_VR(tag).encode()
        except KeyError:
            own_vr = b""
        if implicit and data[4:6] == own_vr or not implicit:
            said = "explicit" if implicit else "implicit"
            raise EncodingProblem(f"data set encoded in {said} VR, but the presentation context is {syntax.name}")
    ds = read_dataset(io.BytesIO(data), implicit, syntax.is_little_endian)
    last = ds._dict[max(ds._dict)] if ds._dict else None
    if isinstance(last, RawDataElement) and last.length != _UNDEFINED and last.value_tell + last.length < len(data):
        # pydicom reads bytes too few for an element's header, and drops them quietly.
        left = len(data) - last.value_tell - last.length
        raise EncodingProblem(f"the data set ends inside an element header ({left} bytes after the last element)")
    for tag, element in ds._dict.items():
        if isinstance(element, RawDataElement) and element.length != _UNDEFINED and element.value is not None:
            if len(element.value) < element.length:
                raise EncodingProblem(
                    f"element ({tag.group:04X},{tag.element:04X}) declares {element.length} bytes,"
                    f" {len(element.value)} present: the data set is truncated"
                )
    return ds
