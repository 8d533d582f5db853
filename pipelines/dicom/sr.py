"""TID 1500 Measurement Reports in Comprehensive 3D SR objects, with highdicom, as IHE AIR asks.

One report per pipeline run:

- segmentation: per segment a volumetric ROI group (TID 1411) that references the SEG segment, with
  its volume (mL) and, on CT, its mean attenuation (HU); and a planar ROI group (TID 1410) whose
  SCOORD polyline outlines the segment on its largest slice, with that outline's area. OHIF v3 shows
  only TID 1500 content that has coordinates, hence the planar groups. Lengths, areas and volumes are
  written only where the images state their pixel spacing: in pixel units they would be wrong numbers.
- classification: an image-level group (TID 1501) with the finding present/absent, the model's
  probability and the threshold it was compared with; a planar ROI around the heat map's hot spot with
  the same verdict.
- SVM: an image-level group with the density category as a coded evaluation; a planar ROI outlining
  the breast region with the category and every feature the SVM computed there, and the probability.

The groups of one structure or finding share its Tracking UID and its Tracking Identifier, so viewers
join them; OHIF 3 shows the numbers of all of them on the group with coordinates, and cannot load a
coordinate-less group left alone. A TID 1600 Image Library lists the source images, as dcmqi writes it.

The observer is the device (node, model name and version, device UID); "procedure reported" is the
imaging procedure of the source images, not the algorithm.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import SegmentationStorage

from pipelines.dicom import codes as c
from pipelines.dicom.air import Equipment, add_air_attributes, series_description, sr_algorithm_id
from pipelines.dicom.codes import ucum
from pipelines.dicom.uids import ResultUids
from pipelines.enums import ResultKind
from pipelines.results import (
    ClassificationResult,
    DensityResult,
    ModelIdentity,
    SegmentationResult,
    SegmentDefinition,
    SegmentStatistics,
)
from pipelines.volume import InPlaneSpacing, SourceFrame, Volume

#: One imaging-measurements group of TID 1500 (TID 1410, 1411 or 1501).
Group = (
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
)


def observation_context(equipment: Equipment, model: ModelIdentity) -> hd.sr.ObservationContext:
    """TID 1002 observer context: the node as a device, naming the model and its version."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=equipment.device_uid,
        name=(equipment.station_name or equipment.model_name)[:64],
        manufacturer_name=equipment.manufacturer[:64],
        model_name=f"{model.name} {model.version}"[:64],
        serial_number=equipment.serial_number[:64],
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def _source_image(frame: SourceFrame) -> hd.sr.SourceImageForRegion:
    return hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=str(frame.sop_class_uid),
        referenced_sop_instance_uid=str(frame.sop_instance_uid),
        referenced_frame_numbers=[frame.frame_number] if frame.frame_number is not None else None,
    )


def _group_source(frame: SourceFrame) -> hd.sr.SourceImageForMeasurementGroup:
    return hd.sr.SourceImageForMeasurementGroup(
        referenced_sop_class_uid=str(frame.sop_class_uid),
        referenced_sop_instance_uid=str(frame.sop_instance_uid),
        referenced_frame_numbers=[frame.frame_number] if frame.frame_number is not None else None,
    )


def _polyline(points_cr: np.ndarray, frame: SourceFrame) -> hd.sr.ImageRegion:
    """A closed SCOORD POLYLINE in image coordinates (column, row), (0, 0) the top-left pixel's corner."""
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.asarray(points_cr, dtype=float),
        source_image=_source_image(frame),
    )


def _finding_site(segment: SegmentDefinition) -> hd.sr.FindingSite:
    """TID 1419 Finding Site: "Right lung" (with its Laterality modifier "Right"), what OHIF shows on the outline."""
    return hd.sr.FindingSite(
        anatomic_location=c.finding_site(segment.property_type, segment.laterality), laterality=segment.laterality
    )


def _tracking(uid: str, identifier: str) -> hd.sr.TrackingIdentifier:
    # One Tracking Identifier per Tracking UID: the groups that share a UID are one tracked structure.
    return hd.sr.TrackingIdentifier(uid=uid, identifier=identifier)


def _segment_groups(
    result: SegmentationResult,
    segment: SegmentDefinition,
    stats: SegmentStatistics,
    seg: Dataset,
    uids: ResultUids,
) -> list[Group]:
    volume = result.volume
    algorithm = sr_algorithm_id(result.model)
    # Without a stated pixel spacing the voxel is "1 x 1 x slice gap": no volume in mL, no area in mm2.
    spacing_known = volume.in_plane_spacing.known
    measurements = []
    if spacing_known:
        measurements.append(
            hd.sr.Measurement(
                name=c.VOLUME,
                value=round(stats.volume_ml, 3),
                unit=ucum("ml"),
                method=codes.DCM.SumOfSegmentedVoxelMethodForVolume,
                algorithm_id=algorithm,
            )
        )
    if stats.intensity_unit == "[hnsf'U]":
        measurements.append(
            hd.sr.Measurement(
                name=c.ATTENUATION_COEFFICIENT,
                value=round(stats.mean_intensity, 1),
                unit=ucum("[hnsf'U]"),
                derivation=c.MEAN,
                algorithm_id=algorithm,
            )
        )
    groups: list[Group] = [
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(uids.tracking(segment.number), segment.label),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=SegmentationStorage,
                sop_instance_uid=str(seg.SOPInstanceUID),
                segment_number=segment.number,
                source_series=hd.sr.SourceSeriesForSegmentation(volume.series_instance_uid),
            ),
            finding_category=segment.category,
            finding_type=segment.property_type,
            finding_sites=[_finding_site(segment)],
            algorithm_id=algorithm,
            measurements=measurements or None,
        )
    ]
    if len(stats.outline_rc) >= 2:
        area = []
        if spacing_known:
            pixels = int((result.labelmap[stats.largest_slice_index] == segment.number).sum())
            area_mm2 = pixels * float(volume.spacing_mm[1]) * float(volume.spacing_mm[2])
            area = [hd.sr.Measurement(name=c.AREA, value=round(area_mm2, 1), unit=ucum("mm2"), algorithm_id=algorithm)]
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                # The same Tracking UID as the volumetric group and the SEG segment: one tracked structure.
                # Viewers join groups by it (OHIF 3 shows volume and HU on the outline, and cannot load
                # a group without coordinates that no planar group shares a UID with).
                tracking_identifier=_tracking(uids.tracking(segment.number), segment.label),
                # Image coordinates stay right without a pixel spacing: the outline is written either way.
                referenced_region=_polyline(stats.outline_rc, volume.source_frames[stats.largest_slice_index]),
                finding_category=segment.category,
                finding_type=segment.property_type,
                finding_sites=[_finding_site(segment)],
                algorithm_id=algorithm,
                measurements=area or None,
            )
        )
    return groups


def segmentation_groups(result: SegmentationResult, seg: Dataset, uids: ResultUids) -> list[Group]:
    by_number = {s.number: s for s in result.statistics}
    groups: list[Group] = []
    for segment in sorted(result.segments, key=lambda s: s.number):
        if segment.number in by_number:
            groups += _segment_groups(result, segment, by_number[segment.number], seg, uids)
    return groups


def _box(box: tuple[float, float, float, float]) -> np.ndarray:
    c0, r0, c1, r1 = box
    return np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]], dtype=float)


def classification_groups(result: ClassificationResult, uids: ResultUids) -> list[Group]:
    frame = result.volume.source_frames[0]
    algorithm = sr_algorithm_id(result.model)
    verdict = hd.sr.QualitativeEvaluation(name=result.finding, value=c.PRESENT if result.present else c.ABSENT)
    uid, identifier = uids.tracking(0, "image"), result.finding.meaning
    return [
        # The probability and the threshold belong to the finding, which is about the whole image; on the hot
        # spot the probability would read as the hot spot's own. OHIF joins this group to the box by the
        # shared Tracking UID and shows both numbers on the box, once.
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(uid, identifier),
            finding_type=result.finding,
            algorithm_id=algorithm,
            qualitative_evaluations=[verdict],
            measurements=[
                hd.sr.Measurement(
                    name=c.PROBABILITY, value=round(result.probability, 4), unit=ucum("1"), algorithm_id=algorithm
                ),
                hd.sr.Measurement(
                    name=c.THRESHOLD, value=round(result.threshold, 4), unit=ucum("1"), algorithm_id=algorithm
                ),
            ],
            source_images=[_group_source(frame)],
        ),
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(uid, identifier),
            referenced_region=_polyline(_box(result.hotspot_box_rc), frame),
            finding_type=result.finding,
            algorithm_id=algorithm,
            qualitative_evaluations=[verdict],
        ),
    ]


def density_groups(result: DensityResult, uids: ResultUids) -> list[Group]:
    frame = result.volume.source_frames[0]
    algorithm = sr_algorithm_id(result.model)
    verdict = hd.sr.QualitativeEvaluation(name=c.BREAST_COMPOSITION, value=result.category_code)
    measurements = [
        hd.sr.Measurement(name=f.concept, value=round(f.value, 4), unit=ucum(f.unit), algorithm_id=algorithm)
        for f in result.features
    ]
    measurements.append(
        hd.sr.Measurement(
            name=c.PROBABILITY,
            value=round(result.probabilities.get(result.category, 0.0), 4),
            unit=ucum("1"),
            algorithm_id=algorithm,
        )
    )
    # The features were computed inside the breast outline: they are that region's measurements. Without an
    # outline they go to the image-level group. Viewers show the numbers of the group with coordinates, and
    # join the groups by their shared Tracking UID.
    outlined = len(result.breast_outline_rc) >= 2
    uid, identifier = uids.tracking(0, "image"), f"Breast composition {result.category}"
    groups: list[Group] = [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(uid, identifier),
            finding_type=c.BREAST_COMPOSITION,
            algorithm_id=algorithm,
            qualitative_evaluations=[verdict],
            measurements=None if outlined else measurements,
            source_images=[_group_source(frame)],
        )
    ]
    if outlined:
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=_tracking(uid, identifier),
                referenced_region=_polyline(result.breast_outline_rc, frame),
                finding_type=c.BREAST_COMPOSITION,
                algorithm_id=algorithm,
                qualitative_evaluations=[verdict],
                measurements=measurements,
            )
        )
    return groups


def image_library(sources: Sequence[Dataset], volume: Volume) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library of the source series: one group, its common descriptors, one entry per instance.

    dcmqi (DCMTK's TID1600_ImageLibrary) writes the library too. highdicom's own ``ImageLibrary`` needs Pixel
    Spacing, Slice Thickness and Image Position at the top level (absent in an enhanced CT, where they are in
    functional groups) and Imager Pixel Spacing on every radiograph, and would write a spacing we do not know.
    """
    context = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
    descriptors: list[hd.sr.ContentItem] = []  # TID 1602, shared by the group
    modality = c.acquisition_modality(volume.modality)
    if modality is not None:
        descriptors.append(hd.sr.CodeContentItem(name=codes.DCM.Modality, value=modality, relationship_type=context))
    if volume.frame_of_reference_uid:
        descriptors.append(
            hd.sr.UIDRefContentItem(
                name=codes.DCM.FrameOfReferenceUID, value=volume.frame_of_reference_uid, relationship_type=context
            )
        )
    rows, columns = volume.pixels.shape[1:]
    descriptors += [
        hd.sr.NumContentItem(
            name=codes.DCM.PixelDataRows, value=rows, unit=ucum("{pixels}"), relationship_type=context
        ),
        hd.sr.NumContentItem(
            name=codes.DCM.PixelDataColumns, value=columns, unit=ucum("{pixels}"), relationship_type=context
        ),
    ]
    if volume.in_plane_spacing is InPlaneSpacing.PATIENT:
        # Only a spacing in the patient (TID 1604); one at the detector would need its magnification stated.
        for name, spacing in ((codes.DCM.HorizontalPixelSpacing, volume.spacing_mm[2]),
                              (codes.DCM.VerticalPixelSpacing, volume.spacing_mm[1])):  # fmt: skip
            descriptors.append(
                hd.sr.NumContentItem(name=name, value=float(spacing), unit=ucum("mm"), relationship_type=context)
            )
    group = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibraryGroup, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    group.ContentSequence = hd.sr.ContentSequence(descriptors)
    for source in sources:
        group.ContentSequence.append(
            hd.sr.ImageContentItem(
                name=c.IMAGE_LIBRARY_ENTRY,
                referenced_sop_class_uid=str(source.SOPClassUID),
                referenced_sop_instance_uid=str(source.SOPInstanceUID),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    library = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibrary, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


def _what(result: SegmentationResult | ClassificationResult | DensityResult) -> str:
    """Series Description words: "lung measurements" in "AI lung measurements (lung-seg 1.0.0)"."""
    if isinstance(result, SegmentationResult):
        meanings = {s.property_type.meaning.lower() for s in result.segments}
        return f"{meanings.pop() if len(meanings) == 1 else 'segmentation'} measurements"
    if isinstance(result, ClassificationResult):
        return f"{result.finding.meaning.lower()} classification"
    return "breast density"


def make_report(
    result: SegmentationResult | ClassificationResult | DensityResult,
    sources: Sequence[Dataset],
    equipment: Equipment,
    uids: ResultUids,
    *,
    seg: Dataset | None = None,
    series_number: int,
    source_label: str = "",
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 report of one result, as a Comprehensive 3D SR in the source study.

    Parameters
    ----------
    sources
        Header copies of the source instances (:func:`pipelines.dicom.source.ordered_sources`); they become
        the SR's evidence, together with ``seg``.
    seg
        The DICOM-SEG a segmentation report refers to (required for a :class:`SegmentationResult`).
    """
    if isinstance(result, SegmentationResult):
        if seg is None:
            raise ValueError("seg: a segmentation report refers to its DICOM-SEG; none was given")
        groups = segmentation_groups(result, seg, uids)
    elif isinstance(result, ClassificationResult):
        groups = classification_groups(result, uids)
    elif isinstance(result, DensityResult):
        groups = density_groups(result, uids)
    else:
        raise TypeError(f"result: no TID 1500 report for {type(result).__name__}")
    report = hd.sr.MeasurementReport(
        observation_context=observation_context(equipment, result.model),
        procedure_reported=c.procedure_reported(sources[0]),
        imaging_measurements=groups,
    )
    # TID 1500 row 6: the Image Library comes before the Imaging Measurements.
    content = report[0].ContentSequence
    measurements_at = next(i for i, item in enumerate(content) if item.name == codes.DCM.ImagingMeasurements)
    content.insert(measurements_at, image_library(sources, result.volume))
    evidence = [*sources, *([seg] if seg is not None else [])]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=uids.series(ResultKind.SR),
        series_number=series_number,
        sop_instance_uid=uids.instance(ResultKind.SR),
        instance_number=1,
        manufacturer=equipment.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=equipment.institution_name,
        series_description=series_description(_what(result), result.model, source_label),
        manufacturer_model_name=equipment.model_name,
        software_versions=equipment.software_versions,
        device_serial_number=equipment.serial_number,
    )
    add_air_attributes(sr, equipment, result.model)
    return sr
