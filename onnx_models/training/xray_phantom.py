"""Procedural frontal chest radiographs (bright = dense, as MONOCHROME2), with or without a focal opacity.

Anatomy: a soft-tissue trunk with shoulders against a dark direct-exposure background, two lung
fields with domed bases and rounded apices, mediastinum and heart (bulging to the patient's left,
image right on a PA view), spine, posterior rib arcs crossing the lungs, clavicles. Acquisition:
random position and scale, exposure (gamma), blur and quantum-like noise. A positive image has one
focal opacity — an ill-defined blob (one to three overlapping Gaussians) inside a lung field.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi


@dataclass
class XrayPhantom:
    #: Image (rows, columns), float32, 0..~1, bright = dense.
    image: np.ndarray
    has_opacity: bool
    #: (column, row) of the opacity's centre in pixels, None for negatives.
    opacity_center: tuple[float, float] | None


def make_xray_phantom(rng: np.random.Generator, size: int = 256, opacity: bool | None = None) -> XrayPhantom:
    if opacity is None:
        opacity = bool(rng.random() < 0.5)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size  # 0..1
    cx, cy = 0.5 + rng.normal(0, 0.03), 0.52 + rng.normal(0, 0.03)
    s = rng.uniform(0.85, 1.1)
    img = np.full((size, size), rng.uniform(0.02, 0.08), np.float32)

    trunk = (np.abs(x - cx) < 0.42 * s + 0.06 * np.clip((y - 0.15) * 4, 0, 1)) & (y > cy - 0.5 * s)
    img[trunk] = rng.uniform(0.45, 0.6)
    lungs = np.zeros_like(trunk)
    lung_centres = []
    for side in (-1, 1):
        lx, ly = cx + side * 0.19 * s, cy - 0.04 * s
        ax, ay = 0.13 * s * rng.uniform(0.9, 1.1), 0.3 * s * rng.uniform(0.9, 1.05)
        lung = ((x - lx) / ax) ** 2 + ((y - ly) / ay) ** 2 <= 1
        dome = y < ly + ay * 0.75 - 0.06 * np.cos((x - lx) / ax * 1.5)  # diaphragm dome cuts the base
        lungs |= lung & dome
        lung_centres.append((lx, ly, ax, ay))
    img[lungs] = img[lungs] * 0.0 + rng.uniform(0.18, 0.3)
    # Mediastinum and heart (heart bulges to image right = patient left on a PA view).
    med = (np.abs(x - cx) < 0.06 * s) & (y > cy - 0.45 * s)
    heart = ((x - cx - 0.05 * s) / (0.15 * s)) ** 2 + ((y - cy - 0.14 * s) / (0.12 * s)) ** 2 <= 1
    img[med | heart] = rng.uniform(0.6, 0.72)
    # Spine: faint vertical band; ribs: arcs; clavicles.
    img += 0.08 * np.exp(-(((x - cx) / (0.025 * s)) ** 2)) * trunk
    phase = rng.uniform(0, 1)
    for k in range(9):
        ry = cy - 0.3 * s + (k + phase * 0.3) * 0.065 * s
        arc = ry + 0.12 * ((x - cx) / s) ** 2
        band = np.exp(-(((y - arc) / (0.008 * s)) ** 2)) * trunk
        img += rng.uniform(0.04, 0.09) * band
    for side in (-1, 1):
        clav = cy - 0.33 * s - 0.1 * side * (x - cx)
        img += 0.1 * np.exp(-(((y - clav) / (0.012 * s)) ** 2)) * (np.abs(x - cx - side * 0.15 * s) < 0.15 * s)

    centre = None
    if opacity:
        lx, ly, ax, ay = lung_centres[int(rng.integers(2))]
        for _ in range(50):  # a point well inside the chosen lung field
            ox, oy = lx + rng.uniform(-0.7, 0.7) * ax, ly + rng.uniform(-0.6, 0.5) * ay
            if lungs[int(oy * size), int(ox * size)]:
                break
        amp, sigma = rng.uniform(0.12, 0.35), rng.uniform(0.018, 0.07) * s
        blob = np.zeros_like(img)
        for _ in range(int(rng.integers(1, 4))):
            dx, dy = rng.normal(0, sigma * 0.6, 2)
            blob = np.maximum(blob, np.exp(-((x - ox - dx) ** 2 + (y - oy - dy) ** 2) / (2 * sigma**2)))
        img += amp * blob * (lungs | trunk)
        centre = (float(ox * size), float(oy * size))

    img = ndi.gaussian_filter(img, rng.uniform(0.5, 1.5))
    img = np.clip(img, 0, None) ** rng.uniform(0.8, 1.25)
    img += rng.normal(0, rng.uniform(0.005, 0.03), img.shape) * np.sqrt(img + 0.05)
    return XrayPhantom(np.clip(img, 0, 1.5).astype(np.float32), opacity, centre)
