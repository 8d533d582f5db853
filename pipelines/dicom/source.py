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
import math
from collections import Counter
from collections.abc import Sequence

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

from pipelines.dicom.inherit import Repair, RepairAction, clean_inherited, drop_private, inherited_key, key_tags
from pipelines.volume import Volume

logger = logging.getLogger(__name__)

_BULK = {Tag("PixelData"), Tag("FloatPixelData"), Tag("DoubleFloatPixelData")}


#: A cleaning of what results inherit, to reuse for the other instances of a series: the elements of
#: :func:`~pipelines.dicom.inherit.key_tags` it left (by tag) and its repairs.
_Cleaning = tuple[dict[BaseTag, DataElement | RawDataElement], list[Repair]]


def _cleaned_copy(ds: Dataset, memo: dict[tuple[object, ...], _Cleaning] | None = None) -> tuple[Dataset, list[Repair]]:
    # The elements themselves are shared, not copied (a deep copy of 300 CT headers takes most of a second):
    # the cleaning replaces elements of the copy and never modifies one, so ``ds`` stays as it is.
    out = Dataset({tag: elem for tag, elem in ds.items() if tag not in _BULK})
    repairs = drop_private(out)
    key = inherited_key(out) if memo is not None else ()
    done = memo.get(key) if memo is not None else None
    if done is not None:
        # The instances of a series inherit the same values, so they are cleaned alike: the first one's
        # cleaning is reused (cleaning takes a third of a second per 100 CT headers).
        kept, same = done
        for tag in key_tags():
            if tag in kept:
                out[tag] = kept[tag]
            elif tag in out:
                del out[tag]
        repairs += same
    else:
        cleaned = clean_inherited(out)
        repairs += cleaned
        if memo is not None and all(r.action is not RepairAction.RE_ENCODED for r in cleaned):
            # Re-encoding rewrites every text element of the dataset, not only the inherited ones: not reused.
            present = out.keys()
            memo[key] = ({t: out.get_item(t) for t in key_tags() if t in present}, cleaned)
    if hasattr(ds, "file_meta"):
        out.file_meta = copy.copy(ds.file_meta)
    repairs += _clean_image_numbers(out)
    # Frame of Reference (PS3.3 C.7.4.1): Position Reference Indicator is Type 2, and scanners omit it.
    if "FrameOfReferenceUID" in out and "PositionReferenceIndicator" not in out:
        out.PositionReferenceIndicator = ""
    return out, repairs


#: Image attributes the SEG writer reads from its sources (Pixel Measures): a value that is not a
#: positive number ("8 mm") stopped the SEG. The volume's own geometry comes from positions and spacing.
_OPTIONAL_IMAGE_NUMBERS = ("SliceThickness", "SpacingBetweenSlices")


def _clean_image_numbers(ds: Dataset) -> list[Repair]:
    repairs = []
    for keyword in _OPTIONAL_IMAGE_NUMBERS:
        if keyword not in ds:
            continue
        try:
            value = float(ds[keyword].value)
            valid = math.isfinite(value) and value > 0
        except (TypeError, ValueError, OverflowError):
            valid = False
        if not valid:
            # Emptied, not removed: Slice Thickness is Type 2 in the CT Image module and the SEG writer reads it.
            ds[keyword] = DataElement(Tag(keyword), "DS", None)
            repairs.append(Repair(keyword, RepairAction.EMPTIED, "not a positive number"))
    return repairs


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
    memo: dict[tuple[object, ...], _Cleaning] = {}
    for frame in volume.source_frames:
        uid = str(frame.sop_instance_uid)
        if uid not in by_uid:
            raise ValueError(f"source_datasets lack the instance {uid} that the volume was built from")
        if uid not in seen:
            seen[uid], own = _cleaned_copy(by_uid[uid], memo)
            repairs.update(own)
            copied = seen[uid]
            if "SliceThickness" in copied and copied.SliceThickness in (None, "") and volume.in_plane_spacing.known:
                # The SEG's Pixel Measures need a thickness (Type 1C): that of its own voxels, the slice step.
                # A new element: the copy shares its elements with the source, which stays as it is.
                step = round(float(volume.spacing_mm[0]), 6)
                copied[Tag("SliceThickness")] = DataElement(Tag("SliceThickness"), "DS", step)
                repairs[Repair("SliceThickness", RepairAction.NORMALISED, "set to the spacing between slices")] += 1
    _log(repairs, len(seen))
    return list(seen.values())
