"""The colours of our results, in one place: the SC burns them in, the SEG recommends them to viewers.

A radiologist who sees the right lung blue in the Secondary Capture must see it blue in the SEG too.
"""

from __future__ import annotations

from highdicom.color import CIELabColor

#: Outline colours of segments 1, 2, 3, ... (RGB), distinguishable on grey.
PALETTE: list[tuple[int, int, int]] = [
    (255, 64, 64),
    (64, 160, 255),
    (255, 200, 0),
    (0, 220, 120),
    (220, 80, 255),
    (255, 140, 0),
]
HOT_SPOT_COLOUR = (255, 255, 0)


def segment_colour(number: int) -> tuple[int, int, int]:
    """The RGB colour of segment ``number`` (1-based), in the SC and as the SEG's recommended display colour."""
    return PALETTE[(number - 1) % len(PALETTE)]


def segment_cielab(number: int) -> CIELabColor:
    """Segment ``number``'s colour as the SEG's Recommended Display CIELab Value (PS3.3 C.8.20.2).

    Viewers convert it back to RGB (OHIF through dcmjs); the round trip gives :func:`segment_colour` again.
    """
    return CIELabColor.from_rgb(*segment_colour(number))
