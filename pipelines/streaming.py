"""Analyse slices of a 2D segmentation model as they are stored, before their study is complete.

The node's worker process calls these on instances that arrived (``node/work/prefetch.py``): each
slice is read as the job will read it (:func:`pipelines.volume.load_volume`, decode and rescale), its
label rows are computed with :func:`pipelines.segmentation.infer_slice_batch` and kept in a
:class:`~pipelines.slicecache.SliceCache` under the key the job computes from its volume. When the
study is complete, :func:`~pipelines.segmentation.infer_labelmap` takes them from there; what is not
there (not yet analysed, or pixels that differ: a replaced duplicate) is computed as before. The
result is the same either way: only the rows of the same slice, model, flips and spacing are reused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread

from pipelines.enums import Task
from pipelines.notanalysed import NotAnalysable
from pipelines.runtime import LoadedModel
from pipelines.segmentation import DEFAULT_BATCH_SIZE, infer_slice_batch, label_dtype, standard_flips
from pipelines.slicecache import SliceCache, slice_context, slice_keys, slices_independent
from pipelines.volume import inverted_on_load, load_volume

__all__ = ["StoredSlice", "infer_slices", "prefetch_slices", "read_stored_slice", "streams"]


def streams(model: LoadedModel) -> bool:
    """Whether slices of this model can be analysed as they arrive (a segmentation of independent slices).

    On the CPU only: there a slice's output does not depend on the slices batched with it (the tests check
    it on the real model); GPU libraries choose convolution algorithms by the batch's shape, which may change
    the last bits of a probability, and so a label at a tie.
    """
    return (
        model.manifest.task is Task.SEGMENTATION
        and slices_independent(model.manifest)
        and model.providers_in_use[:1] == ("CPUExecutionProvider",)
    )


@dataclass(frozen=True)
class StoredSlice:
    """One stored slice, decoded as the job decodes it, with the key its label rows are kept under."""

    key: str
    #: Slices of one group share flips, spacing, size and dtype: they may be run in one batch.
    group: tuple[bytes, str]
    pixels: np.ndarray
    flips: tuple[bool, bool]
    spacing_rc_mm: tuple[float, float]


def read_stored_slice(model: LoadedModel, item: Dataset | Path | str) -> StoredSlice | None:
    """Read one single-frame instance as the job would; None when its rows cannot be computed ahead.

    None for a multi-frame object (it arrives whole: nothing to gain), a modality the model does not
    take, an image whose pixels depend on the whole series (MONOCHROME1 that is not quantitative is
    inverted around the range of the volume), no valid pixel spacing, or a slice that is not axial: the
    job decides about those as before. An unreadable file raises.
    """
    manifest = model.manifest
    ds = item if isinstance(item, Dataset) else dcmread(item)
    if int(ds.get("NumberOfFrames", 1) or 1) != 1 or "PixelData" not in ds:
        return None
    if str(ds.get("Modality", "")).strip() not in manifest.modalities or inverted_on_load(ds):
        return None
    try:
        volume = load_volume([ds])
        flips = standard_flips(volume)
    except NotAnalysable:
        return None
    if not volume.in_plane_spacing.known or volume.pixels.shape[0] != 1:
        return None
    shape = (int(volume.pixels.shape[1]), int(volume.pixels.shape[2]))
    spacing_rc = (float(volume.spacing_mm[1]), float(volume.spacing_mm[2]))
    context = slice_context(manifest, flips, spacing_rc, shape)
    pixels = volume.pixels[0]
    (key,) = slice_keys(context, [pixels])
    return StoredSlice(key, (context, pixels.dtype.str), pixels, flips, spacing_rc)


def infer_slices(
    model: LoadedModel,
    slices: Sequence[StoredSlice],
    cache: SliceCache,
    batch_size: int | None = None,
    go_on: Callable[[], bool] | None = None,
) -> list[str]:
    """Compute and store the label rows of ``slices`` (those of one group batched together).

    ``go_on`` is asked before each batch: when it answers False (a job is waiting for the model) the
    rest is left. Returns the keys stored.
    """
    batch = batch_size or model.manifest.batch_size or DEFAULT_BATCH_SIZE
    dtype = label_dtype(model.manifest)
    groups: dict[tuple[bytes, str], list[StoredSlice]] = {}
    for s in slices:
        groups.setdefault(s.group, []).append(s)
    done: list[str] = []
    for members in groups.values():
        for start in range(0, len(members), batch):
            if go_on is not None and not go_on():
                return done
            chunk = members[start : start + batch]
            rows = infer_slice_batch(model, np.stack([s.pixels for s in chunk]), chunk[0].flips, chunk[0].spacing_rc_mm)
            for s, slice_rows in zip(chunk, rows, strict=True):
                # The cast a label map's assignment makes (infer_labelmap stores its rows as they are kept).
                cache.put(s.key, np.ascontiguousarray(slice_rows).astype(dtype))
                done.append(s.key)
    return done


def prefetch_slices(
    model: LoadedModel, items: Sequence[Dataset | Path | str], cache: SliceCache, batch_size: int | None = None
) -> int:
    """Read ``items`` and store the rows of those not in ``cache`` yet; returns how many were computed."""
    pending = [s for s in (read_stored_slice(model, item) for item in items) if s is not None and s.key not in cache]
    return len(infer_slices(model, pending, cache, batch_size))
