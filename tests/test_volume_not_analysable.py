"""Unsuitable input to load_volume (pipelines/volume.py): "not analysed" with a specific reason, never a crash.

Datasets are built in the test (tests/support/series.py); damaged compressed frames are made with
pydicom's encoders, the retired JPEG processes with DCMTK (skipped where it is not installed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from pipelines.notanalysed import NotAnalysable, NotAnalysedReason
from pipelines.pixeldata import pixel_data_problem
from pipelines.volume import load_volume
from tests.support.peers import dcmtk
from tests.support.series import (
    SIZE,
    ct_series,
    ct_slice,
    enhanced_ct,
    localizer_slice,
    noise,
    projection,
    save,
    slice_pixels,
)


def _not_analysable(datasets: Sequence[Dataset | str | Path], **kwargs: object) -> NotAnalysable:
    with pytest.raises(NotAnalysable) as info:
        load_volume(datasets, **kwargs)  # type: ignore[arg-type]
    return info.value


# -- unsuitable input: "not analysed" with a specific reason, never another exception -----------
def test_fewer_slices_than_the_pipeline_needs_is_too_few_slices() -> None:
    error = _not_analysable(ct_series(5), min_slices=16)

    assert error.outcome.reason is NotAnalysedReason.TOO_FEW_SLICES
    assert "5 slice" in error.outcome.detail and "16" in error.outcome.detail


def test_enough_slices_is_not_too_few() -> None:
    assert load_volume(ct_series(16), min_slices=16).pixels.shape[0] == 16


def test_series_without_instances_is_too_few_slices() -> None:
    assert _not_analysable([]).outcome.reason is NotAnalysedReason.TOO_FEW_SLICES


def test_missing_slice_is_uneven_spacing() -> None:
    slices = ct_series(12)
    del slices[6]

    error = _not_analysable(slices)

    assert error.outcome.reason is NotAnalysedReason.UNEVEN_SPACING
    assert "5.00" in error.outcome.detail and "2.50" in error.outcome.detail


def test_sheared_slice_positions_are_gantry_tilt() -> None:
    # A tilted gantry keeps axial-looking images but shifts each slice along y: the stack is sheared.
    tilt = np.radians(15)
    slices = [
        ct_slice((0.0, k * 2.5 * np.sin(tilt), k * 2.5 * np.cos(tilt)), pixels=slice_pixels(k), series_uid="1.2.3")
        for k in range(8)
    ]
    error = _not_analysable(slices)

    assert error.outcome.reason is NotAnalysedReason.GANTRY_TILT
    assert "15.0 degrees" in error.outcome.detail


def test_gantry_detector_tilt_attribute_is_gantry_tilt() -> None:
    slices = ct_series(8)
    for ds in slices:
        ds.GantryDetectorTilt = 12.5

    error = _not_analysable(slices)

    assert error.outcome.reason is NotAnalysedReason.GANTRY_TILT
    assert "12.5" in error.outcome.detail


def test_instance_without_pixel_data_is_missing_pixel_data(tmp_path: Path) -> None:
    slices = ct_series(6)
    del slices[3].PixelData
    assert _not_analysable(slices).outcome.reason is NotAnalysedReason.MISSING_PIXEL_DATA

    # The same through files, as the spool hands them over.
    header_only = ct_series(1)[0]
    del header_only.PixelData
    path = save(header_only, tmp_path / "header.dcm")
    assert _not_analysable([path]).outcome.reason is NotAnalysedReason.MISSING_PIXEL_DATA


def test_colour_image_is_unsupported_photometric() -> None:
    rgb = projection(np.zeros((SIZE, SIZE), np.uint16))
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
    slices = ct_series(6)
    duplicate = ct_slice(slices[2].ImagePositionPatient, pixels=slice_pixels(9), series_uid=slices[0].SeriesInstanceUID)

    error = _not_analysable([*slices, duplicate])

    assert error.outcome.reason is NotAnalysedReason.INCONSISTENT_GEOMETRY
    assert "duplicates" in error.outcome.detail


def test_images_of_different_sizes_are_inconsistent_geometry() -> None:
    slices = ct_series(4)
    slices[1].Rows = slices[1].Columns = SIZE // 2
    slices[1].PixelData = slices[1].PixelData[: len(slices[1].PixelData) // 4]

    assert _not_analysable(slices).outcome.reason is NotAnalysedReason.INCONSISTENT_GEOMETRY


def test_localizer_mixed_into_an_axial_series_is_inconsistent_geometry() -> None:
    slices = ct_series(6)
    localizer = localizer_slice(slices[0].SeriesInstanceUID)

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
        ct_slice((0.0, 0.0, 2.5 * k), pixels=slice_pixels(k), orientation=orientation, series_uid="1.2.3")
        for k in range(4)
    ]

    assert _not_analysable(slices).outcome.reason is NotAnalysedReason.INCONSISTENT_GEOMETRY


def test_image_position_with_a_wrong_number_of_values_is_not_analysable() -> None:
    slices = ct_series(4)
    slices[2].ImagePositionPatient = 5.0  # one value where PS3.3 asks for three

    assert _not_analysable(slices).outcome.reason is NotAnalysedReason.INCONSISTENT_GEOMETRY


def _corrupt(syntax: UID, damage: Callable[[bytes], bytes]) -> Dataset:
    ds = ct_series(1)[0]
    ds.PixelData = noise(0).tobytes()
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
    slices = ct_series(5)
    slices[2] = _corrupt(RLELossless, _first_half)
    slices[2].ImagePositionPatient = [-11.2, -11.2, -35.0]
    slices[2].SeriesInstanceUID = slices[0].SeriesInstanceUID

    assert _not_analysable(slices).outcome.reason is NotAnalysedReason.UNDECODABLE


@pytest.mark.parametrize("process", ["+es", "+ep"], ids=["spectral-selection", "progressive"])
def test_retired_jpeg_processes_are_undecodable(tmp_path: Path, process: str) -> None:
    # DCMTK still writes the retired JPEG processes 6/8 and 10/12; no pydicom plugin decodes them.
    slices = ct_series(1)
    src = save(slices[0], tmp_path / "in.dcm")
    dcmtk("dcmcjpeg", process, src, tmp_path / "out.dcm")

    error = _not_analysable([tmp_path / "out.dcm"])

    assert error.outcome.reason is NotAnalysedReason.UNDECODABLE
    assert "JPEG" in error.outcome.detail


def test_enhanced_multiframe_with_a_missing_frame_position_is_uneven_spacing() -> None:
    ds = enhanced_ct([0.0, 2.5, 5.0, 10.0], noise(1, 4))

    assert _not_analysable([ds]).outcome.reason is NotAnalysedReason.UNEVEN_SPACING


# -- pixel data read from the file only when decoded (a job's headers defer it) ----------------
def _deferred(path: Path) -> Dataset:
    return dcmread(path, defer_size=256)  # as pipelines.headercache.read_header, scaled to the test's small slices


def test_a_file_cut_short_inside_its_pixel_data_is_undecodable_when_its_pixels_are_deferred(tmp_path: Path) -> None:
    paths = [save(ds, tmp_path / f"{k}.dcm") for k, ds in enumerate(ct_series(3))]
    whole = paths[1].read_bytes()
    paths[1].write_bytes(whole[: len(whole) - SIZE * SIZE])  # half of a 16-bit slice's pixels gone
    datasets = [_deferred(p) for p in paths]

    # The header check counts the bytes the file holds, without reading them.
    assert pixel_data_problem(datasets[1]) == (
        f"PixelData has {SIZE * SIZE} bytes; Rows x Columns x Samples per Pixel x Number of Frames x Bits Allocated"
        f" ({SIZE} x {SIZE} x 1 x 1 x 16 bits) need {2 * SIZE * SIZE}"
    )
    assert datasets[1]._dict[Tag("PixelData")].value is None
    error = _not_analysable(datasets)
    assert error.outcome.reason is NotAnalysedReason.UNDECODABLE
    assert str(datasets[1].SOPInstanceUID) in error.outcome.detail


def test_a_deferred_slice_declaring_more_frames_than_its_bytes_is_refused_before_its_frames_are_listed(
    tmp_path: Path,
) -> None:
    ds = ct_series(1)[0]
    ds.NumberOfFrames = 2147483647
    error = _not_analysable([_deferred(save(ds, tmp_path / "huge.dcm"))])

    assert error.outcome.reason is NotAnalysedReason.UNDECODABLE
    assert "Number of Frames" in error.outcome.detail and "need" in error.outcome.detail


def test_released_pixel_data_leaves_the_datasets_and_the_volume_is_the_same(tmp_path: Path) -> None:
    paths = [save(ds, tmp_path / f"{k}.dcm") for k, ds in enumerate(ct_series(4))]
    kept = load_volume([_deferred(p) for p in paths])
    datasets = [_deferred(p) for p in paths]

    released = load_volume(datasets, release_pixel_data=True)

    assert np.array_equal(released.pixels, kept.pixels) and released.pixels.dtype == kept.pixels.dtype
    assert not any("PixelData" in ds for ds in datasets)
    assert all("ImagePositionPatient" in ds for ds in datasets)  # the headers stay
