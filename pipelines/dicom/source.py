"""Source headers as the writers need them: ordered like the volume, copied, what results inherit made valid.

The writers copy the patient, study and equipment attributes of a source into every result as they are.
Real scanners omit Type 2 attributes that the result IODs must contain (and that highdicom reads
unconditionally), and archives and anonymisers leave broken values; :mod:`pipelines.dicom.inherit`
cleans them. We fix up *copies* without Pixel Data: the caller's datasets are never modified, and
copying headers only keeps a 300-slice series cheap.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Sequence

from pydicom.dataset import Dataset
from pydicom.tag import Tag

from pipelines.dicom.inherit import Repair, clean_inherited
from pipelines.volume import Volume

logger = logging.getLogger(__name__)

_BULK = {Tag("PixelData"), Tag("FloatPixelData"), Tag("DoubleFloatPixelData")}


def _cleaned_copy(ds: Dataset) -> tuple[Dataset, list[Repair]]:
    # The elements themselves are shared, not copied (a deep copy of 300 CT headers takes most of a second):
    # the cleaning replaces elements of the copy and never modifies one, so ``ds`` stays as it is.
    out = Dataset({tag: elem for tag, elem in ds.items() if tag not in _BULK})
    if hasattr(ds, "file_meta"):
        out.file_meta = copy.copy(ds.file_meta)
    repairs = clean_inherited(out)
    # Frame of Reference (PS3.3 C.7.4.1): Position Reference Indicator is Type 2, and scanners omit it.
    if "FrameOfReferenceUID" in out and "PositionReferenceIndicator" not in out:
        out.PositionReferenceIndicator = ""
    return out, repairs


def _log(repairs: Counter[Repair], of: int) -> None:
    # DEBUG, and never a value: the values are the patient's.
    for repair, count in repairs.items():
        logger.debug("from the source: %s%s", repair, f" (in {count} of {of} instances)" if of > 1 else "")


def header_copy(ds: Dataset) -> Dataset:
    """A new dataset with the elements of ``ds`` but its pixel data and private elements, and what a result
    inherits from it made valid (:func:`pipelines.dicom.inherit.clean_inherited`; each repair logged at DEBUG).

    Raises
    ------
    ValueError
        ``ds`` has no valid Study Instance UID.
    """
    out, repairs = _cleaned_copy(ds)
    _log(Counter(repairs), 1)
    return out


def ordered_sources(volume: Volume, datasets: Sequence[Dataset]) -> list[Dataset]:
    """Header copies (:func:`header_copy`) of the distinct source instances, in the order of the volume's first use
    of each; a repair made in many instances is logged once.

    Raises
    ------
    ValueError
        A slice of the volume names an instance that is not among ``datasets``, or an instance has no valid
        Study Instance UID.
    """
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    seen: dict[str, Dataset] = {}
    repairs: Counter[Repair] = Counter()
    for frame in volume.source_frames:
        uid = str(frame.sop_instance_uid)
        if uid not in by_uid:
            raise ValueError(f"source_datasets lack the instance {uid} that the volume was built from")
        if uid not in seen:
            seen[uid], own = _cleaned_copy(by_uid[uid])
            repairs.update(own)
    _log(repairs, len(seen))
    return list(seen.values())
