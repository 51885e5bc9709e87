"""One colour per class, shared by the QGIS style and the quick-look so a class looks the same in both.

The colours are matplotlib's ``tab10`` (Vega's category10): distinct on aerial imagery and for the
common colour-vision deficiencies; written out here so the style writer needs no plotting library.
"""

from __future__ import annotations

TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
# Outlines on imagery read best in a bright colour: the first class (often the only one) gets yellow.
CLASS_COLOURS = ("#ffd400", *TAB10[1:], TAB10[0])


def class_colour(class_id: int) -> str:
    """Return the ``#rrggbb`` colour of a class id (cycling past ten classes)."""
    return CLASS_COLOURS[class_id % len(CLASS_COLOURS)]


def rgb(hex_colour: str) -> tuple[int, int, int]:
    """Return ``#rrggbb`` as 0-255 integers."""
    h = hex_colour.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)
