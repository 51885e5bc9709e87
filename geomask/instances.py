"""The one value type for a detected object: :class:`Instance`.

Coordinates are *global pixel* coordinates of the working raster grid (row, column of the top-left
pixel of the whole image, before any map transform). The mask is cropped to the instance's box, so
an instance costs memory proportional to the object, never to the tile or the raster.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True, eq=False)
class Instance:
    """One object: a boolean mask cropped to its box in global pixel coordinates.

    Attributes:
        row_off: Global row of the top of the box (pixels).
        col_off: Global column of the left of the box (pixels).
        mask: Boolean array of shape ``(height, width)``; ``True`` where the object is.
        score: Detector confidence in ``[0, 1]``.
        class_id: Index into the detector's class names.
        tile_id: Index of the tile that produced it (``-1`` once fused across tiles).
    """

    row_off: int
    col_off: int
    mask: BoolArray = field(repr=False)
    score: float
    class_id: int
    tile_id: int = -1

    def __post_init__(self) -> None:
        if self.mask.ndim != 2 or self.mask.dtype != np.bool_:
            raise ValueError(f"Instance mask must be a 2-D bool array, got {self.mask.dtype} {self.mask.shape}")

    @property
    def height(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    @property
    def area_px(self) -> int:
        return int(self.mask.sum())

    def bounds(self) -> tuple[int, int, int, int]:
        """Return ``(col_min, row_min, col_max, row_max)``, max exclusive, in global pixels."""
        return (self.col_off, self.row_off, self.col_off + self.width, self.row_off + self.height)


def from_mask(
    mask: BoolArray,
    *,
    row_off: int,
    col_off: int,
    score: float,
    class_id: int,
    tile_id: int = -1,
) -> Instance | None:
    """Build an instance from a mask placed at ``(row_off, col_off)``, cropping it to its box.

    Returns ``None`` for an empty mask, so callers never carry zero-area instances.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1 = int(rows[0]), int(rows[-1]) + 1
    c0, c1 = int(cols[0]), int(cols[-1]) + 1
    return Instance(
        row_off=row_off + r0,
        col_off=col_off + c0,
        mask=np.ascontiguousarray(mask[r0:r1, c0:c1]),
        score=float(score),
        class_id=int(class_id),
        tile_id=tile_id,
    )
