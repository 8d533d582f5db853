"""DICOM-SEG (binary) from a :class:`~pipelines.results.SegmentationResult`, with highdicom."""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from pipelines.dicom.air import Equipment, add_air_attributes, algorithm_identification, series_description
from pipelines.dicom.colours import segment_cielab
from pipelines.results import SegmentationResult


def segment_descriptions(result: SegmentationResult, tracking_uids: dict[int, str]) -> list[hd.seg.SegmentDescription]:
    """One Segment Sequence item per label: SNOMED category and type (+ laterality modifier), algorithm, colour.

    The recommended display colour is the colour the Secondary Capture burns in, so that a segment looks the
    same in a viewer that shows the SEG as in one that shows only the SC.
    """
    algorithm = algorithm_identification(result.model)
    out = []
    for segment in sorted(result.segments, key=lambda s: s.number):
        description = hd.seg.SegmentDescription(
            segment_number=segment.number,
            segment_label=segment.label[:64],
            segmented_property_category=segment.category,
            segmented_property_type=segment.property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=tracking_uids[segment.number],
            tracking_id=segment.label[:64],
            display_color=segment_cielab(segment.number),
        )
        if segment.laterality is not None:
            # PS3.3 C.8.20.2: the modifier is nested in the Segmented Property Type Code Sequence item.
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept.from_code(segment.laterality)
            ]
        out.append(description)
    return out


def seg_pixel_array(result: SegmentationResult, sources: list[Dataset]) -> np.ndarray:
    """The label map arranged like ``sources``: one frame per single-frame instance, or per frame of one instance."""
    frames = result.volume.source_frames
    if len(sources) == len(frames):
        return result.labelmap
    if len(sources) == 1 and all(f.frame_number is not None for f in frames):
        n = int(sources[0].get("NumberOfFrames", len(frames)))
        out = np.zeros((n, *result.labelmap.shape[1:]), dtype=result.labelmap.dtype)
        for index, frame in enumerate(frames):
            out[int(frame.frame_number) - 1] = result.labelmap[index]  # type: ignore[arg-type]
        return out
    raise ValueError("a SEG references single-frame instances or exactly one multi-frame instance")


def make_segmentation(
    result: SegmentationResult,
    sources: list[Dataset],
    equipment: Equipment,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    source_label: str = "",
    tracking_uids: dict[int, str],
    omit_empty_frames: bool = False,
) -> hd.seg.Segmentation:
    """Binary DICOM-SEG of every segment, in the source study, referencing the source series' instances.

    Parameters
    ----------
    sources
        Header copies of the source instances in volume order (:func:`pipelines.dicom.source.ordered_sources`).
    omit_empty_frames
        Leave out frames without any segment pixel. Off by default: OHIF misplaces segments of a SEG whose
        empty frames were omitted.
    """
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=seg_pixel_array(result, sources),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(result, tracking_uids),
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=equipment.manufacturer,
        manufacturer_model_name=equipment.model_name,
        software_versions=equipment.software_versions,
        device_serial_number=equipment.serial_number,
        omit_empty_frames=omit_empty_frames,
        series_description=series_description(f"{_task_word(result)} segmentation", result.model, source_label),
        content_label="AI_SEGMENTATION",
        content_description=f"{result.model.name} {result.model.version}"[:64],
    )
    add_air_attributes(seg, equipment, result.model)
    _fix_dimension_organization_uid(seg, sop_instance_uid)
    return seg


def _fix_dimension_organization_uid(seg: Dataset, sop_instance_uid: str) -> None:
    """Derive the Dimension Organization UID from the SEG's own UID (highdicom makes a random one).

    The same result made again (a re-run, or a study analysed while it arrived) is then the same object in
    every attribute but its creation date and time, as its SOP Instance UID already says (invariant 3).
    """
    uid = generate_uid(entropy_srcs=["dicom-ai-node dimension organization", sop_instance_uid])
    for item in (*seg.get("DimensionOrganizationSequence", []), *seg.get("DimensionIndexSequence", [])):
        if "DimensionOrganizationUID" in item:
            item.DimensionOrganizationUID = uid


def _task_word(result: SegmentationResult) -> str:
    """A short anatomical word for the series description: "lung" when all segments are lungs."""
    meanings = {s.property_type.meaning.lower() for s in result.segments}
    return meanings.pop() if len(meanings) == 1 else "multi-structure"
