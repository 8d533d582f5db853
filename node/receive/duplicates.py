"""A SOP Instance UID received again: the same instance re-sent, a changed instance, or a UID that moved.

A SOP Instance UID names one instance for ever (PS3.5 9.1). Senders still re-send (a PACS's "send to
AI" twice), re-send after an edit (new pixels, corrected attributes), or reuse a UID in another study
(broken anonymisers, test tools). Before, the same UID in another study was filed under the new study
while the database row still pointed to the old one, and a changed instance overwrote the file.

What the node does, as Orthanc does (its ``OverwriteInstances``), chosen by ``node.duplicates``:

- the same bytes again: success, nothing written (idempotent);
- changed content in the same study and series: ``keep-first`` (default) keeps the stored instance,
  ``replace`` stores the new one (a processed study then gets a new version, as for a late instance);
  either way the C-STORE succeeds and the audit says what differed;
- the UID in another study, series or patient: refused with 0xA900 "SOP Instance UID already stored
  in another study" (or series, or patient), audited; the stored instance stays as it is.

What differed is named by attribute keywords, the transfer syntax and "pixel data": never by values.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Literal

from pydicom import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from node.receive.encoding import inflate

DuplicatePolicy = Literal["keep-first", "replace"]

#: At most this many attribute keywords are named in an audit detail; the rest are counted.
_NAMED = 8
_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}


@dataclass(frozen=True)
class StoredInstance:
    """What the database knows of an instance already kept under a SOP Instance UID."""

    relpath: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str | None
    transfer_syntax_uid: str


class Verdict(str, Enum):
    IDENTICAL = "identical"
    KEEP_FIRST = "kept-first"
    REPLACE = "replaced"
    MOVED = "moved"


@dataclass(frozen=True)
class DuplicateDecision:
    verdict: Verdict
    #: For the audit and the C-STORE Error Comment: what differed, or where the UID is already kept.
    detail: str


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _dataset_bytes_of(path: Path) -> bytes:
    """The dataset bytes of a spool file, after its preamble and File Meta Information (as they were received)."""
    data = path.read_bytes()
    if data[128:132] != b"DICM":
        raise OSError(f"{path.name} is not a DICOM file")
    # (0002,0000) File Meta Information Group Length, explicit VR UL, right after "DICM": bytes after it.
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length :]


def _read(data: bytes | memoryview, transfer_syntax_uid: str) -> Dataset:
    syntax = UID(transfer_syntax_uid)
    if syntax == DeflatedExplicitVRLittleEndian:
        data = inflate(data)
    fp = io.BytesIO(bytes(data))
    implicit = syntax.is_implicit_VR if syntax.is_transfer_syntax else False
    little = syntax.is_little_endian if syntax.is_transfer_syntax else True
    return read_dataset(fp, implicit, little)


def differences(stored: Dataset, received: Dataset) -> list[str]:
    """Keywords (or tags) of the attributes that differ between two versions of an instance, pixel data as one."""
    changed: list[str] = []
    pixels = False
    for tag in sorted(set(stored.keys()) | set(received.keys())):
        a, b = stored.get(tag), received.get(tag)
        if a is not None and b is not None and a.value == b.value:
            continue
        if int(tag) in _PIXEL_TAGS:
            pixels = True
            continue
        element = a if a is not None else b
        changed.append(element.keyword or f"({tag.group:04X},{tag.element:04X})")  # type: ignore[union-attr]
    out = ["pixel data"] if pixels else []
    return out + changed


def _describe(changed: list[str]) -> str:
    named = changed[:_NAMED]
    more = len(changed) - len(named)
    return ", ".join(named) + (f" and {more} more" if more > 0 else "")


def judge(
    stored: StoredInstance,
    stored_path: Path,
    *,
    study_instance_uid: str,
    series_instance_uid: str,
    patient_id: str | None,
    transfer_syntax_uid: str,
    encoded_dataset: bytes | memoryview,
    policy: DuplicatePolicy,
    stored_missing: bool = False,
) -> DuplicateDecision:
    """Decide what a C-STORE of an already kept SOP Instance UID does (see the module's docstring).

    ``stored_missing``: the caller found no file at the stored path (and may have written one there since).
    """
    if stored.study_instance_uid != study_instance_uid:
        return DuplicateDecision(Verdict.MOVED, "SOP Instance UID already stored in another study")
    if stored.series_instance_uid != series_instance_uid:
        return DuplicateDecision(Verdict.MOVED, "SOP Instance UID already stored in another series")
    if (stored.patient_id or "") != (patient_id or ""):
        return DuplicateDecision(Verdict.MOVED, "SOP Instance UID already stored for another patient")
    if stored_missing:
        return DuplicateDecision(Verdict.REPLACE, "the stored file was missing")
    try:
        kept = _dataset_bytes_of(stored_path)
    except OSError:
        # The stored file is gone (retention, an operator): the new one takes its place.
        return DuplicateDecision(Verdict.REPLACE, "the stored file was missing")
    if stored.transfer_syntax_uid == transfer_syntax_uid and _sha256(kept) == _sha256(encoded_dataset):
        return DuplicateDecision(Verdict.IDENTICAL, "identical")
    changed = differences(_read(kept, stored.transfer_syntax_uid), _read(encoded_dataset, transfer_syntax_uid))
    if stored.transfer_syntax_uid != transfer_syntax_uid:
        changed.insert(0, "transfer syntax")
    what = _describe(changed) or "encoding only"
    if policy == "replace":
        return DuplicateDecision(Verdict.REPLACE, f"replaced the stored instance; differed: {what}")
    return DuplicateDecision(Verdict.KEEP_FIRST, f"kept the stored instance (duplicates: keep-first); differed: {what}")
