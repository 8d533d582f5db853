"""The validated-domain profile's statistics: the fast paths give the values of their definitions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from pipelines.domain import IMAGE_STATISTICS, SMOOTHING_PX, image_statistics


def _one_by_one(x01: np.ndarray, names: list[str]) -> np.ndarray:
    """Each statistic from its definition in IMAGE_STATISTICS, with the smoothing and the gradient computed."""
    x = np.clip(np.asarray(x01, np.float64), 0.0, 1.0)
    smooth = ndi.gaussian_filter(x, (0, SMOOTHING_PX, SMOOTHING_PX))
    grad = np.hypot(np.gradient(smooth, axis=1), np.gradient(smooth, axis=2))
    return np.array([IMAGE_STATISTICS[n](x, smooth, grad) for n in names])


@pytest.mark.parametrize(
    "names",
    [
        ["intensity_p50", "intensity_p75", "intensity_p95"],  # the bundled lung model's profile: no gradient
        ["intensity_p05", "intensity_p25"],
        ["intensity_p50", "histogram_entropy_bits", "gradient_p90_log"],
        sorted(IMAGE_STATISTICS),
    ],
)
def test_statistics_equal_their_definitions(names):
    rng = np.random.default_rng(7)
    # Flat regions, a ramp and noise, some of it outside 0..1 (clipped), as preprocessed CT slices have.
    x = np.zeros((4, 64, 64))
    x[:, 16:48, 16:48] = 0.6
    x += np.linspace(-0.2, 1.2, 64)[None, None, :] * 0.3 + rng.normal(0, 0.05, x.shape)
    np.testing.assert_allclose(image_statistics(x, names), _one_by_one(x, names), rtol=0, atol=1e-12)
