"""Geometry helpers of the pipelines: outlines, hot-spot boxes, resizing model input and output."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from pipelines.classification import hotspot_box
from pipelines.outline import trace_outline
from pipelines.preprocess import apply_window, crop_or_pad, normalise_intensity, resize_slices
from pipelines.segmentation import fill_holes_per_slice, keep_largest_components


def test_outline_of_a_square_runs_along_its_border_pixels_and_closes():
    mask = np.zeros((10, 12), bool)
    mask[2:6, 3:8] = True
    outline = trace_outline(mask)
    assert np.array_equal(outline[0], outline[-1])
    cols, rows = (outline[:, 0] - 0.5).astype(int), (outline[:, 1] - 0.5).astype(int)
    border = mask & ~ndi.binary_erosion(mask)
    assert set(zip(rows, cols, strict=True)) == set(zip(*np.nonzero(border), strict=True))
    # Pixel centres in DICOM image coordinates: the top-left mask pixel (row 2, column 3) is (3.5, 2.5).
    assert tuple(outline[0]) == (3.5, 2.5)


def test_outline_follows_a_concave_shape_and_ignores_smaller_islands():
    mask = np.zeros((20, 20), bool)
    mask[2:15, 2:15] = True
    mask[5:15, 7:10] = False  # a notch from below: a U shape
    mask[17:19, 17:19] = True  # a small island elsewhere
    outline = trace_outline(mask)
    cols, rows = (outline[:, 0] - 0.5).astype(int), (outline[:, 1] - 0.5).astype(int)
    assert mask[rows, cols].all()
    assert rows.max() == 14 and cols.max() == 14  # the island is not part of the outline
    assert (rows == 5).sum() >= 3 and any((r, c) == (5, 6) for r, c in zip(rows, cols, strict=True))


def test_outline_of_a_single_pixel_is_that_pixel():
    mask = np.zeros((5, 5), bool)
    mask[2, 3] = True
    assert trace_outline(mask).tolist() == [[3.5, 2.5], [3.5, 2.5]]


def test_hotspot_box_surrounds_the_region_around_the_maximum():
    heat = np.zeros((100, 80))
    heat[10:20, 30:45] = 0.9
    heat[14, 40] = 1.0
    heat[70:90, 5:10] = 0.4  # below half the maximum: not part of the hot spot
    assert hotspot_box(heat) == (30.0, 10.0, 45.0, 20.0)


def test_downsampling_by_an_integer_factor_averages_blocks():
    stack = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    assert resize_slices(stack, (2, 2)).tolist() == [[[2.5, 4.5], [10.5, 12.5]]]


def test_upsampling_keeps_values_within_the_input_range():
    stack = np.random.default_rng(0).random((2, 3, 16, 16)).astype(np.float32)
    out = resize_slices(stack, (64, 48))
    assert out.shape == (2, 3, 64, 48)
    assert out.min() >= stack.min() - 1e-6 and out.max() <= stack.max() + 1e-6


def test_hu_window_maps_window_to_unit_range():
    hu = np.array([-2000.0, -1000.0, -300.0, 400.0, 3000.0])
    assert apply_window(hu, -300, 1400).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_percentile_normalisation_ignores_outliers():
    img = np.concatenate([np.linspace(0, 100, 1000), [1e6]])
    out = normalise_intensity(img, "percentile", 1, 99)
    assert out.min() == 0.0 and out.max() == 1.0 and 0.45 < out[500] < 0.55


def test_crop_or_pad_centres_the_image():
    out = crop_or_pad(np.ones((1, 2, 6), np.float32), (4, 4), fill=0.0)
    assert out[0].tolist() == [[0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]]


def test_hole_filling_per_slice_matches_binary_fill_holes_and_spares_other_segments():
    rng = np.random.default_rng(3)
    blobs = ndi.gaussian_filter(rng.random((6, 64, 80)), (0, 3, 3)) > 0.5
    labelmap = np.where(blobs, 1, 0).astype(np.uint8)
    labelmap[2, 30:34, 40:44] = 2  # another segment inside: it stays itself
    expected = labelmap.copy()
    for k in range(len(expected)):
        filled = ndi.binary_fill_holes(expected[k] == 1)
        expected[k][filled & (expected[k] == 0)] = 1
    assert (expected != labelmap).any(), "the test needs holes"
    fill_holes_per_slice(labelmap, 1)
    assert np.array_equal(labelmap, expected)


def test_largest_component_is_kept_and_distant_islands_removed():
    labelmap = np.zeros((5, 40, 40), np.uint8)
    labelmap[:, 5:25, 5:25] = 1  # the organ
    labelmap[2, 33:36, 33:36] = 1  # an island far from it
    labelmap[0:2, 30:38, 2:6] = 2  # another segment is left alone
    keep_largest_components(labelmap, 1, keep=1)
    assert labelmap[:, 5:25, 5:25].all() and not (labelmap[2, 33:36, 33:36] == 1).any()
    assert (labelmap[0:2, 30:38, 2:6] == 2).all()


@pytest.mark.parametrize("coarse", [1, 2, 3])
def test_keeping_the_largest_components_on_a_coarse_grid_matches_labelling_the_whole_volume(coarse: int):
    # Scattered blobs of two segments over a box whose sides are not multiples of the block size.
    rng = np.random.default_rng(11)
    blobs = ndi.gaussian_filter(rng.random((7, 61, 74)), (0.5, 2, 2))
    labelmap = np.where(blobs > 0.53, 1, np.where(blobs < 0.46, 2, 0)).astype(np.uint8)
    expected = labelmap.copy()
    for number in (1, 2):
        # Reference: components of the block-wise "any" mask (blocks from the segment's bounding box corner),
        # all but the two largest cleared voxel by voxel.
        z, r, c = np.nonzero(labelmap == number)
        box = np.s_[z.min() : z.max() + 1, r.min() : r.max() + 1, c.min() : c.max() + 1]
        n, rows, cols = labelmap[box].shape
        pad = np.zeros((n, -(-rows // coarse) * coarse, -(-cols // coarse) * coarse), bool)
        pad[:, :rows, :cols] = labelmap[box] == number
        blocks = pad.reshape(n, pad.shape[1] // coarse, coarse, pad.shape[2] // coarse, coarse).any(axis=(2, 4))
        components, count = ndi.label(blocks)
        assert count > 3, "the test needs islands"
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        kept = np.isin(components, np.argsort(sizes)[::-1][:2])
        kept = kept.repeat(coarse, axis=1).repeat(coarse, axis=2)[:, :rows, :cols]
        sub = expected[box]
        sub[(sub == number) & ~kept] = 0

    for number in (1, 2):
        keep_largest_components(labelmap, number, keep=2, coarse=coarse)

    assert np.array_equal(labelmap, expected)
