"""node/receive/filemeta.py: a received file's header, byte for byte what pydicom writes for pynetdicom's File Meta."""

from __future__ import annotations

import io

import pytest
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_file_meta_info
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.presentation import build_context

from node.receive.filemeta import FileMetaEncoder

CT, MR, SEG = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.66.4"


def _pynetdicoms(sop_class: str, sop_instance: str, syntax: str) -> bytes:
    """The header as the node wrote it before: pynetdicom's ``Event.file_meta``, written by pydicom."""
    request = C_STORE()
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = sop_class, sop_instance
    context = build_context(sop_class, syntax)
    context.context_id = 1
    event = Event(None, evt.EVT_C_STORE, {"request": request, "context": context.as_tuple})  # type: ignore[arg-type]
    out = io.BytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(DicomFileLike(out), event.file_meta, enforce_standard=True)
    return out.getvalue()


@pytest.mark.parametrize(
    ("sop_class", "syntax"),
    [
        (CT, "1.2.840.10008.1.2"),  # implicit VR: the File Meta Information is explicit VR all the same
        (CT, "1.2.840.10008.1.2.1"),
        (MR, "1.2.840.10008.1.2.4.50"),  # odd length: padded
        (SEG, "1.2.840.10008.1.2.1.99"),
    ],
)
def test_the_header_is_what_pydicom_writes_for_pynetdicoms_file_meta(sop_class: str, syntax: str):
    encoder = FileMetaEncoder()
    # UIDs of odd and even length, short and of the full 64 characters, one after the other (the kept pieces reused).
    for instance in ("1.2.3", "1.2.34", "2.25." + "1" * 59, "1.2.826.0.1.3680043.8.498.1" + "0" * 36):
        assert encoder.header(sop_class, instance, syntax) == _pynetdicoms(sop_class, instance, syntax)


def test_many_classes_and_syntaxes_keep_little():
    encoder = FileMetaEncoder()
    for n in range(1000):  # a sender of arbitrary classes: encoded each time past the bound, never kept all
        assert encoder.header(f"1.2.3.{n}", "1.2.3.4", "1.2.840.10008.1.2") == _pynetdicoms(
            f"1.2.3.{n}", "1.2.3.4", "1.2.840.10008.1.2"
        )
    assert len(encoder._kept) <= 256
