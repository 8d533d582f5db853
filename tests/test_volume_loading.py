"""Series -> volume (pipelines/volume.py) and which series a pipeline takes (pipelines/select.py).

Most tests build tiny synthetic datasets (32 x 32 pixels) in the test, so they need no data on disk.
Compressed twins come from pydicom's bundled test files, from DCMTK's encoders (called by full path,
because pynetdicom installs scripts with similar names), from pydicom's own encoders and, for
High-Throughput JPEG 2000 (which neither DCMTK 3.6.7 nor pydicom can write), from OpenJPH's
``ojph_compress`` (Debian ``openjph-tools``). Tests that need the real chest CT take the ``ct_dir``
fixture, which skips with a reason where it is absent.
"""

from __future__ import annotations

import random
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from pipelines.results import NotAnalysable, NotAnalysedReason
from pipelines.select import kernel_sharpness, rank_series, select_series
from pipelines.volume import Volume, load_volume
from tests.peers import htj2k_encode

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.1"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE = "1.2.840.10008.5.1.4.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
#: JPEG Lossless, Non-Hierarchical (Process 14), any selection value: DCMTK's ``+el``.
JPEG_LOSSLESS_P14 = UID("1.2.840.10008.1.2.4.57")

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
#: Axial images whose columns run towards the patient's anterior: the slice normal points to the feet.
AXIAL_NORMAL_TO_FEET = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
#: Rotated 30 degrees about the patient's left-right axis: an oblique, but untilted, stack.
OBLIQUE = (1.0, 0.0, 0.0, 0.0, float(np.cos(np.radians(30))), float(np.sin(np.radians(30))))

SIZE = 32
DCMTK = Path("/usr/bin")


# -- synthetic datasets ------------------------------------------------------------------------
def _normal(orientation: Sequence[float]) -> np.ndarray:
    return np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))


def _slice_pixels(k: int) -> np.ndarray:
    """12-bit stored values whose top-left pixel is 100 * k, so each slice can be recognised after loading."""
    return ((np.arange(SIZE * SIZE).reshape(SIZE, SIZE) % 97) + 100 * k).astype(np.uint16)


def _noise(seed: int, frames: int | None = None) -> np.ndarray:
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


def _ct_slice(
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


def _series(
    n: int,
    *,
    step_mm: float = 2.5,
    orientation: Sequence[float] = AXIAL,
    origin: Sequence[float] = (-11.2, -11.2, -40.0),
    with_pixels: bool = True,
    **kwargs: object,
) -> list[Dataset]:
    """``n`` evenly spaced slices, in order along the slice normal; slice k has ``_slice_pixels(k)``."""
    normal = _normal(orientation)
    series_uid = str(kwargs.pop("series_uid", generate_uid()))
    return [
        _ct_slice(
            np.asarray(origin, float) + k * step_mm * normal,
            pixels=_slice_pixels(k) if with_pixels else None,
            orientation=orientation,
            series_uid=series_uid,
            instance_number=k + 1,
            **kwargs,  # type: ignore[arg-type]
        )
        for k in range(n)
    ]


def _enhanced_ct(
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


def _projection(
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


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _not_analysable(datasets: Sequence[Dataset | str | Path], **kwargs: object) -> NotAnalysable:
    with pytest.raises(NotAnalysable) as info:
        load_volume(datasets, **kwargs)  # type: ignore[arg-type]
    return info.value


def _assert_same_volume(actual: Volume, expected: Volume) -> None:
    np.testing.assert_array_equal(actual.pixels, expected.pixels)
    assert [f.frame_number for f in actual.source_frames] == [f.frame_number for f in expected.source_frames]
    np.testing.assert_allclose(actual.affine(), expected.affine())


def _dcmtk(tool: str, *args: str | Path) -> None:
    exe = DCMTK / tool
    if not exe.is_file():
        pytest.skip(f"DCMTK {tool} not installed at {exe}")
    subprocess.run([str(exe), *map(str, args)], check=True, capture_output=True, timeout=60)


def _with_pydicom_encoder(syntax: UID, **options: object) -> Callable[[Path, Path], None]:
    def encode(src: Path, dst: Path) -> None:
        ds = dcmread(src)
        ds.compress(syntax, **options)  # type: ignore[arg-type]
        _save(ds, dst)

    return encode


def _with_dcmtk(tool: str, *args: str) -> Callable[[Path, Path], None]:
    def encode(src: Path, dst: Path) -> None:
        _dcmtk(tool, *args, src, dst)

    return encode


def _with_openjph(syntax: UID, *options: str) -> Callable[[Path, Path], None]:
    def encode(src: Path, dst: Path) -> None:
        htj2k_encode(src, dst, syntax, *options)

    return encode


#: Lossless encodings: (encoder, the transfer syntax it must produce). Each must decode to identical pixels.
LOSSLESS: dict[str, tuple[Callable[[Path, Path], None], UID]] = {
    "implicit-vr-little-endian": (_with_dcmtk("dcmconv", "+ti"), ImplicitVRLittleEndian),
    "explicit-vr-big-endian": (_with_dcmtk("dcmconv", "+tb"), ExplicitVRBigEndian),
    "deflated": (_with_dcmtk("dcmconv", "+td"), DeflatedExplicitVRLittleEndian),
    "rle-dcmtk": (_with_dcmtk("dcmcrle"), RLELossless),
    "rle-pydicom": (_with_pydicom_encoder(RLELossless), RLELossless),
    "jpeg-lossless-sv1": (_with_dcmtk("dcmcjpeg", "+e1"), JPEGLosslessSV1),
    "jpeg-lossless-process14-sv6": (_with_dcmtk("dcmcjpeg", "+el"), JPEG_LOSSLESS_P14),
    "jpeg-ls-lossless-dcmtk": (_with_dcmtk("dcmcjpls", "+el"), JPEGLSLossless),
    "jpeg-ls-lossless-pyjpegls": (_with_pydicom_encoder(JPEGLSLossless), JPEGLSLossless),
    "jpeg-2000-lossless": (_with_pydicom_encoder(JPEG2000Lossless), JPEG2000Lossless),
    "htj2k-lossless-openjph": (_with_openjph(HTJ2KLossless, "-reversible", "true"), HTJ2KLossless),
}


# -- slice order and geometry ------------------------------------------------------------------
@pytest.mark.parametrize("numbering", ["reversed", "shuffled", "all-one"])
def test_slices_are_ordered_by_position_not_instance_number(numbering: str) -> None:
    slices = _series(12)
    numbers = {
        "reversed": list(range(12, 0, -1)),
        "shuffled": random.Random(7).sample(range(1, 13), 12),
        "all-one": [1] * 12,  # scanners that restart numbering per acquisition
    }[numbering]
    for ds, number in zip(slices, numbers, strict=True):
        ds.InstanceNumber = number
    given = slices[:]
    random.Random(3).shuffle(given)

    volume = load_volume(given)

    assert volume.pixels.shape == (12, SIZE, SIZE)
    np.testing.assert_array_equal(volume.pixels[:, 0, 0], 100 * np.arange(12) - 1024)
    assert [f.sop_instance_uid for f in volume.source_frames] == [ds.SOPInstanceUID for ds in slices]
    np.testing.assert_allclose(volume.origin_mm, slices[0].ImagePositionPatient)
    assert volume.spacing_mm == pytest.approx((2.5, 0.7, 0.9))


def test_series_numbered_head_to_feet_loads_like_the_same_series_numbered_feet_to_head() -> None:
    # The real chest CT numbers its slices from the head down (z falls as InstanceNumber rises);
    # other scanners number from the feet up. Both must give the same volume.
    slices = _series(8)
    feet_up = load_volume(slices)
    for ds, number in zip(slices, range(8, 0, -1), strict=True):
        ds.InstanceNumber = number
    head_down = load_volume(list(reversed(slices)))

    _assert_same_volume(head_down, feet_up)
    assert feet_up.origin_mm[2] == pytest.approx(-40.0)  # the lowest slice comes first
    assert np.all(np.diff([feet_up.slice_position_mm(i)[2] for i in range(8)]) > 0)


def test_slices_follow_the_normal_of_their_own_orientation() -> None:
    # With columns running anterior, the slice normal points to the feet: slice 0 is the most cranial.
    slices = _series(6, orientation=AXIAL_NORMAL_TO_FEET, origin=(0.0, 0.0, 100.0))
    volume = load_volume(slices[::-1])

    np.testing.assert_allclose(volume.slice_direction, [0.0, 0.0, -1.0])
    assert [float(volume.slice_position_mm(i)[2]) for i in range(6)] == pytest.approx([100, 97.5, 95, 92.5, 90, 87.5])
    np.testing.assert_array_equal(volume.pixels[:, 0, 0], 100 * np.arange(6) - 1024)


@pytest.mark.parametrize(
    "orientation",
    [AXIAL, AXIAL_NORMAL_TO_FEET, OBLIQUE, CORONAL],
    ids=["axial", "normal-to-feet", "oblique", "coronal"],
)
def test_affine_maps_each_slice_index_to_its_image_position(orientation: tuple[float, ...]) -> None:
    slices = _series(5, orientation=orientation, step_mm=3.0)
    random.Random(1).shuffle(slices)
    volume = load_volume(slices)
    by_uid = {ds.SOPInstanceUID: np.asarray(ds.ImagePositionPatient, float) for ds in slices}

    affine = volume.affine()
    for index, frame in enumerate(volume.source_frames):
        np.testing.assert_allclose(affine @ [index, 0, 0, 1], [*by_uid[frame.sop_instance_uid], 1], atol=1e-6)
        np.testing.assert_allclose(volume.slice_position_mm(index), by_uid[frame.sop_instance_uid], atol=1e-6)


def test_affine_steps_rows_and_columns_by_their_own_pixel_spacing() -> None:
    # PS3.3 C.7.6.2.1.1: column index c moves along the first direction cosine by PixelSpacing[1],
    # row index r along the second by PixelSpacing[0]. Unequal spacings catch a swap.
    slices = _series(3, orientation=OBLIQUE, pixel_spacing=(0.6, 1.1))
    volume = load_volume(slices)
    ipp = np.asarray(slices[0].ImagePositionPatient, float)
    row_cosine, column_cosine = np.asarray(OBLIQUE[:3]), np.asarray(OBLIQUE[3:])

    for r, c in [(0, 1), (1, 0), (7, 19), (31, 31)]:
        expected = ipp + c * 1.1 * row_cosine + r * 0.6 * column_cosine
        np.testing.assert_allclose((volume.affine() @ [0, r, c, 1])[:3], expected, atol=1e-6)


def test_small_rounding_in_slice_positions_is_tolerated() -> None:
    slices = _series(10, step_mm=2.5)
    for k, ds in enumerate(slices):  # scanners round positions to 0.01-0.1 mm
        ds.ImagePositionPatient[2] = round(float(ds.ImagePositionPatient[2]) + (0.1 if k % 3 == 0 else -0.05), 2)

    volume = load_volume(slices)

    assert volume.pixels.shape[0] == 10
    assert volume.spacing_mm[0] == pytest.approx(2.5, abs=0.2)


# -- pixel values --------------------------------------------------------------------------------
def test_rescale_slope_and_intercept_give_hounsfield_units_per_slice() -> None:
    slices = _series(3)
    slices[1].RescaleSlope, slices[1].RescaleIntercept = 2, -2048  # CT may rescale each slice differently
    slices[2].RescaleSlope, slices[2].RescaleIntercept = 0.5, -1000.5

    volume = load_volume(slices)

    for k, (slope, intercept) in enumerate([(1, -1024), (2, -2048), (0.5, -1000.5)]):
        np.testing.assert_allclose(volume.pixels[k], _slice_pixels(k).astype(float) * slope + intercept)
    assert volume.pixels.dtype == np.float32


def test_a_12_bit_ct_loads_as_int16_hounsfield_units_and_a_wider_range_as_float32() -> None:
    # 12 stored bits, slope 1, intercept -1024: every possible value (-1024..3071 HU) fits int16, half the memory.
    ct = load_volume(_series(3))
    assert ct.pixels.dtype == np.int16
    for k in range(3):
        np.testing.assert_array_equal(ct.pixels[k], _slice_pixels(k).astype(int) - 1024)

    # 16 stored bits unsigned with the same intercept could reach 64511 HU: int16 would wrap, so float32.
    wide = _series(2)
    for ds in wide:
        ds.BitsStored, ds.HighBit = 16, 15
        ds.PixelData = (_slice_pixels(int(ds.InstanceNumber) - 1) + 60000).tobytes()
    volume = load_volume(wide)
    assert volume.pixels.dtype == np.float32
    np.testing.assert_array_equal(volume.pixels[1], _slice_pixels(1).astype(float) + 60000 - 1024)


def test_missing_rescale_leaves_stored_values() -> None:
    slices = _series(2)
    for ds in slices:
        del ds.RescaleSlope, ds.RescaleIntercept

    volume = load_volume(slices)

    np.testing.assert_array_equal(volume.pixels[1], _slice_pixels(1))


def test_monochrome1_is_inverted_so_that_higher_values_are_brighter() -> None:
    # MONOCHROME1: the lowest stored value is displayed white (bone on a CR is stored low).
    stored = np.tile(np.arange(SIZE, dtype=np.uint16) * 100, (SIZE, 1))
    stored[10:20, 10:20] = 50  # "bone": displayed bright
    monochrome1 = _projection(stored, photometric="MONOCHROME1", modality="CR", sop_class=CR_IMAGE)
    monochrome2 = _projection(stored.max() - stored, photometric="MONOCHROME2", modality="CR", sop_class=CR_IMAGE)

    inverted = load_volume([monochrome1]).pixels[0]
    plain = load_volume([monochrome2]).pixels[0]

    np.testing.assert_array_equal(inverted, float(stored.min()) + float(stored.max()) - stored)
    assert inverted[15, 15] > inverted[15, 25]  # the bone is now the brighter
    np.testing.assert_array_equal(inverted, plain)  # and it looks as the same image stored as MONOCHROME2


# -- unsuitable input: "not analysed" with a specific reason, never another exception -----------
def test_fewer_slices_than_the_pipeline_needs_is_too_few_slices() -> None:
    error = _not_analysable(_series(5), min_slices=16)

    assert error.outcome.reason is NotAnalysedReason.TOO_FEW_SLICES
    assert "5 slice" in error.outcome.detail and "16" in error.outcome.detail


def test_enough_slices_is_not_too_few() -> None:
    assert load_volume(_series(16), min_slices=16).pixels.shape[0] == 16


def test_series_without_instances_is_too_few_slices() -> None:
    assert _not_analysable([]).outcome.reason is NotAnalysedReason.TOO_FEW_SLICES


def test_missing_slice_is_uneven_spacing() -> None:
    slices = _series(12)
    del slices[6]

    error = _not_analysable(slices)

    assert error.outcome.reason is NotAnalysedReason.UNEVEN_SPACING
    assert "5.00" in error.outcome.detail and "2.50" in error.outcome.detail


def test_sheared_slice_positions_are_gantry_tilt() -> None:
    # A tilted gantry keeps axial-looking images but shifts each slice along y: the stack is sheared.
    tilt = np.radians(15)
    slices = [
        _ct_slice((0.0, k * 2.5 * np.sin(tilt), k * 2.5 * np.cos(tilt)), pixels=_slice_pixels(k), series_uid="1.2.3")
        for k in range(8)
    ]
    error = _not_analysable(slices)

    assert error.outcome.reason is NotAnalysedReason.GANTRY_TILT
    assert "15.0 degrees" in error.outcome.detail


def test_gantry_detector_tilt_attribute_is_gantry_tilt() -> None:
    slices = _series(8)
    for ds in slices:
        ds.GantryDetectorTilt = 12.5

    error = _not_analysable(slices)

    assert error.outcome.reason is NotAnalysedReason.GANTRY_TILT
    assert "12.5" in error.outcome.detail


def test_instance_without_pixel_data_is_missing_pixel_data(tmp_path: Path) -> None:
    slices = _series(6)
    del slices[3].PixelData
    assert _not_analysable(slices).outcome.reason is NotAnalysedReason.MISSING_PIXEL_DATA

    # The same through files, as the spool hands them over.
    header_only = _series(1)[0]
    del header_only.PixelData
    path = _save(header_only, tmp_path / "header.dcm")
    assert _not_analysable([path]).outcome.reason is NotAnalysedReason.MISSING_PIXEL_DATA


def test_colour_image_is_unsupported_photometric() -> None:
    rgb = _projection(np.zeros((SIZE, SIZE), np.uint16))
    rgb.SamplesPerPixel, rgb.PhotometricInterpretation, rgb.PlanarConfiguration = 3, "RGB", 0
    rgb.BitsAllocated, rgb.BitsStored, rgb.HighBit = 8, 8, 7
    rgb.PixelData = np.zeros((SIZE, SIZE, 3), np.uint8).tobytes()

    error = _not_analysable([rgb])

    assert error.outcome.reason is NotAnalysedReason.UNSUPPORTED_PHOTOMETRIC
    assert "RGB" in error.outcome.detail


@pytest.mark.parametrize("name", ["SC_rgb_rle.dcm", "GDCMJ2K_TextGBR.dcm", "SC_ybr_full_422_uncompressed.dcm"])
def test_colour_test_files_are_unsupported_photometric(name: str) -> None:
    path = get_testdata_file(name)
    assert path, f"{name} is bundled with pydicom"
    assert _not_analysable([path]).outcome.reason is NotAnalysedReason.UNSUPPORTED_PHOTOMETRIC


def test_two_instances_at_the_same_position_are_inconsistent_geometry() -> None:
    slices = _series(6)
    duplicate = _ct_slice(
        slices[2].ImagePositionPatient, pixels=_slice_pixels(9), series_uid=slices[0].SeriesInstanceUID
    )

    error = _not_analysable([*slices, duplicate])

    assert error.outcome.reason is NotAnalysedReason.INCONSISTENT_GEOMETRY
    assert "duplicates" in error.outcome.detail


def test_images_of_different_sizes_are_inconsistent_geometry() -> None:
    slices = _series(4)
    slices[1].Rows = slices[1].Columns = SIZE // 2
    slices[1].PixelData = slices[1].PixelData[: len(slices[1].PixelData) // 4]

    assert _not_analysable(slices).outcome.reason is NotAnalysedReason.INCONSISTENT_GEOMETRY


def _localizer(series_uid: str) -> Dataset:
    """A coronal LOCALIZER image in the given series, as some scanners put the scout into the axial series."""
    return _ct_slice(
        (0.0, 0.0, 0.0),
        pixels=_slice_pixels(0),
        orientation=CORONAL,
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        series_uid=series_uid,
    )


def test_localizer_mixed_into_an_axial_series_is_inconsistent_geometry() -> None:
    slices = _series(6)
    localizer = _localizer(slices[0].SeriesInstanceUID)

    error = _not_analysable([localizer, *slices])

    assert error.outcome.reason is NotAnalysedReason.INCONSISTENT_GEOMETRY
    assert "orientation" in error.outcome.detail


@pytest.mark.parametrize(
    "orientation",
    [(0.0, 0.0, 0.0, 0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 1.0, 0.0, 0.0)],
    ids=["all-zero", "parallel-cosines"],
)
def test_degenerate_image_orientation_is_inconsistent_geometry(orientation: tuple[float, ...]) -> None:
    # Broken exporters write all-zero or parallel direction cosines; there is no slice normal to sort along.
    slices = [
        _ct_slice((0.0, 0.0, 2.5 * k), pixels=_slice_pixels(k), orientation=orientation, series_uid="1.2.3")
        for k in range(4)
    ]

    assert _not_analysable(slices).outcome.reason is NotAnalysedReason.INCONSISTENT_GEOMETRY


def test_image_position_with_a_wrong_number_of_values_is_not_analysable() -> None:
    slices = _series(4)
    slices[2].ImagePositionPatient = 5.0  # one value where PS3.3 asks for three

    assert _not_analysable(slices).outcome.reason is NotAnalysedReason.INCONSISTENT_GEOMETRY


def _corrupt(syntax: UID, damage: Callable[[bytes], bytes]) -> Dataset:
    ds = _series(1)[0]
    ds.PixelData = _noise(0).tobytes()
    ds.compress(syntax)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([damage(frame)])
    return ds


def _garbage(frame: bytes) -> bytes:
    return bytes(np.random.default_rng(1).integers(0, 256, len(frame), dtype=np.uint8))


def _first_half(frame: bytes) -> bytes:
    return frame[: len(frame) // 2]


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: _corrupt(RLELossless, _first_half), id="truncated-rle"),
        pytest.param(lambda: _corrupt(JPEG2000Lossless, _first_half), id="truncated-jpeg-2000"),
        pytest.param(lambda: _corrupt(JPEGLSLossless, _garbage), id="garbage-jpeg-ls"),
        pytest.param(lambda: _corrupt(JPEG2000Lossless, _garbage), id="garbage-jpeg-2000"),
        pytest.param(lambda: dcmread(get_testdata_file("MR_truncated.dcm")), id="pydicom-MR_truncated"),
        # NEMA's 12-bit lossy JPEG with invalid scan parameters (JPGExtended.dcm is its fixed twin).
        pytest.param(lambda: dcmread(get_testdata_file("JPEG-lossy.dcm")), id="pydicom-JPEG-lossy"),
    ],
)
def test_undecodable_pixel_data_is_not_analysable_not_a_crash(make: Callable[[], Dataset]) -> None:
    ds = make()
    name = ds.file_meta.TransferSyntaxUID.name

    error = _not_analysable([ds])

    assert error.outcome.reason is NotAnalysedReason.UNDECODABLE
    assert name in error.outcome.detail and str(ds.SOPInstanceUID) in error.outcome.detail


def test_undecodable_slice_among_good_ones_fails_the_whole_series() -> None:
    slices = _series(5)
    slices[2] = _corrupt(RLELossless, _first_half)
    slices[2].ImagePositionPatient = [-11.2, -11.2, -35.0]
    slices[2].SeriesInstanceUID = slices[0].SeriesInstanceUID

    assert _not_analysable(slices).outcome.reason is NotAnalysedReason.UNDECODABLE


@pytest.mark.parametrize("process", ["+es", "+ep"], ids=["spectral-selection", "progressive"])
def test_retired_jpeg_processes_are_undecodable(tmp_path: Path, process: str) -> None:
    # DCMTK still writes the retired JPEG processes 6/8 and 10/12; no pydicom plugin decodes them.
    slices = _series(1)
    src = _save(slices[0], tmp_path / "in.dcm")
    _dcmtk("dcmcjpeg", process, src, tmp_path / "out.dcm")

    error = _not_analysable([tmp_path / "out.dcm"])

    assert error.outcome.reason is NotAnalysedReason.UNDECODABLE
    assert "JPEG" in error.outcome.detail


# -- multi-frame -------------------------------------------------------------------------------
def test_enhanced_multiframe_gives_one_slice_per_frame_in_position_order() -> None:
    z_stored = [5.0, -5.0, 10.0, 0.0, -10.0]  # frames stored out of anatomical order
    frames = np.stack([_slice_pixels(int(z // 5) + 2) for z in z_stored])  # pixel[0,0] = 100 * rank by z
    ds = _enhanced_ct(z_stored, frames, intercepts=[None, None, -1000.0, None, None])

    volume = load_volume([ds])

    assert volume.pixels.shape == (5, SIZE, SIZE)
    assert [f.frame_number for f in volume.source_frames] == [5, 2, 4, 1, 3]  # 1-based, sorted by z
    assert {f.sop_instance_uid for f in volume.source_frames} == {ds.SOPInstanceUID}
    assert [f.sop_class_uid for f in volume.source_frames] == [ENHANCED_CT_IMAGE] * 5
    # Shared rescale (intercept -1024) everywhere except frame 3 (z = 10), which has its own (-1000).
    np.testing.assert_array_equal(volume.pixels[:, 0, 0], [-1024, -924, -824, -724, -600])
    assert volume.spacing_mm == pytest.approx((5.0, 0.7, 0.9))
    for index in range(5):
        np.testing.assert_allclose(volume.affine() @ [index, 0, 0, 1], [-11.2, -11.2, -10.0 + 5 * index, 1])


def test_enhanced_multiframe_with_a_missing_frame_position_is_uneven_spacing() -> None:
    ds = _enhanced_ct([0.0, 2.5, 5.0, 10.0], _noise(1, 4))

    assert _not_analysable([ds]).outcome.reason is NotAnalysedReason.UNEVEN_SPACING


def test_multiframe_without_frame_positions_keeps_stored_frame_order() -> None:
    path = get_testdata_file("rtdose.dcm")  # 15 frames, no functional groups
    assert path
    ds = dcmread(path)

    volume = load_volume([path])

    assert [f.frame_number for f in volume.source_frames] == list(range(1, 16))
    np.testing.assert_array_equal(volume.pixels, ds.pixel_array.astype(np.float32))


# -- compressed inputs load to the same pixels as their uncompressed twins -------------------------
#: pydicom's test files: (uncompressed reference, twin). Lossless: pixels must be identical.
BUNDLED_TWINS = [
    ("MR_small.dcm", "MR_small_RLE.dcm"),
    ("MR_small.dcm", "MR_small_jp2klossless.dcm"),
    ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm"),
    ("MR_small.dcm", "MR_small_bigendian.dcm"),
    ("MR_small.dcm", "MR_small_expb.dcm"),
    ("MR_small.dcm", "MR_small_implicit.dcm"),
    ("MR_small.dcm", "MR_small_padded.dcm"),
    ("rtdose.dcm", "rtdose_rle.dcm"),  # multi-frame
    ("rtdose.dcm", "rtdose_expb.dcm"),
    ("rtdose_1frame.dcm", "rtdose_rle_1frame.dcm"),
    ("rtdose_1frame.dcm", "rtdose_expb_1frame.dcm"),
    ("liver_1frame.dcm", "liver_expb_1frame.dcm"),  # enhanced (functional groups), 1 frame
]


def _testdata(name: str) -> str:
    """A test file bundled with pydicom (the ones it would download are out of reach offline)."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} should be bundled with pydicom"
    return path


@pytest.mark.parametrize(("reference", "twin"), BUNDLED_TWINS, ids=[t.removesuffix(".dcm") for _, t in BUNDLED_TWINS])
def test_pydicom_test_files_load_to_the_same_pixels_as_their_uncompressed_twins(reference: str, twin: str) -> None:
    expected = load_volume([_testdata(reference)])
    actual = load_volume([_testdata(twin)])

    _assert_same_volume(actual, expected)


def _encoded_series(
    tmp_path: Path, planes: list[np.ndarray], encode: Callable[[Path, Path], None], syntax: UID, name: str
) -> tuple[list[Path], list[Path]]:
    """A series with these pixels saved uncompressed, and its twin encoded (checked to be in ``syntax``)."""
    slices = _series(len(planes))
    for ds, plane in zip(slices, planes, strict=True):
        ds.PixelData = plane.tobytes()
    originals = [_save(ds, tmp_path / f"{k}.dcm") for k, ds in enumerate(slices)]
    twins = [tmp_path / f"{k}-{name}.dcm" for k in range(len(slices))]
    for src, dst in zip(originals, twins, strict=True):
        encode(src, dst)
    assert dcmread(twins[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    return originals, twins


@pytest.mark.parametrize("encoding", list(LOSSLESS))
def test_series_in_every_lossless_transfer_syntax_loads_to_identical_pixels(tmp_path: Path, encoding: str) -> None:
    encode, syntax = LOSSLESS[encoding]
    originals, twins = _encoded_series(tmp_path, [_noise(k) for k in range(4)], encode, syntax, encoding)

    _assert_same_volume(load_volume(twins[::-1]), load_volume(originals))


@pytest.mark.parametrize("encoding", list(LOSSLESS))
def test_enhanced_multiframe_in_every_lossless_transfer_syntax_loads_to_identical_pixels(
    tmp_path: Path, encoding: str
) -> None:
    encode, syntax = LOSSLESS[encoding]
    original = _save(_enhanced_ct([7.5, 0.0, 5.0, 2.5], _noise(3, 4)), tmp_path / "enhanced.dcm")
    twin = tmp_path / f"enhanced-{encoding}.dcm"
    encode(original, twin)
    assert dcmread(twin, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax

    volume = load_volume([twin])

    _assert_same_volume(volume, load_volume([original]))
    assert [f.frame_number for f in volume.source_frames] == [2, 4, 3, 1]


def _smooth_slice(k: int) -> np.ndarray:
    """A body-like smooth image (air, soft tissue, a dense disc) with mild noise, 12-bit stored values."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    r = np.hypot(yy - SIZE / 2, xx - SIZE / 2)
    image = np.where(r < 14, 1064.0, 24.0) + np.where(r < 4, 800.0 + 20 * k, 0.0)
    return (image + np.random.default_rng(k).normal(0, 2, image.shape)).clip(0, 4095).astype(np.uint16)


#: Lossy encodings: (encoder, transfer syntax, largest mean |error| in HU, largest single |error| in HU or None).
#: Honest bounds, not codec benchmarks: the right image must come back in modality units, with air, soft
#: tissue and the dense disc still where they were; only JPEG-LS near-lossless promises a per-pixel bound.
LOSSY: dict[str, tuple[Callable[[Path, Path], None], UID, float, float | None]] = {
    # ISO 14495-1 near-lossless: |error| <= NEAR in stored units; Rescale Slope is 1 here.
    "jpeg-ls-near-lossless-2": (_with_dcmtk("dcmcjpls", "+en", "+md", "2"), JPEGLSNearLossless, 2.0, 2.0),
    # DCMTK maps 12 bits into 8 for baseline and rewrites Rescale Slope/Intercept to match (slope ~8 here).
    "jpeg-baseline-8bit": (_with_dcmtk("dcmcjpeg", "+eb"), JPEGBaseline8Bit, 40.0, None),
    "jpeg-extended-12bit": (_with_dcmtk("dcmcjpeg", "+ee"), JPEGExtended12Bit, 10.0, None),
    "jpeg-2000-lossy-3to1": (_with_pydicom_encoder(JPEG2000, j2k_cr=[3]), JPEG2000, 30.0, None),
    # Irreversible 9/7 wavelet. Two decomposition levels suit 32 x 32 test images (OpenJPH 0.9 mis-encodes
    # them at its default five, whichever decoder reads them; 256 x 256 images come back right at five).
    "htj2k-lossy": (_with_openjph(HTJ2K, "-qstep", "0.005", "-num_decomps", "2"), HTJ2K, 30.0, None),
}


@pytest.mark.parametrize("encoding", list(LOSSY))
def test_lossy_transfer_syntaxes_load_close_to_the_original_hounsfield_units(tmp_path: Path, encoding: str) -> None:
    encode, syntax, mean_hu, max_hu = LOSSY[encoding]
    originals, twins = _encoded_series(tmp_path, [_smooth_slice(k) for k in range(3)], encode, syntax, encoding)

    expected, actual = load_volume(originals), load_volume(twins)

    error = np.abs(actual.pixels - expected.pixels)
    assert float(error.mean()) <= mean_hu, float(error.mean())
    if max_hu is not None:
        assert float(error.max()) <= max_hu
    for threshold_hu in (-500, 300):  # body outline, dense disc
        np.testing.assert_array_equal(actual.pixels > threshold_hu, expected.pixels > threshold_hu)
    np.testing.assert_allclose(actual.affine(), expected.affine())


# -- the real chest CT -------------------------------------------------------------------------
def _real_series(ct_dir: Path, name: str) -> list[Path]:
    paths = sorted((ct_dir / name).glob("*.dcm"))
    if not paths:
        pytest.skip(f"{ct_dir / name} holds no .dcm files")
    return paths


def test_real_ct_series_loads_sorted_by_position_in_hounsfield_units(ct_dir: Path) -> None:
    paths = _real_series(ct_dir, "series-3-B40f")
    headers = {str(p): dcmread(p, stop_before_pixels=True) for p in paths}
    shuffled = paths[:]
    random.Random(5).shuffle(shuffled)

    volume = load_volume(shuffled, min_slices=len(paths))

    z = [float(headers[str(p)].ImagePositionPatient[2]) for p in paths]
    lowest = min(paths, key=lambda p: float(headers[str(p)].ImagePositionPatient[2]))
    assert volume.source_frames[0].sop_instance_uid == headers[str(lowest)].SOPInstanceUID
    assert volume.origin_mm[2] == pytest.approx(min(z))
    assert volume.spacing_mm[0] == pytest.approx((max(z) - min(z)) / (len(z) - 1))
    first = dcmread(lowest)
    np.testing.assert_array_equal(
        volume.pixels[0], first.pixel_array * float(first.RescaleSlope) + float(first.RescaleIntercept)
    )
    assert volume.pixels.min() >= -1024 and np.median(volume.pixels[:, :40, :40]) < -900  # air outside the body


def test_real_ct_slices_load_identically_from_every_lossless_transfer_syntax(ct_dir: Path, tmp_path: Path) -> None:
    originals = _real_series(ct_dir, "series-3-B40f")[12:15]
    expected = load_volume(originals)
    for encoding, (encode, syntax) in LOSSLESS.items():
        twins = [tmp_path / f"{p.stem}-{encoding}.dcm" for p in originals]
        for src, dst in zip(originals, twins, strict=True):
            encode(src, dst)
        assert dcmread(twins[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax, encoding

        actual = load_volume(twins)

        np.testing.assert_array_equal(actual.pixels, expected.pixels, err_msg=encoding)
        np.testing.assert_allclose(actual.affine(), expected.affine(), err_msg=encoding)


def test_real_ct_study_selects_the_soft_kernel_series(ct_dir: Path) -> None:
    headers = {}
    for name in ("series-2-B70f", "series-3-B40f"):
        series = [dcmread(p, stop_before_pixels=True) for p in _real_series(ct_dir, name)]
        headers[str(series[0].SeriesInstanceUID)] = series

    chosen = select_series(headers, task="segmentation", modalities=["CT"])

    assert headers[chosen][0].ConvolutionKernel == "B40f"


# -- series selection ------------------------------------------------------------------------------
def _study(**series: list[Dataset]) -> tuple[dict[str, list[Dataset]], dict[str, str]]:
    """Headers by SeriesInstanceUID, and the UID of each named series."""
    by_uid = {str(datasets[0].SeriesInstanceUID): datasets for datasets in series.values()}
    return by_uid, {name: str(datasets[0].SeriesInstanceUID) for name, datasets in series.items()}


def _ct_study() -> tuple[dict[str, list[Dataset]], dict[str, str]]:
    return _study(
        localizer=[
            _ct_slice(
                (0.0, 0.0, 0.0),
                orientation=CORONAL,
                series_uid="1.2.826.0.1.3680043.8.498.101",
                kernel="T20f",
                image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                instance_number=k + 1,
            )
            for k in range(2)
        ],
        thick_soft=_series(20, step_mm=5.0, thickness_mm=5.0, kernel="B30f", with_pixels=False),
        thin_sharp=_series(40, step_mm=1.0, thickness_mm=1.0, kernel="B70f", with_pixels=False),
        thin_soft=_series(40, step_mm=1.0, thickness_mm=1.0, kernel="B30f", with_pixels=False),
        thin_soft_mpr=_series(
            60,
            step_mm=0.6,
            thickness_mm=0.6,
            kernel="B30f",
            image_type=("DERIVED", "SECONDARY", "AXIAL"),
            with_pixels=False,
        ),
        thin_soft_sagittal=_series(
            40, step_mm=0.6, thickness_mm=0.6, kernel="B30f", orientation=SAGITTAL, with_pixels=False
        ),
        dose_report=[
            _ct_slice(
                (0.0, 0.0, 0.0),
                series_uid="1.2.826.0.1.3680043.8.498.102",
                sop_class=SECONDARY_CAPTURE,
                image_type=("DERIVED", "SECONDARY", "OTHER"),
            )
        ],
    )


def test_ct_selection_takes_the_thin_soft_original_axial_series() -> None:
    study, uid = _ct_study()

    assert select_series(study, task="segmentation", modalities=["CT"]) == uid["thin_soft"]


def test_ct_ranking_puts_thin_before_thick_and_soft_before_sharp_and_says_why_others_are_rejected() -> None:
    study, uid = _ct_study()

    candidates, rejected = rank_series(study, task="segmentation", modalities=["CT"])

    assert [c.series_instance_uid for c in candidates] == [uid["thin_soft"], uid["thin_sharp"], uid["thick_soft"]]
    assert set(rejected) == {uid["localizer"], uid["thin_soft_mpr"], uid["thin_soft_sagittal"], uid["dose_report"]}
    assert "localizer/derived/secondary" in rejected[uid["localizer"]]
    assert "localizer/derived/secondary" in rejected[uid["thin_soft_mpr"]]
    assert "not axial" in rejected[uid["thin_soft_sagittal"]]
    assert "no CT image objects" in rejected[uid["dose_report"]]


def test_sagittal_series_is_not_selected() -> None:
    study, uid = _study(sagittal=_series(40, orientation=SAGITTAL, with_pixels=False))

    with pytest.raises(NotAnalysable) as info:
        select_series(study, task="segmentation", modalities=["CT"])

    assert info.value.outcome.reason is NotAnalysedReason.NO_SUITABLE_SERIES
    assert f"{uid['sagittal']}: not axial" in info.value.outcome.detail


@pytest.mark.parametrize(
    ("soft", "sharp"),
    [
        ("B30f", "B70f"),  # Siemens
        ("Br40d", "Br64d"),  # Siemens, newer names
        ("SOFT", "BONE"),  # GE
        ("STANDARD", "LUNG"),  # GE
        ("B", "D"),  # Philips
        ("FC08", "FC52"),  # Canon / Toshiba
    ],
)
def test_soft_kernel_is_preferred_whatever_the_vendor_convention(soft: str, sharp: str) -> None:
    assert kernel_sharpness(soft) < kernel_sharpness(sharp)
    study, uid = _study(
        sharp=_series(20, kernel=sharp, with_pixels=False),
        soft=_series(20, kernel=soft, with_pixels=False),
    )

    assert select_series(study, task="segmentation", modalities=["CT"]) == uid["soft"]


def test_multi_valued_kernel_is_read_by_its_first_value() -> None:
    # Siemens writes Convolution Kernel with two values (kernel, iterative strength): Br40d\3.
    header = _ct_slice((0.0, 0.0, 0.0), kernel="Br40d")
    header.ConvolutionKernel = ["Br40d", "3"]

    assert kernel_sharpness(header.ConvolutionKernel) == kernel_sharpness("Br40d") == 40


def test_no_suitable_series_lists_each_series_and_its_reason() -> None:
    study, uid = _study(
        mr=_series(30, modality="MR", sop_class=MR_IMAGE, with_pixels=False),
        short=_series(5, with_pixels=False),
        localizer=_series(2, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), with_pixels=False),
    )

    with pytest.raises(NotAnalysable) as info:
        select_series(study, task="segmentation", modalities=["CT"])

    detail = info.value.outcome.detail
    assert info.value.outcome.reason is NotAnalysedReason.NO_SUITABLE_SERIES
    assert f"{uid['mr']}: modality MR, not CT" in detail
    assert f"{uid['short']}: 5 slices, at least 16 needed" in detail
    assert f"{uid['localizer']}: only localizer/derived/secondary images" in detail


def test_empty_study_has_no_suitable_series() -> None:
    with pytest.raises(NotAnalysable) as info:
        select_series({}, task="segmentation", modalities=["CT"])

    assert info.value.outcome.reason is NotAnalysedReason.NO_SUITABLE_SERIES


def _radiograph_series(view: str, *, modality: str = "DX", description: str = "") -> list[Dataset]:
    ds = _projection(
        np.zeros((SIZE, SIZE), np.uint16),
        view=view,
        modality=modality,
        sop_class=DX_IMAGE if modality == "DX" else CR_IMAGE,
        description=description,
    )
    del ds.PixelData
    return [ds]


@pytest.mark.parametrize("modality", ["CR", "DX"])
def test_chest_radiograph_selection_takes_the_frontal_view(modality: str) -> None:
    study, uid = _study(
        lateral=_radiograph_series("LL", modality=modality),
        frontal=_radiograph_series("PA", modality=modality),
        lateral_by_description=_radiograph_series("", modality=modality, description="THORAX LAT"),
    )

    candidates, rejected = rank_series(study, task="classification", modalities=["CR", "DX"])

    assert [c.series_instance_uid for c in candidates] == [uid["frontal"]]
    assert "lateral" in rejected[uid["lateral"]] and "lateral" in rejected[uid["lateral_by_description"]]
    assert select_series(study, task="classification", modalities=["CR", "DX"]) == uid["frontal"]


def test_radiograph_frontal_view_code_ranks_above_a_described_one() -> None:
    study, uid = _study(
        described=_radiograph_series("", description="CHEST PA"),
        coded=_radiograph_series("AP"),
    )

    assert select_series(study, task="classification", modalities=["CR", "DX"]) == uid["coded"]


def test_lateral_only_radiograph_study_is_not_analysable() -> None:
    study, uid = _study(lateral=_radiograph_series("RL"))

    with pytest.raises(NotAnalysable) as info:
        select_series(study, task="classification", modalities=["CR", "DX"])

    assert info.value.outcome.reason is NotAnalysedReason.NO_SUITABLE_SERIES
    assert uid["lateral"] in info.value.outcome.detail and "lateral" in info.value.outcome.detail


# -- the runner turns unsuitable input into "not analysed" -----------------------------------------
def test_study_runner_reports_unsuitable_input_as_not_analysed(tmp_path: Path) -> None:
    from node.work.runner import OnnxStudyRunner
    from pipelines.dicom import Equipment
    from pipelines.runtime import ModelRegistry, bundled_models_dir

    runner = OnnxStudyRunner(
        ModelRegistry(bundled_models_dir()),
        Equipment(manufacturer="dicom-ai-node", model_name="test", software_versions="0", device_uid=generate_uid()),
    )
    gap = _series(20)
    del gap[10]  # selection reads headers only; the gap shows when the volume is loaded
    files = [_save(ds, tmp_path / f"{k}.dcm") for k, ds in enumerate(gap)]

    outcome = runner.run("lung-seg", {str(gap[0].SeriesInstanceUID): files}, {"seg"})

    assert outcome.datasets == []
    assert outcome.not_analysed is not None and outcome.not_analysed.startswith("uneven-spacing: ")

    short = [_save(ds, tmp_path / f"short-{k}.dcm") for k, ds in enumerate(_series(4))]
    outcome = runner.run("lung-seg", {"1.2.3.4": short}, {"seg"})

    assert outcome.not_analysed is not None and outcome.not_analysed.startswith("no-suitable-series: ")
    assert "4 slices, at least 16 needed" in outcome.not_analysed


def test_study_runner_leaves_a_localizer_that_shares_the_series_out_of_the_volume(tmp_path: Path) -> None:
    from node.work.runner import OnnxStudyRunner
    from pipelines.dicom import Equipment
    from pipelines.runtime import ModelRegistry, bundled_models_dir

    runner = OnnxStudyRunner(
        ModelRegistry(bundled_models_dir()),
        Equipment(manufacturer="dicom-ai-node", model_name="test", software_versions="0", device_uid=generate_uid()),
    )
    slices = _series(20)
    localizer = _localizer(slices[0].SeriesInstanceUID)
    files = [_save(ds, tmp_path / f"{k}.dcm") for k, ds in enumerate([localizer, *slices])]

    outcome = runner.run("lung-seg", {str(slices[0].SeriesInstanceUID): files}, {"seg"})

    # Analysed (a tiny synthetic series, so the model may find no lung; what matters is that it ran).
    assert outcome.not_analysed is None and outcome.model_s is not None
    (seg,) = outcome.datasets
    referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {ds.SOPInstanceUID for ds in slices}


def test_one_image_model_takes_the_frontal_image_of_a_series_that_also_holds_the_lateral() -> None:
    from pipelines.select import usable_instances

    series_uid = generate_uid()
    pixels = _noise(5)
    views = [_projection(pixels, view=v, series_uid=series_uid) for v in ("LL", "PA", "LL")]
    assert usable_instances(views, "classification", ["CR", "DX"]) == [1]
    assert usable_instances([views[0]], "classification", ["CR", "DX"]) == []  # lateral only: nothing to take
