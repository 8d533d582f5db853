"""Procedural chest CT phantoms in Hounsfield units, and the classical lung mask that labels them.

A phantom is a 3D stack of axial slices from the upper abdomen to the neck: air around a
patient lying on a table; an irregular body outline with subcutaneous fat and muscle; ribs,
spine and sternum; a mediastinum with heart, aorta, trachea and main bronchi; two lungs whose
bases sit on diaphragm domes (so the lowest lung slices are posterior crescents around liver
and spleen), whose apices narrow towards the neck, with vessels, occasional nodules and a
dependent (posterior) density band of up to about -450 HU; bowel and stomach gas below the
diaphragm; partial-volume blur and noise. Pixel spacing varies as a 512-matrix scan with 0.6-0.95 mm pixels would.

Labels come from :func:`classical_lung_mask` applied to the noiseless phantom, split into
left and right by construction — the same definition the tests use as the reference on real CT.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

#: Label values of the lung-seg model (must match onnx_models/lung-seg/model.yaml).
LEFT_LUNG = 1
RIGHT_LUNG = 2


def body_mask(hu: np.ndarray, threshold_hu: float = -500.0) -> np.ndarray:
    """The patient: largest 3D component denser than ``threshold_hu``, holes filled slice by slice."""
    dense = hu > threshold_hu
    labels, n = ndi.label(dense)
    if n == 0:
        return dense
    sizes = np.bincount(labels.ravel())[1:]
    body = labels == (1 + int(np.argmax(sizes)))
    return np.stack([ndi.binary_fill_holes(s) for s in body])


def classical_lung_mask(hu: np.ndarray, threshold_hu: float = -400.0, second_fraction: float = 0.2) -> np.ndarray:
    """Classical lung mask of a CT volume (slices, rows, columns) in HU.

    Air-like voxels (< ``threshold_hu``) inside the body; the largest 3D component, plus the second
    largest when it is at least ``second_fraction`` of the largest (the lungs are two components
    when the trachea does not join them, one when it does; smaller components are bowel or stomach
    gas); vessels and nodules enclosed by lung are filled slice by slice.
    """
    candidates = (hu < threshold_hu) & body_mask(hu)
    labels, n = ndi.label(candidates)
    if n == 0:
        return candidates
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(sizes)[::-1]
    keep = [order[0] + 1]
    if n > 1 and sizes[order[1]] >= second_fraction * sizes[order[0]]:
        keep.append(order[1] + 1)
    lung = np.isin(labels, keep)
    return np.stack([ndi.binary_fill_holes(s) for s in lung])


@dataclass
class CtPhantom:
    #: Noisy HU volume (slices, rows, columns), float32.
    hu: np.ndarray
    #: Label map: 0 background, LEFT_LUNG, RIGHT_LUNG.
    labels: np.ndarray
    #: In-plane pixel spacing in mm.
    pixel_mm: float
    slice_mm: float


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    return ((x - cx) / max(ax, 1e-3)) ** 2 + ((y - cy) / max(ay, 1e-3)) ** 2 <= 1.0


def make_ct_phantom(rng: np.random.Generator, size: int = 256, n_slices: int | None = None) -> CtPhantom:
    """One random chest CT phantom on a ``size`` x ``size`` grid (a 512 scan at half resolution)."""
    pixel_mm = 2.0 * rng.uniform(0.6, 0.95) * 256 / size
    n_slices = n_slices or int(rng.integers(18, 34))
    slice_mm = rng.uniform(270, 330) / n_slices
    coords = (np.arange(size) - size / 2 + 0.5) * pixel_mm
    x, y = np.meshgrid(coords, coords)  # x: columns (patient left), y: rows (posterior)
    theta = np.arctan2(y, x)

    bx, by = rng.normal(0, 12), rng.normal(-5, 12)
    half_w, half_h = rng.uniform(125, 175), rng.uniform(90, 125)
    harmonics = [(k, rng.normal(0, 0.025), rng.uniform(0, 2 * np.pi)) for k in range(2, 6)]
    wobble = 1 + sum(a * np.cos(k * theta + p) for k, a, p in harmonics)
    fat_mm, muscle_mm = rng.uniform(4, 30), rng.uniform(8, 20)
    fat_hu, muscle_hu, soft_hu = rng.uniform(-120, -80), rng.uniform(35, 60), rng.uniform(25, 45)
    liver_hu = rng.uniform(45, 70)
    t_base = rng.uniform(0.08, 0.25)  # lowest lung (posterior recess)
    dome_h = rng.uniform(0.12, 0.25)
    t_apex = rng.uniform(0.8, 0.95)
    t_mid = t_apex - rng.uniform(0.25, 0.35)
    t_carina = rng.uniform(0.55, 0.68)
    lung_hu = [rng.uniform(-880, -760), rng.uniform(-880, -760)]
    contrast = rng.random() < 0.5
    aorta_hu = rng.uniform(150, 300) if contrast else rng.uniform(30, 50)
    table_gap = rng.uniform(3, 25)
    table_arcs = [
        (rng.uniform(0, 10) + 8 * i, rng.uniform(2, 4), rng.uniform(80, 400)) for i in range(rng.integers(1, 4))
    ]
    arms = rng.random() < 0.25
    nodules = [
        (
            int(rng.integers(0, 2)),
            rng.uniform(0.2, 0.8),
            rng.uniform(-0.5, 0.5),
            rng.uniform(-0.5, 0.5),
            rng.uniform(3, 14),
        )
        for _ in range(rng.poisson(0.7))
    ]
    gas = [(rng.uniform(-0.6, 0.6), rng.uniform(-0.7, 0.2), rng.uniform(4, 16), rng.uniform(0, 0.2)) for _ in range(6)]
    stomach_r = rng.uniform(10, 30)
    # Supine patients' dependent (posterior) lung is denser: real CT shows a band at the back of
    # each lung at up to about -500 HU, still air-like for the classical mask (< -400 HU).
    dependent_hu = 380.0 * rng.uniform(0, 1) ** 0.7
    dependent_depth = rng.uniform(0.15, 0.45)

    hu = np.full((n_slices, size, size), -1000.0, dtype=np.float32)
    left = np.zeros((n_slices, size, size), dtype=bool)
    for k in range(n_slices):
        t = (k + 0.5) / n_slices
        # The body narrows a little towards the neck and the abdomen.
        scale_w = 1.0 - 0.12 * max(0.0, t - 0.85) / 0.15 - 0.05 * max(0.0, 0.2 - t) / 0.2
        aw, ah = half_w * scale_w, half_h * (1.0 - 0.1 * max(0.0, t - 0.85) / 0.15)
        r_body = np.sqrt(((x - bx) / aw) ** 2 + ((y - by) / ah) ** 2) / wobble
        body = (r_body <= 1.0) & (y < by + 0.9 * ah)  # flattened back on the table
        sl = np.where(body, fat_hu, -1000.0)
        inner_w, inner_h = aw - fat_mm, ah - fat_mm
        r_inner = np.sqrt(((x - bx) / inner_w) ** 2 + ((y - by) / inner_h) ** 2) / wobble
        sl = np.where(body & (r_inner <= 1.0), muscle_hu, sl)
        cw, ch = inner_w - muscle_mm, inner_h - muscle_mm
        cavity = _ellipse(x, y, bx, by + 3, cw, ch * 0.92)
        sl = np.where(cavity, soft_hu, sl)

        # Table under the patient: curved thin shells, separated from the skin by foam (air-like).
        bottom = by + 0.9 * ah
        for offset, thick, t_hu in table_arcs:
            curve = bottom + table_gap + offset + 0.0009 * (x - bx) ** 2
            shell = (y >= curve) & (y < curve + thick) & (np.abs(x - bx) < 230)
            sl = np.where(shell, t_hu, sl)
        if arms:
            for side in (-1, 1):
                arm = _ellipse(x, y, bx + side * (aw + 45), by - 10, 35, 45)
                sl = np.where(arm & ~body, muscle_hu, sl)
                sl = np.where(_ellipse(x, y, bx + side * (aw + 45), by - 10, 10, 12), 700.0, sl)

        # Lungs: lateral ellipses in the cavity, above the diaphragm domes, narrowing to the apex.
        apex_scale = 1.0 if t <= t_mid else np.sqrt(max(0.0, 1 - ((t - t_mid) / (t_apex - t_mid)) ** 2))
        mid_x = bx + rng.normal(0, 1)
        heart = t < t_base + dome_h + 0.35
        lungs, bases = [], []
        for side in (-1, 1):  # -1: right lung (image left), +1: left lung (image right)
            lcx = bx + side * cw * 0.5
            lax, lay = cw * 0.47 * apex_scale, ch * 0.85 * apex_scale
            lung = _ellipse(x, y, lcx, by + 5 + 0.1 * ch * (1 - apex_scale), lax, lay) & cavity
            dome_cx, dome_cy = lcx - side * 0.1 * cw, by - 0.2 * ch
            dist2 = ((x - dome_cx) ** 2 + (y - dome_cy) ** 2) / (0.55 * cw) ** 2
            base = t_base + dome_h * np.exp(-dist2)
            bases.append(base)
            lung &= t > base
            lung &= np.abs(x - mid_x) > 0.12 * cw  # mediastinum
            if heart:
                lung &= ~_ellipse(x, y, bx + 0.15 * cw, by - 0.15 * ch, 0.42 * cw, 0.5 * ch)
            lungs.append(lung)
        for side, lung in zip((-1, 1), lungs, strict=True):
            base_hu = lung_hu[(side + 1) // 2]
            u = np.clip((y - by) / ch, -1, 1)
            start = 1 - 2 * dependent_depth
            band = np.clip((u - start) / (1 - start), 0, 1) ** 1.5
            dependent = min(dependent_hu, -450.0 - base_hu) * band
            sl = np.where(lung, base_hu + 60.0 * u + dependent, sl)
        left[k] = x > mid_x

        # Below the lungs: liver on the right, stomach with a gas bubble on the left, bowel gas lower.
        # Gas stays a diaphragm's thickness below the lung bases so the two never touch.
        under_diaphragm = t < np.minimum(bases[0], bases[1]) - 0.06
        below = cavity & (t < t_base + dome_h + 0.05)
        liver = below & (x < bx + 0.25 * cw) & ~np.any(lungs, axis=0)
        sl = np.where(liver, liver_hu, sl)
        if t < t_base + dome_h * 0.8 and t > t_base - 0.08:
            stomach = _ellipse(x, y, bx + 0.45 * cw, by - 0.35 * ch, stomach_r, stomach_r * 0.7)
            sl = np.where(stomach & cavity & under_diaphragm, -1000.0, sl)
        for gx, gy, gr, gt in gas:
            if t < gt + 0.05:
                blob = _ellipse(x, y, bx + gx * cw, by + gy * ch, gr, gr * 0.8) & cavity
                sl = np.where(blob & under_diaphragm, -1000.0, sl)

        # Heart and great vessels.
        if heart and t > t_base:
            sl = np.where(
                _ellipse(x, y, bx + 0.15 * cw, by - 0.15 * ch, 0.4 * cw, 0.48 * ch) & ~np.any(lungs, axis=0),
                rng.uniform(35, 50),
                sl,
            )
        sl = np.where(_ellipse(x, y, bx + 0.12 * cw, by + 0.45 * ch, 13, 13), aorta_hu, sl)

        # Airways: trachea above the carina, main bronchi running to the hila just below it.
        tx, ty = bx + 2, by + 0.15 * ch
        if t > t_carina:
            sl = np.where(_ellipse(x, y, tx, ty, 11, 11), 40.0, sl)
            sl = np.where(_ellipse(x, y, tx, ty, 8.5, 8.5), -1000.0, sl)
        elif t > t_carina - 0.12:
            f = (t_carina - t) / 0.12
            for side in (-1, 1):
                sl = np.where(_ellipse(x, y, tx + side * f * 0.35 * cw, ty, 6, 6), -1000.0, sl)

        # Vessels and nodules inside the lungs (soft tissue, filled by the classical mask).
        in_lung = np.any(lungs, axis=0)
        if in_lung.any():
            ys, xs = np.nonzero(in_lung)
            for _ in range(int(rng.integers(15, 50))):
                i = rng.integers(len(xs))
                r = rng.uniform(0.8, 4.0)
                sl = np.where(_ellipse(x, y, coords[xs[i]], coords[ys[i]], r, r), rng.uniform(0, 60), sl)
        for side, zc, nx_, ny_, nr in nodules:
            if abs(t - zc) * slice_mm * n_slices < nr:
                ncx = bx + (2 * side - 1) * cw * (0.5 + 0.3 * nx_)
                sl = np.where(_ellipse(x, y, ncx, by + ny_ * ch, nr, nr) & cavity, 40.0, sl)

        # Bone: spine with canal, ribs along the cavity wall, sternum.
        sx, sy = bx, by + 0.78 * ch
        sl = np.where(_ellipse(x, y, sx, sy, 19, 16), rng.uniform(700, 1100), sl)
        sl = np.where(_ellipse(x, y, sx, sy, 15, 12.5), rng.uniform(200, 350), sl)
        sl = np.where(_ellipse(x, y, sx, sy + 26, 8, 7), 30.0, sl)
        sl = np.where(_ellipse(x, y, sx, sy + 42, 5, 9), 500.0, sl)
        if t > t_base - 0.05:
            phase = 0.35 * np.sin(9 * t)
            for ang in np.linspace(-np.pi, np.pi, 14, endpoint=False) + phase:
                rx, ry = bx + (cw + 6) * np.cos(ang), by + (ch + 4) * np.sin(ang)
                sl = np.where(_ellipse(x, y, rx, ry, 6, 4.5), rng.uniform(400, 1400), sl)
            sl = np.where(_ellipse(x, y, bx, by - ch - 2, 12, 5) & (t < t_apex), 500.0, sl)
        hu[k] = sl

    # Partial volume (the reconstruction's point spread), then labels from the noiseless image.
    blur = rng.uniform(0.4, 1.0)
    hu = ndi.gaussian_filter(hu, sigma=(0, blur, blur))
    lung = classical_lung_mask(hu)
    labels = np.where(lung & left, LEFT_LUNG, np.where(lung, RIGHT_LUNG, 0)).astype(np.uint8)
    noise = rng.normal(0, rng.uniform(5, 60), hu.shape).astype(np.float32)
    if rng.random() < 0.5:  # correlated noise as from a smooth kernel
        noise = ndi.gaussian_filter(noise, sigma=(0, 0.7, 0.7)) * 2.0
    hu = np.clip(hu + noise, -1024, 3071).astype(np.float32)
    return CtPhantom(hu=hu, labels=labels, pixel_mm=pixel_mm, slice_mm=slice_mm)
