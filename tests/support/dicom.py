"""Pipeline results and small images built by hand, for the DICOM writer and node tests (no ONNX model).

The writers only need the contract of :mod:`pipelines.results` and :mod:`pipelines.volume`; these
helpers make such results from the real CT (a threshold "lung segmentation") and from small
synthetic CR and MG images, so the writer tests do not depend on the models or on the loader.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage as ndi

from pipelines.dicom import Equipment
from pipelines.results import (
    ClassificationResult,
    DensityResult,
    Feature,
    ModelIdentity,
    SegmentationResult,
    SegmentDefinition,
)
from pipelines.segmentation import segment_statistics
from pipelines.volume import SourceFrame, Volume

#: The node as the result writers' equipment, in tests that call the writers directly.
EQUIPMENT = Equipment(
    manufacturer="dicom-ai-node",
    model_name="dicom-ai-node",
    software_versions="0.1.0",
    device_uid="1.2.826.0.1.3680043.8.498.424242",
    station_name="AINODE",
    institution_name="Test Hospital",
)


def load_ct_series(series_dir: Path) -> list[Dataset]:
    """The instances of one CT series folder, in file order (deliberately not sorted)."""
    return [pydicom.dcmread(p) for p in sorted(series_dir.glob("*.dcm"))]


def volume_from_slices(datasets: list[Dataset]) -> Volume:
    """A :class:`Volume` of single-frame slices sorted along the slice normal, pixels in modality units."""
    first = datasets[0]
    iop = np.asarray(first.ImageOrientationPatient, dtype=float)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    ordered = sorted(datasets, key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))
    pixels = np.stack(
        [
            ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
            for ds in ordered
        ]
    )
    positions = [np.asarray(ds.ImagePositionPatient, float) for ds in ordered]
    between = float(np.dot(normal, positions[1] - positions[0])) if len(ordered) > 1 else 1.0
    return Volume(
        pixels=pixels,
        origin_mm=positions[0],
        spacing_mm=(between, float(first.PixelSpacing[0]), float(first.PixelSpacing[1])),
        row_direction=row_dir,
        column_direction=col_dir,
        slice_direction=normal,
        source_frames=[SourceFrame(ds.SOPClassUID, ds.SOPInstanceUID) for ds in ordered],
        study_instance_uid=first.StudyInstanceUID,
        series_instance_uid=first.SeriesInstanceUID,
        frame_of_reference_uid=first.get("FrameOfReferenceUID"),
        modality=first.Modality,
    )


RIGHT_LUNG = SegmentDefinition(1, "Right lung", codes.SCT.AnatomicalStructure, codes.SCT.Lung, codes.SCT.Right)
LEFT_LUNG = SegmentDefinition(2, "Left lung", codes.SCT.AnatomicalStructure, codes.SCT.Lung, codes.SCT.Left)


def threshold_lungs(volume: Volume) -> np.ndarray:
    """Label map of air inside the body (HU < -400), split at the midline into right (1) and left (2) lung."""
    hu = volume.pixels
    body = np.stack([ndi.binary_fill_holes(s > -500) for s in hu])
    air = (hu < -400) & body
    air = ndi.binary_opening(air, iterations=2)
    labelmap = np.zeros(hu.shape, np.uint8)
    half = hu.shape[2] // 2
    # Row direction +x (patient left): columns left of the middle are the patient's right.
    labelmap[:, :, :half][air[:, :, :half]] = RIGHT_LUNG.number
    labelmap[:, :, half:][air[:, :, half:]] = LEFT_LUNG.number
    return labelmap


def lung_result(volume: Volume) -> SegmentationResult:
    labelmap = threshold_lungs(volume)
    segments = [RIGHT_LUNG, LEFT_LUNG]
    return SegmentationResult(
        model=ModelIdentity("lung-seg", "1.0"),
        volume=volume,
        labelmap=labelmap,
        segments=segments,
        statistics=[segment_statistics(volume, labelmap, s.number) for s in segments],
    )


def synthetic_image(
    modality: str,
    sop_class_uid: str,
    *,
    rows: int = 256,
    columns: int = 200,
    patient_id: str = "SYN-001",
    extra: dict[str, object] | None = None,
) -> Dataset:
    """A small single-frame 16-bit MONOCHROME2 image with patient/study headers, as a modality writes."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:rows, 0:columns]
    pixels = 800 + 600 * np.exp(-(((yy - rows * 0.4) / (rows / 5)) ** 2 + ((xx - columns * 0.6) / (columns / 6)) ** 2))
    pixels = (pixels + rng.normal(0, 20, pixels.shape)).clip(0, 4095).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = "Synthetic^Patient"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate = "20260101"
    ds.StudyTime = "101010"
    ds.StudyID = "S1"
    ds.AccessionNumber = "ACC1"
    ds.ReferringPhysicianName = ""
    ds.Modality = modality
    ds.Manufacturer = "Synthetic Vendor"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"] if modality != "MG" else ["A", "R"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    for key, value in (extra or {}).items():
        setattr(ds, key, value)
    return ds


def planar_volume(ds: Dataset, spacing_mm: float = 0.2) -> Volume:
    """A one-slice volume of a projection image (no patient geometry: identity orientation)."""
    return Volume(
        pixels=ds.pixel_array.astype(np.float32)[None],
        origin_mm=np.zeros(3),
        spacing_mm=(1.0, spacing_mm, spacing_mm),
        row_direction=np.array([1.0, 0, 0]),
        column_direction=np.array([0, 1.0, 0]),
        slice_direction=np.array([0, 0, 1.0]),
        source_frames=[SourceFrame(ds.SOPClassUID, ds.SOPInstanceUID)],
        study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID,
        frame_of_reference_uid=None,
        modality=ds.Modality,
    )


CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")


def chest_xray_source() -> Dataset:
    return synthetic_image("CR", CR_IMAGE_STORAGE, extra={"BodyPartExamined": "CHEST", "ViewPosition": "PA"})


def classification_result(ds: Dataset, probability: float = 0.83) -> ClassificationResult:
    volume = planar_volume(ds)
    rows, cols = volume.pixels.shape[1:]
    yy, xx = np.mgrid[0:rows, 0:cols]
    heatmap = np.exp(-(((yy - 100) / 30.0) ** 2 + ((xx - 120) / 25.0) ** 2)).astype(np.float32)
    hot = np.nonzero(heatmap >= 0.5)
    box = (float(hot[1].min()), float(hot[0].min()), float(hot[1].max() + 1), float(hot[0].max() + 1))
    return ClassificationResult(
        model=ModelIdentity("chest-xray-pneumonia", "0.3"),
        volume=volume,
        finding=PNEUMONIA,
        probability=probability,
        threshold=0.5,
        heatmap=heatmap,
        hotspot_box_rc=box,
    )


def mammogram_source() -> Dataset:
    return synthetic_image(
        "MG",
        MG_FOR_PRESENTATION,
        rows=240,
        columns=180,
        patient_id="SYN-MG-1",
        extra={
            "BodyPartExamined": "BREAST",
            "ImageLaterality": "L",
            "ViewPosition": "CC",
            "PresentationIntentType": "FOR PRESENTATION",
        },
    )


def density_result(ds: Dataset) -> DensityResult:
    local = "99AINODE"
    return DensityResult(
        model=ModelIdentity("breast-density", "1.0"),
        volume=planar_volume(ds, 0.1),
        category="B",
        category_code=Code("129717001", "SCT", "Scattered fibroglandular densities"),
        probabilities={"A": 0.1, "B": 0.7, "C": 0.15, "D": 0.05},
        features=[
            Feature("dense_fraction", Code("DENSE-FRACTION", local, "Fibroglandular tissue fraction"), 23.5, "%"),
            Feature("intensity_mean", Code("REL-MEAN", local, "Mean relative breast intensity"), 0.41, "1"),
            Feature("glcm_entropy", Code("GLCM-ENTROPY", local, "GLCM entropy"), 5.2, "bit"),
        ],
    )


def copy_as_other_patient(series_dirs: list[Path], out_dir: Path, patient_id: str, patient_name: str) -> str:
    """Copy CT series as another patient's study: new patient, study, series, frame and instance UIDs.

    Returns the new Study Instance UID. The pixels stay the same, so a result that lands on the wrong
    study can only be told apart by its identifiers — which is exactly what the tests check.
    """
    study_uid = generate_uid()
    frame_uid = generate_uid()
    out_dir.mkdir(parents=True, exist_ok=True)
    for series_dir in series_dirs:
        series_uid = generate_uid()
        for path in sorted(series_dir.glob("*.dcm")):
            ds = pydicom.dcmread(path)
            ds.PatientID, ds.PatientName = patient_id, patient_name
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.AccessionNumber = f"ACC-{patient_id}"
            ds.save_as(out_dir / f"{series_dir.name}-{path.name}", enforce_file_format=True)
    return study_uid


def radiograph_file(path: Path, image: np.ndarray, modality: str, sop_class_uid: str, **extra: object) -> Dataset:
    """Save a phantom image (float, bright = dense) as a 12-bit MONOCHROME2 single-frame instance at ``path``."""
    scaled = image.astype(np.float64)
    scaled = (scaled - scaled.min()) / max(float(scaled.max() - scaled.min()), 1e-9) * 4000
    ds = synthetic_image(modality, sop_class_uid, rows=image.shape[0], columns=image.shape[1], extra=extra)
    ds.PixelData = scaled.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds
