"""The label rows of single slices, kept by a key that changes whenever the rows could.

A 2D segmentation model labels each slice from that slice alone: its pixels (in modality units),
the flips that show it in the trained orientation, its in-plane spacing, and the model with its
manifest. Rows computed while a study arrives (:mod:`pipelines.streaming`) are therefore the rows
the whole-volume run would compute, and :func:`~pipelines.segmentation.infer_labelmap` takes them
from a :class:`SliceCache` instead of running the network again.

The key is a digest of all of these, the pixel values included: a duplicate with other pixels, a
new version of the study, another model or manifest can only miss, never hit stale rows. Where the
store is and when it is emptied is the caller's business (the node keeps it in its spool).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from pipelines.manifest import ModelManifest

__all__ = ["CountingCache", "SliceCache", "slice_context", "slice_keys", "slices_independent"]


class SliceCache(Protocol):
    """Label rows of single slices by key (see :func:`slice_keys`)."""

    def get(self, key: str) -> np.ndarray | None:
        """The rows stored under ``key`` (rows x columns, uint8 or uint16), or None."""
        ...

    def put(self, key: str, rows: np.ndarray) -> None:
        """Keep ``rows`` under ``key``; a store that cannot keep them drops them silently (a miss later)."""
        ...

    def __contains__(self, key: object) -> bool: ...


@dataclass
class CountingCache:
    """A :class:`SliceCache` that counts what a run took from it and what it had to compute (thread-safe)."""

    inner: SliceCache
    reused: int = 0
    computed: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def get(self, key: str) -> np.ndarray | None:
        rows = self.inner.get(key)
        if rows is not None:
            with self._lock:
                self.reused += 1
        return rows

    def put(self, key: str, rows: np.ndarray) -> None:
        with self._lock:
            self.computed += 1
        self.inner.put(key, rows)

    def __contains__(self, key: object) -> bool:
        return key in self.inner


def slices_independent(manifest: ModelManifest) -> bool:
    """Whether each slice's labels depend on that slice alone, so rows may be computed one slice at a time.

    Not when the model input is resampled to a fixed spacing: the margin is padded with the minimum of
    the whole batch (:func:`pipelines.preprocess.resample_to_spacing`), so a slice's input depends on
    the slices it is batched with.
    """
    return manifest.preprocessing.spacing_mm is None


def slice_context(
    manifest: ModelManifest, flips: tuple[bool, bool], spacing_rc_mm: tuple[float, float], shape: tuple[int, int]
) -> bytes:
    """Everything besides its pixels that a slice's label rows depend on, as a digest.

    The whole manifest (the model file's SHA-256, preprocessing, outputs and their label numbers), the
    row/column flips, the in-plane spacing and the matrix size.
    """
    what = (manifest.model_dump_json(), [bool(f) for f in flips], [float(s) for s in spacing_rc_mm],
            [int(n) for n in shape])  # fmt: skip
    return hashlib.sha256(repr(what).encode()).digest()


def _key(context: bytes, plane: np.ndarray) -> str:
    # SHA-256: OpenSSL's, with the CPU's SHA instructions, hashes twice as fast as BLAKE2b here (1.8 GB/s);
    # a 300-slice CT is 300 MB of float32 or 150 MB of int16 to hash, in the job after its last instance.
    digest = hashlib.sha256(context)
    digest.update(f"{plane.dtype.str}{plane.shape}".encode())
    digest.update(np.ascontiguousarray(plane).data)  # hashlib releases the GIL on large buffers
    return digest.hexdigest()


def slice_keys(context: bytes, pixels: np.ndarray | Sequence[np.ndarray]) -> list[str]:
    """The key of each slice of ``pixels`` (slices in modality units, as the model is given them).

    The dtype is part of the key: a series whose headers make it float32 never takes rows computed
    from an int16 copy of a slice (they would be equal, but equality is not what the key proves).
    """
    planes = list(pixels)
    if len(planes) < 8:
        return [_key(context, p) for p in planes]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(lambda p: _key(context, p), planes))
