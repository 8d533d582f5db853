"""What a model is given: the check that a volume suits it, and the input tensor made from the volume.

Every pipeline kind (:mod:`~pipelines.segmentation`, :mod:`~pipelines.classification`,
:mod:`~pipelines.svm`) starts here; the intensity and geometry steps themselves are in
:mod:`pipelines.preprocess`, shared with the training scripts.
"""

from __future__ import annotations

import numpy as np

from pipelines.manifest import ModelManifest
from pipelines.notanalysed import NotAnalysable, NotAnalysedReason
from pipelines.preprocess import apply_window, normalise_intensity, resample_to_spacing, resize_slices
from pipelines.volume import Volume


def check_modality(manifest: ModelManifest, volume: Volume) -> None:
    """Refuse a volume of a modality the model does not take, or without a usable image.

    Raises
    ------
    NotAnalysable
        WRONG_MODALITY, or MISSING_PIXEL_DATA for an empty or tiny (under 8 pixels a side) image.
    """
    if volume.modality not in manifest.modalities:
        raise NotAnalysable(
            NotAnalysedReason.WRONG_MODALITY,
            f"model {manifest.name} takes {', '.join(manifest.modalities)}, series is {volume.modality}",
        )
    if volume.pixels.ndim != 3 or volume.pixels.shape[0] == 0 or min(volume.pixels.shape[1:]) < 8:
        raise NotAnalysable(NotAnalysedReason.MISSING_PIXEL_DATA, f"no usable image in array {volume.pixels.shape}")


def model_input(manifest: ModelManifest, pixels: np.ndarray, spacing_rc_mm: tuple[float, float]) -> np.ndarray:
    """Slices (B, rows, cols) in modality units -> the network input tensor (B, C, H, W)."""
    pre = manifest.preprocessing
    if pre.hu_window is not None:
        x = apply_window(pixels, pre.hu_window.center, pre.hu_window.width)
    elif pre.normalisation is not None:
        norm = pre.normalisation
        x = np.stack([normalise_intensity(s, norm.method, norm.low_percentile, norm.high_percentile) for s in pixels])
    else:
        x = pixels.astype(np.float32)
    size = (pre.size[0], pre.size[1])
    if pre.spacing_mm is not None:
        x = resample_to_spacing(x, spacing_rc_mm, (pre.spacing_mm[0], pre.spacing_mm[1]), size)
    else:
        x = resize_slices(x, size)
    x = np.repeat(x[:, None], pre.channels, axis=1)
    return np.ascontiguousarray(x, dtype=np.float32)
