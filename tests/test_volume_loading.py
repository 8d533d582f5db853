"""Series -> volume (pipelines/volume.py): slice order, geometry, pixel values, multi-frame, the real CT.

Most tests build tiny synthetic datasets (tests/support/series.py), so they need no data on disk.
Tests that need the real chest CT take the ``ct_dir`` fixture, which skips with a reason where it is
absent. Unsuitable input is in test_volume_not_analysable.py, compressed input in
test_volume_transfer_syntaxes.py.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from pipelines.volume import load_volume
from tests.support.data import real_series
from tests.support.series import (
    AXIAL,
    AXIAL_NORMAL_TO_FEET,
    CORONAL,
    CR_IMAGE,
    ENHANCED_CT_IMAGE,
    OBLIQUE,
    SIZE,
    assert_same_volume,
    ct_series,
    enhanced_ct,
    projection,
    slice_pixels,
)


# -- slice order and geometry ------------------------------------------------------------------
@pytest.mark.parametrize("numbering", ["reversed", "shuffled", "all-one"])
def test_slices_are_ordered_by_position_not_instance_number(numbering: str) -> None:
    slices = ct_series(12)
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
    slices = ct_series(8)
    feet_up = load_volume(slices)
    for ds, number in zip(slices, range(8, 0, -1), strict=True):
        ds.InstanceNumber = number
    head_down = load_volume(list(reversed(slices)))

    assert_same_volume(head_down, feet_up)
    assert feet_up.origin_mm[2] == pytest.approx(-40.0)  # the lowest slice comes first
    assert np.all(np.diff([feet_up.slice_position_mm(i)[2] for i in range(8)]) > 0)


def test_slices_follow_the_normal_of_their_own_orientation() -> None:
    # With columns running anterior, the slice normal points to the feet: slice 0 is the most cranial.
    slices = ct_series(6, orientation=AXIAL_NORMAL_TO_FEET, origin=(0.0, 0.0, 100.0))
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
    slices = ct_series(5, orientation=orientation, step_mm=3.0)
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
    slices = ct_series(3, orientation=OBLIQUE, pixel_spacing=(0.6, 1.1))
    volume = load_volume(slices)
    ipp = np.asarray(slices[0].ImagePositionPatient, float)
    row_cosine, column_cosine = np.asarray(OBLIQUE[:3]), np.asarray(OBLIQUE[3:])

    for r, c in [(0, 1), (1, 0), (7, 19), (31, 31)]:
        expected = ipp + c * 1.1 * row_cosine + r * 0.6 * column_cosine
        np.testing.assert_allclose((volume.affine() @ [0, r, c, 1])[:3], expected, atol=1e-6)


def test_small_rounding_in_slice_positions_is_tolerated() -> None:
    slices = ct_series(10, step_mm=2.5)
    for k, ds in enumerate(slices):  # scanners round positions to 0.01-0.1 mm
        ds.ImagePositionPatient[2] = round(float(ds.ImagePositionPatient[2]) + (0.1 if k % 3 == 0 else -0.05), 2)

    volume = load_volume(slices)

    assert volume.pixels.shape[0] == 10
    assert volume.spacing_mm[0] == pytest.approx(2.5, abs=0.2)


# -- pixel values --------------------------------------------------------------------------------
def test_rescale_slope_and_intercept_give_hounsfield_units_per_slice() -> None:
    slices = ct_series(3)
    slices[1].RescaleSlope, slices[1].RescaleIntercept = 2, -2048  # CT may rescale each slice differently
    slices[2].RescaleSlope, slices[2].RescaleIntercept = 0.5, -1000.5

    volume = load_volume(slices)

    for k, (slope, intercept) in enumerate([(1, -1024), (2, -2048), (0.5, -1000.5)]):
        np.testing.assert_allclose(volume.pixels[k], slice_pixels(k).astype(float) * slope + intercept)
    assert volume.pixels.dtype == np.float32


def test_a_12_bit_ct_loads_as_int16_hounsfield_units_and_a_wider_range_as_float32() -> None:
    # 12 stored bits, slope 1, intercept -1024: every possible value (-1024..3071 HU) fits int16, half the memory.
    ct = load_volume(ct_series(3))
    assert ct.pixels.dtype == np.int16
    for k in range(3):
        np.testing.assert_array_equal(ct.pixels[k], slice_pixels(k).astype(int) - 1024)

    # 16 stored bits unsigned with the same intercept could reach 64511 HU: int16 would wrap, so float32.
    wide = ct_series(2)
    for ds in wide:
        ds.BitsStored, ds.HighBit = 16, 15
        ds.PixelData = (slice_pixels(int(ds.InstanceNumber) - 1) + 60000).tobytes()
    volume = load_volume(wide)
    assert volume.pixels.dtype == np.float32
    np.testing.assert_array_equal(volume.pixels[1], slice_pixels(1).astype(float) + 60000 - 1024)

    # 16 stored bits unsigned, intercept -32768: 0..65535 becomes -32768..32767, exactly int16's range. Stored
    # values over 32767 do not fit int16 before the intercept is added: their sum must still be exact.
    full = ct_series(2)
    for ds in full:
        ds.BitsStored, ds.HighBit, ds.RescaleIntercept = 16, 15, -32768
        ds.PixelData = (slice_pixels(int(ds.InstanceNumber) - 1).astype(np.uint16) * 16 + 33000).tobytes()
    volume = load_volume(full)
    assert volume.pixels.dtype == np.int16
    stored = slice_pixels(1).astype(np.int64) * 16 + 33000
    assert stored.max() > 32767 and stored.min() > 32767
    np.testing.assert_array_equal(volume.pixels[1], stored - 32768)


def test_missing_rescale_leaves_stored_values() -> None:
    slices = ct_series(2)
    for ds in slices:
        del ds.RescaleSlope, ds.RescaleIntercept

    volume = load_volume(slices)

    np.testing.assert_array_equal(volume.pixels[1], slice_pixels(1))


def test_monochrome1_is_inverted_so_that_higher_values_are_brighter() -> None:
    # MONOCHROME1: the lowest stored value is displayed white (bone on a CR is stored low).
    stored = np.tile(np.arange(SIZE, dtype=np.uint16) * 100, (SIZE, 1))
    stored[10:20, 10:20] = 50  # "bone": displayed bright
    monochrome1 = projection(stored, photometric="MONOCHROME1", modality="CR", sop_class=CR_IMAGE)
    monochrome2 = projection(stored.max() - stored, photometric="MONOCHROME2", modality="CR", sop_class=CR_IMAGE)

    inverted = load_volume([monochrome1]).pixels[0]
    plain = load_volume([monochrome2]).pixels[0]

    np.testing.assert_array_equal(inverted, float(stored.min()) + float(stored.max()) - stored)
    assert inverted[15, 15] > inverted[15, 25]  # the bone is now the brighter
    np.testing.assert_array_equal(inverted, plain)  # and it looks as the same image stored as MONOCHROME2


# -- multi-frame -------------------------------------------------------------------------------
def test_enhanced_multiframe_gives_one_slice_per_frame_in_position_order() -> None:
    z_stored = [5.0, -5.0, 10.0, 0.0, -10.0]  # frames stored out of anatomical order
    frames = np.stack([slice_pixels(int(z // 5) + 2) for z in z_stored])  # pixel[0,0] = 100 * rank by z
    ds = enhanced_ct(z_stored, frames, intercepts=[None, None, -1000.0, None, None])

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


def test_multiframe_without_frame_positions_keeps_stored_frame_order() -> None:
    path = get_testdata_file("rtdose.dcm")  # 15 frames, no functional groups
    assert path
    ds = dcmread(path)

    volume = load_volume([path])

    assert [f.frame_number for f in volume.source_frames] == list(range(1, 16))
    np.testing.assert_array_equal(volume.pixels, ds.pixel_array.astype(np.float32))


# -- the real chest CT -------------------------------------------------------------------------
def test_real_ct_series_loads_sorted_by_position_in_hounsfield_units(ct_dir: Path) -> None:
    paths = real_series(ct_dir, "series-3-B40f")
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
