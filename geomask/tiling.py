"""Pure tile planning.

A :class:`Tile` has a *read* window (the pixels the detector sees, overlapping its neighbours), a
*core* window (the cores of all tiles partition the raster exactly) and an *exclusive* window (the
pixels no other tile reads; objects wholly inside it need no merging). All windows are in the
working grid's pixel coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass

from rasterio.windows import Window

from geomask.errors import ConfigError


@dataclass(frozen=True)
class Tile:
    """One tile of the plan.

    Attributes:
        index: Position in the plan (row-major), unique per raster.
        row: Tile row in the grid.
        col: Tile column in the grid.
        read: Window read and shown to the detector.
        core: Window this tile owns; cores partition the raster.
        exclusive: Window read by this tile only, or ``None`` when every pixel is shared.
    """

    index: int
    row: int
    col: int
    read: Window
    core: Window
    exclusive: Window | None


@dataclass(frozen=True)
class _Span:
    read: tuple[int, int]
    core: tuple[int, int]
    exclusive: tuple[int, int]


def _axis_spans(length: int, size: int, overlap: int) -> list[_Span]:
    """Plan tiles along one axis: starts step by ``size - overlap``; the last tile is flush with the end."""
    if length <= size:
        return [_Span((0, length), (0, length), (0, length))]
    stride = size - overlap
    starts = list(range(0, length - size, stride))
    starts.append(length - size)  # flush with the far edge: full coverage, no padding
    ends = [s + size for s in starts]
    n = len(starts)
    # Core boundaries sit in the middle of each overlap, so every pixel has exactly one owner and each
    # owner saw at least half the overlap of context around it.
    bounds = [0] + [(starts[k] + ends[k - 1]) // 2 for k in range(1, n)] + [length]
    spans = []
    for k in range(n):
        ex0 = ends[k - 1] if k > 0 else starts[k]
        ex1 = starts[k + 1] if k + 1 < n else ends[k]
        spans.append(_Span((starts[k], ends[k]), (bounds[k], bounds[k + 1]), (ex0, max(ex0, ex1))))
    return spans


def _window(rows: tuple[int, int], cols: tuple[int, int]) -> Window:
    return Window(cols[0], rows[0], cols[1] - cols[0], rows[1] - rows[0])


def default_overlap_px(size_px: int) -> int:
    """Return the overlap used when none is configured: an eighth of the tile side."""
    return max(1, size_px // 8)


def plan_tiles(width_px: int, height_px: int, size_px: int, overlap_px: int) -> list[Tile]:
    """Plan overlapping tiles covering a ``width_px`` × ``height_px`` raster.

    Args:
        width_px: Raster width in pixels.
        height_px: Raster height in pixels.
        size_px: Tile side in pixels; a raster smaller than that becomes one smaller tile.
        overlap_px: Pixels shared by neighbouring tiles; must be in ``[1, size_px)`` so that objects cut
            by a tile edge appear in both tiles and can be matched.

    Returns:
        Tiles in row-major order; their cores partition the raster exactly.
    """
    if width_px <= 0 or height_px <= 0:
        raise ConfigError(f"raster size must be positive, got {width_px}x{height_px}")
    if size_px < 16:
        raise ConfigError(f"tiling.size_px must be at least 16, got {size_px}")
    if not 1 <= overlap_px < size_px:
        raise ConfigError(
            f"tiling.overlap_px must be at least 1 and less than tiling.size_px ({size_px}), got {overlap_px}; "
            f"try overlap_px: {default_overlap_px(size_px)}"
        )
    row_spans = _axis_spans(height_px, size_px, overlap_px)
    col_spans = _axis_spans(width_px, size_px, overlap_px)
    tiles: list[Tile] = []
    for i, rs in enumerate(row_spans):
        for j, cs in enumerate(col_spans):
            empty = rs.exclusive[0] >= rs.exclusive[1] or cs.exclusive[0] >= cs.exclusive[1]
            tiles.append(
                Tile(
                    index=len(tiles),
                    row=i,
                    col=j,
                    read=_window(rs.read, cs.read),
                    core=_window(rs.core, cs.core),
                    exclusive=None if empty else _window(rs.exclusive, cs.exclusive),
                )
            )
    return tiles


def window_contains(outer: Window, col0: int, row0: int, col1: int, row1: int) -> bool:
    """Return whether the pixel box ``[col0, col1) × [row0, row1)`` lies inside ``outer``."""
    c0, r0 = int(outer.col_off), int(outer.row_off)
    return c0 <= col0 and r0 <= row0 and col1 <= c0 + int(outer.width) and row1 <= r0 + int(outer.height)
