"""Source headers as the writers need them: ordered like the volume, copied, Type 2 attributes present.

Real scanners omit Type 2 attributes (Patient's Birth Date, Referring Physician's Name, Study ID,
Accession Number, ...) that the result IODs must contain, and highdicom reads them unconditionally.
We fix up *copies* without Pixel Data: the caller's datasets are never modified, and copying headers
only keeps a 300-slice series cheap.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from pydicom.dataset import Dataset
from pydicom.tag import Tag

from pipelines.volume import Volume

#: Type 2 attributes of the Patient, General Study and General Equipment modules (empty value allowed).
TYPE2_DEFAULTS: dict[str, object] = {
    "PatientName": "",
    "PatientID": "",
    "PatientBirthDate": "",
    "PatientSex": "",
    "StudyDate": "",
    "StudyTime": "",
    "ReferringPhysicianName": "",
    "StudyID": "",
    "AccessionNumber": "",
    "Manufacturer": "",
}

_BULK = {Tag("PixelData"), Tag("FloatPixelData"), Tag("DoubleFloatPixelData")}


def header_copy(ds: Dataset) -> Dataset:
    """A new dataset with the elements of ``ds`` but its pixel data, and the Type 2 attributes added when absent.

    The elements themselves are shared, not copied (a deep copy of 300 CT headers takes most of a second):
    adding or removing elements of the copy leaves ``ds`` as it is, and the writers only read them.
    """
    out = Dataset({tag: elem for tag, elem in ds.items() if tag not in _BULK})
    if hasattr(ds, "file_meta"):
        out.file_meta = copy.copy(ds.file_meta)
    for keyword, default in TYPE2_DEFAULTS.items():
        if keyword not in out:
            setattr(out, keyword, default)
    if "FrameOfReferenceUID" in out and "PositionReferenceIndicator" not in out:
        out.PositionReferenceIndicator = ""
    return out


def ordered_sources(volume: Volume, datasets: Sequence[Dataset]) -> list[Dataset]:
    """Header copies of the distinct source instances, in the order of the volume's first use of each.

    Raises
    ------
    ValueError
        A slice of the volume names an instance that is not among ``datasets``.
    """
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    seen: dict[str, Dataset] = {}
    for frame in volume.source_frames:
        uid = str(frame.sop_instance_uid)
        if uid not in by_uid:
            raise ValueError(f"source_datasets lack the instance {uid} that the volume was built from")
        if uid not in seen:
            seen[uid] = header_copy(by_uid[uid])
    return list(seen.values())
