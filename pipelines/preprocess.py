"""Turning modality pixels into model input, as a manifest's ``preprocessing`` section declares.

Shared by the pipelines and by the training scripts in ``onnx_models/training`` so that a model
sees at inference exactly what it saw in training.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def apply_window(pixels: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map a window of modality values (e.g. HU) linearly to 0..1, clipping outside it.

    Parameters
    ----------
    pixels
        Modality values (Hounsfield units for CT after Rescale Slope/Intercept).
    center, width
        Window Center / Window Width in the same units, as in DICOM's VOI LUT (linear, without
        DICOM's half-pixel offsets, which do not matter for a float model input).
    """
    low = center - width / 2.0
    return np.clip((pixels.astype(np.float32) - low) / np.float32(width), 0.0, 1.0)


def normalise_intensity(
    pixels: np.ndarray, method: str, low_percentile: float = 1.0, high_percentile: float = 99.0
) -> np.ndarray:
    """Normalise one image (or a stack treated as one) whose values have no physical unit (CR/DX/MG).

    ``zscore``: zero mean, unit standard deviation; ``minmax``: 0..1 over the full range;
    ``percentile``: 0..1 between the given percentiles, clipped.
    """
    x = pixels.astype(np.float32)
    if method == "zscore":
        return (x - x.mean()) / np.float32(max(float(x.std()), 1e-6))
    if method == "minmax":
        lo, hi = float(x.min()), float(x.max())
    elif method == "percentile":
        lo, hi = (float(v) for v in np.percentile(x, [low_percentile, high_percentile]))
    else:
        raise ValueError(f"unknown intensity normalisation method {method!r}")
    return np.clip((x - lo) / np.float32(max(hi - lo, 1e-6)), 0.0, 1.0)


def resize_slices(stack: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize every 2D slice of ``stack`` (..., rows, columns) to ``shape``.

    Integer downsampling averages blocks (area interpolation, which keeps partial-volume
    behaviour predictable: a 512 matrix to 128 averages 4x4 pixels); anything else is linear.
    """
    rows, cols = stack.shape[-2:]
    out_r, out_c = shape
    if (rows, cols) == (out_r, out_c):
        return stack.astype(np.float32, copy=False)
    if rows % out_r == 0 and cols % out_c == 0 and rows >= out_r and cols >= out_c:
        fr, fc = rows // out_r, cols // out_c
        blocks = stack.reshape(*stack.shape[:-2], out_r, fr, out_c, fc).astype(np.float32, copy=False)
        return blocks.mean(axis=(-3, -1))
    zoom = [1.0] * (stack.ndim - 2) + [out_r / rows, out_c / cols]
    return ndi.zoom(stack.astype(np.float32, copy=False), zoom, order=1, grid_mode=True, mode="nearest")


def resample_to_spacing(
    stack: np.ndarray, spacing_mm: tuple[float, float], target_mm: tuple[float, float], shape: tuple[int, int]
) -> np.ndarray:
    """Resample slices to ``target_mm`` pixel spacing, then centre-crop or pad (with the minimum) to ``shape``."""
    zoom = [1.0] * (stack.ndim - 2) + [spacing_mm[0] / target_mm[0], spacing_mm[1] / target_mm[1]]
    res = ndi.zoom(stack.astype(np.float32, copy=False), zoom, order=1, grid_mode=True, mode="nearest")
    return crop_or_pad(res, shape, float(stack.min()) if stack.size else 0.0)


def crop_or_pad(stack: np.ndarray, shape: tuple[int, int], fill: float) -> np.ndarray:
    """Centre-crop or pad the last two axes to ``shape``."""
    out = np.full((*stack.shape[:-2], *shape), fill, dtype=np.float32)
    src_r, src_c = stack.shape[-2:]
    r, c = min(src_r, shape[0]), min(src_c, shape[1])
    sr, sc = (src_r - r) // 2, (src_c - c) // 2
    dr, dc = (shape[0] - r) // 2, (shape[1] - c) // 2
    out[..., dr : dr + r, dc : dc + c] = stack[..., sr : sr + r, sc : sc + c]
    return out
