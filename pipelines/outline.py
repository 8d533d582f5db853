"""The outline of a region of a 2D mask, as the SR's SCOORD polylines and the burned-in captures draw it."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def trace_outline(mask: np.ndarray) -> np.ndarray:
    """Outer boundary of the largest 8-connected region of a 2D mask (Moore-neighbour tracing).

    Returns
    -------
    numpy.ndarray
        (points, 2) float array of (column, row) in DICOM image coordinates (the centre of the
        top-left pixel is (0.5, 0.5), as SCOORD uses); the polygon is closed (last point = first).
    """
    components, n = ndi.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return np.zeros((0, 2))
    largest = 1 + int(np.argmax(np.bincount(components.ravel())[1:]))
    m = np.pad(components == largest, 1)
    rows, cols = np.nonzero(m)
    start = (int(rows[0]), int(cols[0]))  # topmost, then leftmost: its west neighbour is background
    # Clockwise on screen (rows grow downwards), starting west.
    dirs = [(0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1)]
    points = [start]
    current, back = start, 0
    for _ in range(4 * m.size):
        for i in range(8):
            d = (back + i) % 8
            nxt = (current[0] + dirs[d][0], current[1] + dirs[d][1])
            if m[nxt]:
                prev = dirs[(back + i - 1) % 8]
                back = dirs.index((current[0] + prev[0] - nxt[0], current[1] + prev[1] - nxt[1]))
                current = nxt
                break
        else:
            break  # a single isolated pixel
        if current == start:
            break
        points.append(current)
    points.append(start)
    rc = np.asarray(points, dtype=float) - 1.0  # undo the padding
    return np.stack([rc[:, 1] + 0.5, rc[:, 0] + 0.5], axis=1)
