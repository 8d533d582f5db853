"""Segmentation pipeline: a CT (or any) volume -> label map aligned with its slices, plus statistics.

The network sees 2D slices in the standard radiological orientation (rows run anterior to
posterior, columns patient right to left), in batches; its per-class probabilities are resampled
linearly back to the image grid before the argmax, so the mask edge is not blocky. Post-processing
keeps the largest 3D components and fills holes slice by slice as the manifest asks.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage as ndi

from pipelines.manifest import ModelManifest, OutputKind
from pipelines.modelinput import check_modality, model_input
from pipelines.notanalysed import NotAnalysable, NotAnalysedReason
from pipelines.outline import trace_outline
from pipelines.preprocess import resize_slices
from pipelines.results import ModelIdentity, SegmentationResult, SegmentDefinition, SegmentStatistics
from pipelines.runtime import LoadedModel
from pipelines.slicecache import SliceCache, slice_context, slice_keys, slices_independent
from pipelines.volume import Volume

DEFAULT_BATCH_SIZE = 16


def standard_flips(volume: Volume) -> tuple[bool, bool]:
    """Whether rows / columns must be flipped to show the patient as the models were trained.

    Trained orientation: columns run to the patient's left (+x in LPS) and rows to posterior (+y).
    Axial series acquired feet-first or reconstructed mirrored differ only by such flips.
    """
    row_dir, col_dir = np.asarray(volume.row_direction, float), np.asarray(volume.column_direction, float)
    if abs(volume.slice_direction[2]) < 0.8:
        raise NotAnalysable(
            NotAnalysedReason.NO_SUITABLE_SERIES,
            f"slices are not axial (normal {np.round(np.asarray(volume.slice_direction, float), 2).tolist()})",
        )
    return bool(col_dir[1] < 0), bool(row_dir[0] < 0)


def _to_image_grid(manifest: ModelManifest, maps: np.ndarray, shape: tuple[int, int], spacing_rc_mm) -> np.ndarray:
    """Undo the input geometry (resize, or resample + crop) for (B, C, h, w) maps."""
    pre = manifest.preprocessing
    if pre.spacing_mm is None:
        return resize_slices(maps, shape)
    # The model grid covers size * target spacing around the image centre.
    zoom = [1.0, 1.0, pre.spacing_mm[0] / spacing_rc_mm[0], pre.spacing_mm[1] / spacing_rc_mm[1]]
    full = ndi.zoom(maps, zoom, order=1, grid_mode=True, mode="nearest")
    out = np.zeros((*maps.shape[:2], *shape), np.float32)
    out[:, 0] = 1.0  # background outside the model's field of view
    r, c = min(full.shape[2], shape[0]), min(full.shape[3], shape[1])
    sr, sc = (full.shape[2] - r) // 2, (full.shape[3] - c) // 2
    dr, dc = (shape[0] - r) // 2, (shape[1] - c) // 2
    out[:, :, dr : dr + r, dc : dc + c] = full[:, :, sr : sr + r, sc : sc + c]
    return out


def label_numbers(manifest: ModelManifest) -> np.ndarray:
    """Label number of each class index of the output (0 = background)."""
    return np.array([0] + [label.number for label in manifest.outputs[0].labels])


def label_dtype(manifest: ModelManifest) -> type[np.unsignedinteger]:
    """The dtype of the label map: uint8, or uint16 for label numbers above 255."""
    return np.uint8 if label_numbers(manifest).max() < 256 else np.uint16


def infer_slice_batch(
    model: LoadedModel,
    chunk: np.ndarray,
    flips: tuple[bool, bool],
    spacing_rc: tuple[float, float],
    clock: _Stopwatch | None = None,
) -> np.ndarray:
    """Label rows of a batch of slices (B, rows, cols) in modality units, in the slices' own orientation.

    The rows come in the network's own integer type; stored into a label map of :func:`label_dtype`.

    Each slice's rows depend on that slice, ``flips``, ``spacing_rc`` and the model only (see
    :func:`pipelines.slicecache.slices_independent` for the one exception), which is what lets slices be
    analysed as they arrive and batched in any grouping.
    """
    clock = clock or _Stopwatch(None)
    manifest = model.manifest
    flip_rows, flip_cols = flips
    rows, cols = chunk.shape[1:]
    out = manifest.outputs[0]
    numbers = label_numbers(manifest)
    if flip_rows:
        chunk = chunk[:, ::-1]
    if flip_cols:
        chunk = chunk[:, :, ::-1]
    x = model_input(manifest, chunk, spacing_rc)
    clock.lap("preprocess_s")
    result = model.run(x)[0]
    clock.lap("inference_s")
    if out.kind is OutputKind.LABELMAP:
        low = result.reshape(result.shape[0], *result.shape[-2:])
        grid = low if low.shape[1:] == (rows, cols) else _nearest_to_grid(low, (rows, cols))
    else:
        # Class index k of the output channel axis is label number k (0 = background).
        grid = numbers[_to_image_grid(manifest, result.astype(np.float32), (rows, cols), spacing_rc).argmax(1)]
    if flip_rows:
        grid = grid[:, ::-1]
    if flip_cols:
        grid = grid[:, :, ::-1]
    return grid


def infer_labelmap(
    model: LoadedModel,
    volume: Volume,
    batch_size: int | None = None,
    timings: dict[str, float] | None = None,
    cache: SliceCache | None = None,
) -> np.ndarray:
    """Run the network slice batch by slice batch; returns a uint8/uint16 label map like ``volume.pixels``.

    ``timings``, when given, accumulates seconds spent in ``preprocess_s``, ``inference_s`` and
    ``postprocess_s`` (the benchmark's breakdown).

    ``cache``, when given, holds label rows of single slices computed before (while the study arrived):
    a slice whose key (:func:`pipelines.slicecache.slice_keys`: model, manifest, flips, spacing, size and
    its own pixel values) is there is not run again; the slices that are not are run in batches and
    their rows stored. Not used when the model's slices are not independent of each other.
    """
    clock = _Stopwatch(timings)
    manifest = model.manifest
    flips = standard_flips(volume)
    pixels = volume.pixels
    n, rows, cols = pixels.shape
    spacing_rc = (float(volume.spacing_mm[1]), float(volume.spacing_mm[2]))
    labelmap = np.zeros(pixels.shape, dtype=label_dtype(manifest))
    batch = batch_size or manifest.batch_size or DEFAULT_BATCH_SIZE
    if cache is None or not slices_independent(manifest):
        for start in range(0, n, batch):
            labelmap[start : start + batch] = infer_slice_batch(
                model, pixels[start : start + batch], flips, spacing_rc, clock
            )
            clock.lap("postprocess_s")
        return labelmap
    keys = slice_keys(slice_context(manifest, flips, spacing_rc, (rows, cols)), pixels)

    def take(index: int) -> bool:
        found = cache.get(keys[index])
        if found is None or found.shape != (rows, cols) or found.dtype != labelmap.dtype:
            return False
        labelmap[index] = found
        return True

    # Reading and decompressing entries releases the GIL: one reader per core, each into its own slice.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        missing = [index for index, taken in enumerate(pool.map(take, range(n))) if not taken]
    clock.lap("preprocess_s")
    for start in range(0, len(missing), batch):
        chosen = missing[start : start + batch]
        # Runs of neighbouring slices are views; scattered slices are gathered (a copy).
        chunk = pixels[chosen[0] : chosen[-1] + 1] if chosen[-1] - chosen[0] == len(chosen) - 1 else pixels[chosen]
        labelmap[chosen] = infer_slice_batch(model, chunk, flips, spacing_rc, clock)
        for index in chosen:
            cache.put(keys[index], labelmap[index])
        clock.lap("postprocess_s")
    return labelmap


class _Stopwatch:
    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings = timings
        self.last = time.perf_counter()

    def lap(self, key: str) -> None:
        now = time.perf_counter()
        if self.timings is not None:
            self.timings[key] = self.timings.get(key, 0.0) + now - self.last
        self.last = now


def _nearest_to_grid(low: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    r_idx = np.minimum((np.arange(shape[0]) + 0.5) * low.shape[1] / shape[0], low.shape[1] - 1).astype(int)
    c_idx = np.minimum((np.arange(shape[1]) + 0.5) * low.shape[2] / shape[1], low.shape[2] - 1).astype(int)
    return low[:, r_idx][:, :, c_idx]


#: 3D structure that connects voxels within a slice only (4-connected): one labelling call labels every
#: slice of a slab separately, which is what "fill holes slice by slice" needs.
_IN_PLANE = np.zeros((3, 3, 3), bool)
_IN_PLANE[1] = ndi.generate_binary_structure(2, 1)
#: Slices per slab: bounds temporary arrays (and the int32 label array of a slab's background).
_SLAB = 32


def _slabs(n: int, size: int = _SLAB) -> list[slice]:
    """Runs of slices processed together, so that no temporary array spans the whole volume."""
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _bounding_box(labelmap: np.ndarray, number: int) -> tuple[slice, slice, slice] | None:
    """The smallest box (slices, rows, columns) that holds segment ``number``; None when it is empty."""
    in_slice = np.zeros(labelmap.shape[0], bool)
    in_row = np.zeros(labelmap.shape[1], bool)
    in_col = np.zeros(labelmap.shape[2], bool)
    for slab in _slabs(labelmap.shape[0]):
        mask = labelmap[slab] == number
        in_slice[slab] = mask.any(axis=(1, 2))
        in_row |= mask.any(axis=(0, 2))
        in_col |= mask.any(axis=(0, 1))
    if not in_slice.any():
        return None
    box = [np.flatnonzero(hit) for hit in (in_slice, in_row, in_col)]
    return (slice(int(box[0][0]), int(box[0][-1]) + 1), slice(int(box[1][0]), int(box[1][-1]) + 1),
            slice(int(box[2][0]), int(box[2][-1]) + 1))  # fmt: skip


def _coarse_any(mask: np.ndarray, factor: int) -> np.ndarray:
    """In-plane ``factor`` x ``factor`` blocks of a (slices, rows, columns) mask: True where any voxel is."""
    if factor == 1:
        return mask
    n, rows, cols = mask.shape
    if rows % factor or cols % factor:
        padded = np.zeros((n, -(-rows // factor) * factor, -(-cols // factor) * factor), bool)
        padded[:, :rows, :cols] = mask
        mask = padded
    out = mask[:, ::factor, ::factor].copy()
    for dr in range(factor):
        for dc in range(factor):
            if dr or dc:
                np.logical_or(out, mask[:, dr::factor, dc::factor], out=out)
    return out


def keep_largest_components(labelmap: np.ndarray, number: int, keep: int, coarse: int = 2) -> None:
    """Set all but the ``keep`` largest 3D components of segment ``number`` to background, in place.

    Components are found on ``coarse`` x ``coarse`` in-plane blocks (4x fewer voxels to label on a
    512 matrix): an island within ``coarse`` pixels of a kept component counts as part of it.
    """
    box = _bounding_box(labelmap, number)
    if box is None:
        return
    sub = labelmap[box]
    slabs = _slabs(sub.shape[0])
    components, n = ndi.label(np.concatenate([_coarse_any(sub[s] == number, coarse) for s in slabs]))
    if n <= keep:
        return
    # Component sizes from their bounding boxes: cheap, as all but the kept ones are small islands.
    sizes = np.zeros(n + 1, np.int64)
    regions = ndi.find_objects(components)
    for index, region in enumerate(regions, start=1):
        if region is not None:
            sizes[index] = int(np.count_nonzero(components[region] == index))
    kept = set((np.argsort(sizes)[::-1][:keep]).tolist())
    # Clear each dropped island within its own (coarse) bounding box: they are small, the volume is not.
    for index, region in enumerate(regions, start=1):
        if region is None or index in kept:
            continue
        island = components[region] == index
        if coarse > 1:
            island = island.repeat(coarse, axis=1).repeat(coarse, axis=2)
        fine = (region[0],) + tuple(slice(r.start * coarse, r.stop * coarse) for r in region[1:])
        part = sub[fine]
        island = island[:, : part.shape[1], : part.shape[2]]  # the last block may overhang the box
        part[island & (part == number)] = 0


def fill_holes_per_slice(labelmap: np.ndarray, number: int) -> None:
    """Background enclosed by segment ``number`` within a slice becomes that segment, in place.

    A hole is a background region of a slice that does not reach the edge of the segment's bounding
    box; other segments inside stay themselves. Equivalent to ``binary_fill_holes`` per slice, but one
    labelling call per slab of slices instead of iterated dilations per slice.
    """
    box = _bounding_box(labelmap, number)
    if box is None:
        return
    sub = labelmap[box]

    def fill(s: slice) -> None:
        slab = sub[s]
        outside, _ = ndi.label(slab != number, structure=_IN_PLANE)
        edge = np.zeros(int(outside.max()) + 1, bool)
        for face in (outside[:, 0, :], outside[:, -1, :], outside[:, :, 0], outside[:, :, -1]):
            edge[face] = True
        edge[0] = True  # label 0 is the segment itself
        slab[~edge[outside] & (slab == 0)] = number

    # Slabs hold different slices, so they are independent: one per core.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(fill, _slabs(sub.shape[0])))


#: Components are found on in-plane blocks of about this size (mm): islands closer than that to a kept
#: component count as part of it, and a 512 matrix has 9-16x fewer voxels to label.
COMPONENT_GRID_MM = 2.5


def component_grid(spacing_rc_mm: tuple[float, float]) -> int:
    """In-plane block size (pixels) for :func:`keep_largest_components` at this pixel spacing."""
    return max(1, int(COMPONENT_GRID_MM / max(spacing_rc_mm)))


def postprocess(
    labelmap: np.ndarray, manifest: ModelManifest, spacing_rc_mm: tuple[float, float] = (1.0, 1.0)
) -> np.ndarray:
    """Keep the largest 3D components of each segment and fill holes slice by slice, in place.

    Segments are cleaned in parallel threads (they touch disjoint voxels; SciPy and NumPy release the
    GIL); holes are filled one segment after another, so a hole between two segments goes to the same
    one on every run.
    """
    post = manifest.postprocessing
    numbers = [label.number for label in manifest.segment_labels]
    if post.largest_components:
        grid = component_grid(spacing_rc_mm)
        with ThreadPoolExecutor(max_workers=min(len(numbers), os.cpu_count() or 1)) as pool:
            list(pool.map(lambda n: keep_largest_components(labelmap, n, post.largest_components, grid), numbers))
    if post.fill_holes:
        for number in numbers:
            fill_holes_per_slice(labelmap, number)
    return labelmap


def segment_statistics(volume: Volume, labelmap: np.ndarray, number: int) -> SegmentStatistics:
    """Volume, mean intensity, largest slice and its outline of one segment, a slab at a time."""
    per_slice = np.zeros(labelmap.shape[0], np.int64)
    total = 0.0
    for s in _slabs(labelmap.shape[0]):
        mask = labelmap[s] == number
        per_slice[s] = mask.sum(axis=(1, 2))
        total += float(volume.pixels[s].sum(where=mask, dtype=np.float64))
    count = int(per_slice.sum())
    largest = int(np.argmax(per_slice))
    return SegmentStatistics(
        number=number,
        volume_ml=count * volume.voxel_volume_ml,
        mean_intensity=total / count if count else 0.0,
        intensity_unit="[hnsf'U]" if volume.modality == "CT" else "1",
        largest_slice_index=largest,
        outline_rc=trace_outline(labelmap[largest] == number) if count else np.zeros((0, 2)),
    )


def segment(
    model: LoadedModel,
    volume: Volume,
    batch_size: int | None = None,
    timings: dict[str, float] | None = None,
    cache: SliceCache | None = None,
) -> SegmentationResult:
    """Segment ``volume`` with a segmentation model (``cache``: label rows of slices analysed before).

    Raises
    ------
    NotAnalysable
        Wrong modality, no pixels, slices that are not axial, or no valid pixel spacing.
    """
    manifest = model.manifest
    check_modality(manifest, volume)
    if not volume.in_plane_spacing.known:
        # Volumes in mL and areas in mm2 need it; assuming 1 mm turned a 0\\0 spacing into 3,571 mL of lung.
        raise NotAnalysable(
            NotAnalysedReason.UNKNOWN_PIXEL_SPACING,
            f"model {manifest.name} measures in millimetres; the series has no valid Pixel Spacing",
        )
    labelmap = infer_labelmap(model, volume, batch_size, timings, cache)
    clock = _Stopwatch(timings)
    postprocess(labelmap, manifest, (float(volume.spacing_mm[1]), float(volume.spacing_mm[2])))
    segments = [
        SegmentDefinition(
            number=label.number,
            label=label.name,
            category=label.category.to_code(),
            property_type=label.type.to_code(),
            laterality=label.laterality.to_code() if label.laterality else None,
        )
        for label in manifest.segment_labels
    ]
    with ThreadPoolExecutor(max_workers=min(len(segments), os.cpu_count() or 1) or 1) as pool:
        statistics = list(pool.map(lambda s: segment_statistics(volume, labelmap, s.number), segments))
    clock.lap("postprocess_s")
    return SegmentationResult(
        model=ModelIdentity.of(manifest), volume=volume, labelmap=labelmap, segments=segments, statistics=statistics
    )
