"""Synthetic series built in the test: tiny CT slices (32 x 32), Enhanced CT, radiographs.

Each CT slice k of a series carries pixels whose top-left value is ``100 * k`` (``slice_pixels``),
so a slice can be recognised after loading; ``with_pixels=False`` gives headers only, as series
selection reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pipelines.volume import Volume

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.1"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE = "1.2.840.10008.5.1.4.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
#: Axial images whose columns run towards the patient's anterior: the slice normal points to the feet.
AXIAL_NORMAL_TO_FEET = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
#: Rotated 30 degrees about the patient's left-right axis: an oblique, but untilted, stack.
OBLIQUE = (1.0, 0.0, 0.0, 0.0, float(np.cos(np.radians(30))), float(np.sin(np.radians(30))))

#: Rows and columns of every synthetic image.
SIZE = 32


def _normal(orientation: Sequence[float]) -> np.ndarray:
    return np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))


def slice_pixels(k: int) -> np.ndarray:
    """12-bit stored values whose top-left pixel is 100 * k, so each slice can be recognised after loading."""
    return ((np.arange(SIZE * SIZE).reshape(SIZE, SIZE) % 97) + 100 * k).astype(np.uint16)


def noise(seed: int, frames: int | None = None) -> np.ndarray:
    """12-bit noise: hard for a codec, so exact equality after decoding proves it lossless."""
    shape = (SIZE, SIZE) if frames is None else (frames, SIZE, SIZE)
    return np.random.default_rng(seed).integers(0, 4096, shape).astype(np.uint16)


def _image_base(
    sop_class: str, *, modality: str, series_uid: str, study_uid: str, photometric: str = "MONOCHROME2"
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.Modality = modality
    ds.PatientID = "VOLUME-TEST"
    ds.Rows = ds.Columns = SIZE
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    return ds


def ct_slice(
    position: Sequence[float],
    *,
    pixels: np.ndarray | None = None,
    orientation: Sequence[float] = AXIAL,
    series_uid: str = "1.2.826.0.1.3680043.8.498.10",
    study_uid: str = "1.2.826.0.1.3680043.8.498.2",
    instance_number: int = 1,
    rescale: tuple[float, float] = (1.0, -1024.0),
    pixel_spacing: tuple[float, float] = (0.7, 0.9),
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    kernel: str = "B30f",
    thickness_mm: float = 2.5,
    modality: str = "CT",
    sop_class: str = CT_IMAGE,
    description: str = "",
) -> Dataset:
    """One single-frame CT image; ``pixels`` None gives a header without Pixel Data."""
    ds = _image_base(sop_class, modality=modality, series_uid=series_uid, study_uid=study_uid)
    ds.ImageType = list(image_type)
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = list(pixel_spacing)
    ds.SliceThickness = thickness_mm
    ds.ConvolutionKernel = kernel
    ds.GantryDetectorTilt = 0  # what scanners write for an untilted gantry: must not be mistaken for a tilt
    ds.SeriesDescription = description
    ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.RescaleType = "HU"
    if pixels is not None:
        ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    return ds


def ct_series(
    n: int,
    *,
    step_mm: float = 2.5,
    orientation: Sequence[float] = AXIAL,
    origin: Sequence[float] = (-11.2, -11.2, -40.0),
    with_pixels: bool = True,
    **kwargs: object,
) -> list[Dataset]:
    """``n`` evenly spaced slices, in order along the slice normal; slice k has ``slice_pixels(k)``."""
    normal = _normal(orientation)
    series_uid = str(kwargs.pop("series_uid", generate_uid()))
    return [
        ct_slice(
            np.asarray(origin, float) + k * step_mm * normal,
            pixels=slice_pixels(k) if with_pixels else None,
            orientation=orientation,
            series_uid=series_uid,
            instance_number=k + 1,
            **kwargs,  # type: ignore[arg-type]
        )
        for k in range(n)
    ]


def enhanced_ct(
    z_mm: Sequence[float],
    frames: np.ndarray,
    *,
    intercepts: Sequence[float | None] | None = None,
    pixel_spacing: tuple[float, float] = (0.7, 0.9),
) -> Dataset:
    """An Enhanced CT image: frame i at z_mm[i], shared orientation/spacing/rescale, per-frame positions.

    ``intercepts[i]``, when not None, overrides the shared Rescale Intercept for frame i in its own
    Pixel Value Transformation item (PS3.3 C.7.6.16.2.9.1: a per-frame item takes precedence).
    """
    ds = _image_base(ENHANCED_CT_IMAGE, modality="CT", series_uid=generate_uid(), study_uid=generate_uid())
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = len(z_mm)
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = list(pixel_spacing)
    measures.SliceThickness = 2.5
    orientation = Dataset()
    orientation.ImageOrientationPatient = list(AXIAL)
    transformation = Dataset()
    transformation.RescaleSlope, transformation.RescaleIntercept, transformation.RescaleType = 1, -1024, "HU"
    shared.PixelMeasuresSequence = [measures]
    shared.PlaneOrientationSequence = [orientation]
    shared.PixelValueTransformationSequence = [transformation]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for i, z in enumerate(z_mm):
        item, plane = Dataset(), Dataset()
        plane.ImagePositionPatient = [-11.2, -11.2, float(z)]
        item.PlanePositionSequence = [plane]
        if intercepts is not None and intercepts[i] is not None:
            own = Dataset()
            own.RescaleSlope, own.RescaleIntercept, own.RescaleType = 1, intercepts[i], "HU"
            item.PixelValueTransformationSequence = [own]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = np.ascontiguousarray(frames, dtype=np.uint16).tobytes()
    return ds


def projection(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    view: str = "PA",
    modality: str = "DX",
    sop_class: str = DX_IMAGE,
    series_uid: str | None = None,
    study_uid: str = "1.2.826.0.1.3680043.8.498.3",
    description: str = "",
) -> Dataset:
    """A chest radiograph (no patient geometry, Imager Pixel Spacing only)."""
    ds = _image_base(
        sop_class,
        modality=modality,
        series_uid=series_uid or generate_uid(),
        study_uid=study_uid,
        photometric=photometric,
    )
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ViewPosition = view
    ds.SeriesDescription = description
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def assert_same_volume(actual: Volume, expected: Volume) -> None:
    np.testing.assert_array_equal(actual.pixels, expected.pixels)
    assert [f.frame_number for f in actual.source_frames] == [f.frame_number for f in expected.source_frames]
    np.testing.assert_allclose(actual.affine(), expected.affine())


def localizer_slice(series_uid: str) -> Dataset:
    """A coronal LOCALIZER image in the given series, as some scanners put the scout into the axial series."""
    return ct_slice(
        (0.0, 0.0, 0.0),
        pixels=slice_pixels(0),
        orientation=CORONAL,
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        series_uid=series_uid,
    )
