"""Procedural mammograms (bright = dense, MONOCHROME2 "for presentation") of known BI-RADS density.

A breast outline (a half-ellipse against the chest wall, left or right side of the image) over a
dark background, a skin line, fatty tissue, and fibroglandular tissue drawn as a smoothed random
field thresholded to a chosen dense fraction: A < 25 %, B 25-50 %, C 50-75 %, D > 75 % of the
breast. MLO-like images add a bright pectoral muscle in the upper chest-wall corner. Exposure,
blur and noise vary. Values are 12-bit like (0..4095).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

CATEGORIES = ("A", "B", "C", "D")


@dataclass
class MammoPhantom:
    image: np.ndarray
    category: str
    dense_fraction: float


def make_mammo_phantom(rng: np.random.Generator, size: int = 256, category: str | None = None) -> MammoPhantom:
    category = category or CATEGORIES[int(rng.integers(4))]
    k = CATEGORIES.index(category)
    fraction = rng.uniform(0.02 + 0.25 * k, 0.23 + 0.25 * k if k < 3 else 0.95)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    depth, half_h, cy = rng.uniform(0.55, 0.9), rng.uniform(0.38, 0.48), 0.5 + rng.normal(0, 0.03)
    breast = (x / depth) ** 2 + ((y - cy) / half_h) ** 2 <= 1.0
    air = rng.uniform(0.01, 0.04)
    fat = rng.uniform(0.2, 0.32)
    dense = fat * rng.uniform(1.9, 2.4)

    field = ndi.gaussian_filter(rng.normal(size=(size, size)), rng.uniform(3, 8) * size / 256)
    # Glandular tissue concentrates behind the nipple: bias the field towards the breast's centre.
    field += 0.6 * field.std() * (1 - np.sqrt((x / depth) ** 2 + ((y - cy) / half_h) ** 2))
    inside = field[breast]
    threshold = np.quantile(inside, 1 - fraction)
    glandular = breast & (field >= threshold)
    img = np.where(breast, fat, air).astype(np.float32)
    img[glandular] = dense
    img += breast * 0.05 * (field - field.mean()) / (field.std() + 1e-6) * fat  # tissue texture
    # Thinner tissue at the edge looks darker (compression falls off towards the skin).
    edge = ndi.distance_transform_edt(breast) / size
    img = np.where(breast, air + (img - air) * np.clip(edge / 0.04, 0.4, 1.0), img)
    if rng.random() < 0.5:  # MLO: pectoral muscle in the upper corner at the chest wall
        pect = (x / rng.uniform(0.15, 0.3) + y / rng.uniform(0.3, 0.5)) < 1.0
        img[pect & breast] = dense * rng.uniform(0.95, 1.1)
    img = ndi.gaussian_filter(img, rng.uniform(0.5, 1.2))
    img += rng.normal(0, rng.uniform(0.004, 0.015), img.shape)
    if rng.random() < 0.5:  # right breast / other side: chest wall on the image's right
        img = img[:, ::-1]
    image = np.clip(img * 4095 * rng.uniform(0.9, 1.1), 0, 4095).astype(np.float32)
    return MammoPhantom(image=image, category=category, dense_fraction=float(glandular.sum() / breast.sum()))
