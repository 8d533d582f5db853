"""TID 1500 Measurement Reports in Comprehensive 3D SR objects, with highdicom, as IHE AIR asks.

One report per pipeline run:

- segmentation: per segment a volumetric ROI group (TID 1411) that references the SEG segment, with
  its volume (mL) and, on CT, its mean attenuation (HU); and a planar ROI group (TID 1410) whose
  SCOORD polyline outlines the segment on its largest slice, with that outline's area. OHIF v3 shows
  only TID 1500 content that has coordinates, hence the planar groups.
- classification: an image-level group (TID 1501) with the finding present/absent at the model's
  threshold; a planar ROI around the heat map's hot spot with the same verdict and the probability.
- SVM: an image-level group with the density category as a coded evaluation; a planar ROI outlining
  the breast region with the category and every feature the SVM computed there, and the probability.

The groups of one structure or finding share its Tracking UID, so viewers join them; OHIF 3 shows
the numbers of the group with coordinates, and cannot load a coordinate-less group left alone.

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
from pipelines.volume import SourceFrame

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
    return hd.sr.FindingSite(anatomic_location=segment.property_type, laterality=segment.laterality)


def _segment_groups(
    result: SegmentationResult,
    segment: SegmentDefinition,
    stats: SegmentStatistics,
    seg: Dataset,
    uids: ResultUids,
) -> list[Group]:
    volume = result.volume
    algorithm = sr_algorithm_id(result.model)
    measurements = [
        hd.sr.Measurement(
            name=c.VOLUME,
            value=round(stats.volume_ml, 3),
            unit=ucum("ml"),
            method=codes.DCM.SumOfSegmentedVoxelMethodForVolume,
            algorithm_id=algorithm,
        )
    ]
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
            tracking_identifier=hd.sr.TrackingIdentifier(uid=uids.tracking(segment.number), identifier=segment.label),
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
            measurements=measurements,
        )
    ]
    if len(stats.outline_rc) >= 2:
        pixels = int((result.labelmap[stats.largest_slice_index] == segment.number).sum())
        area_mm2 = pixels * float(volume.spacing_mm[1]) * float(volume.spacing_mm[2])
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    # The same Tracking UID as the volumetric group and the SEG segment: one tracked structure.
                    # Viewers join groups by it (OHIF 3 shows volume and HU on the outline, and cannot load
                    # a group without coordinates that no planar group shares a UID with).
                    uid=uids.tracking(segment.number),
                    identifier=f"{segment.label} (largest slice)",
                ),
                referenced_region=_polyline(stats.outline_rc, volume.source_frames[stats.largest_slice_index]),
                finding_category=segment.category,
                finding_type=segment.property_type,
                finding_sites=[_finding_site(segment)],
                algorithm_id=algorithm,
                measurements=[
                    hd.sr.Measurement(name=c.AREA, value=round(area_mm2, 1), unit=ucum("mm2"), algorithm_id=algorithm)
                ],
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

    def probability() -> hd.sr.Measurement:
        return hd.sr.Measurement(
            name=c.PROBABILITY, value=round(result.probability, 4), unit=ucum("1"), algorithm_id=algorithm
        )

    return [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=uids.tracking(0, "image"), identifier=result.finding.meaning
            ),
            finding_type=result.finding,
            algorithm_id=algorithm,
            qualitative_evaluations=[verdict],
            source_images=[_group_source(frame)],
        ),
        # The probability goes with the hot spot: viewers show the numbers of the group with coordinates.
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=uids.tracking(0, "image"), identifier=f"{result.finding.meaning}: heat map hot spot"
            ),
            referenced_region=_polyline(_box(result.hotspot_box_rc), frame),
            finding_type=result.finding,
            algorithm_id=algorithm,
            qualitative_evaluations=[verdict],
            measurements=[probability()],
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
    groups: list[Group] = [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=uids.tracking(0, "image"), identifier=f"Breast composition {result.category}"
            ),
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
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=uids.tracking(0, "image"), identifier=f"Breast region (composition {result.category})"
                ),
                referenced_region=_polyline(result.breast_outline_rc, frame),
                finding_type=c.BREAST_COMPOSITION,
                algorithm_id=algorithm,
                qualitative_evaluations=[verdict],
                measurements=measurements,
            )
        )
    return groups


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
