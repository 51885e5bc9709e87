"""Seam statistics: how the tiles of a run see each object, and scores per seam group.

A truth object *crosses a tile edge* when some tile sees only part of it; its *span* is the number of
tiles that see it. Scoring the objects grouped that way shows what the cross-tile merge costs: the
duplicates and splits a merge can make show up in the groups that cross edges. The tiles come as
their read windows in map coordinates (:func:`tile_polygons`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import shapely
import shapely.affinity
from affine import Affine
from shapely import STRtree

from geomask.matching import AREA_EPS, IOU_EPS, Pairs
from geomask.scores import PIECE_FRACTION, GeometryArray, Objects, Scores, score_slice
from geomask.tiling import Tile

SPAN_BUCKETS: tuple[tuple[str, int, int], ...] = (("1 tile", 1, 1), ("2 tiles", 2, 2), ("3-4 tiles", 3, 4), (">=5 tiles", 5, 1 << 30))


def tile_polygons(tiles: Sequence[Tile], transform: Affine) -> GeometryArray:
    """Return each tile's read window as a polygon in map coordinates (through ``transform``).

    Args:
        tiles: Tiles as planned by :func:`geomask.tiling.plan_tiles`.
        transform: The grid's affine transform (pixel edges → map coordinates); ``Affine.identity()``
            keeps pixel coordinates (x = column, y = row).
    """
    bounds = np.asarray(
        [(t.read.col_off, t.read.row_off, t.read.col_off + t.read.width, t.read.row_off + t.read.height) for t in tiles], dtype=np.float64
    ).reshape(-1, 4)
    pixel = shapely.box(bounds[:, 0], bounds[:, 1], bounds[:, 2], bounds[:, 3])
    matrix = [transform.a, transform.b, transform.d, transform.e, transform.c, transform.f]
    return np.asarray([shapely.affinity.affine_transform(g, matrix) for g in pixel], dtype=object)


@dataclass(frozen=True)
class TileCover:
    """How the tiles of a run see each geometry.

    Attributes:
        span: Number of tiles whose read window overlaps the geometry.
        crosses: Whether some tile sees only part of the geometry (it is cut by a tile edge).
    """

    span: npt.NDArray[np.int64]
    crosses: npt.NDArray[np.bool_]


def tile_cover(geometry: GeometryArray, tiles: GeometryArray) -> TileCover:
    """Count the tiles that see each geometry and whether a tile edge cuts it (inside the tiled extent).

    A part of an object outside every tile (beyond the raster) does not make it cross an edge.
    """
    n = len(geometry)
    span = np.zeros(n, dtype=np.int64)
    crosses = np.zeros(n, dtype=bool)
    if n == 0 or len(tiles) == 0:
        return TileCover(span, crosses)
    extent = shapely.union_all(tiles)
    shapely.prepare(extent)
    shapely.prepare(tiles)
    area = shapely.area(geometry)
    # Most objects lie inside the extent and inside the tiles that see them: skip those intersections.
    in_extent = area.copy()
    out = np.flatnonzero(~shapely.within(geometry, extent))
    in_extent[out] = shapely.area(shapely.intersection(geometry[out], extent))
    gi, ti = STRtree(tiles).query(geometry, predicate="intersects")
    seen = area[gi].copy()
    part = np.flatnonzero(~shapely.within(geometry[gi], tiles[ti]))
    seen[part] = shapely.area(shapely.intersection(geometry[gi[part]], tiles[ti[part]]))
    tol = AREA_EPS * in_extent[gi]
    overlap = seen > tol
    span = np.bincount(gi[overlap], minlength=n).astype(np.int64)
    partial = overlap & (seen < in_extent[gi] - tol)
    crosses[gi[partial]] = True
    return TileCover(span, crosses)


def seam_scores(
    pred: Objects, truth: Objects, tiles: GeometryArray, matches: Pairs, pairs: Pairs, pieces: npt.NDArray[np.int64]
) -> tuple[Scores, ...]:
    """Score truth objects grouped by how tiles see them.

    Each prediction joins the group of the truth object it matches, else of the truth object it
    lies mostly inside, else the group its own footprint falls in — so per-group precision is defined.
    """
    t_cover = tile_cover(truth.geometry, tiles)
    p_cover = tile_cover(pred.geometry, tiles)
    p_span, p_cross = p_cover.span.copy(), p_cover.crosses.copy()
    owner = np.full(len(pred), -1, dtype=np.intp)
    best = np.zeros(len(pred))
    pieces_of = pairs.in_pred >= PIECE_FRACTION - IOU_EPS
    for p, t, frac in zip(pairs.pred[pieces_of].tolist(), pairs.truth[pieces_of].tolist(), pairs.in_pred[pieces_of].tolist(), strict=True):
        if frac > best[p]:
            best[p], owner[p] = frac, t
    owner[matches.pred] = matches.truth
    has = owner >= 0
    p_span[has] = t_cover.span[owner[has]]
    p_cross[has] = t_cover.crosses[owner[has]]

    # Objects no tile sees (truth beyond the raster) are in no seam group; a row says how many.
    t_seen, p_seen = t_cover.span > 0, p_span > 0
    rows: list[Scores] = []
    for name, t_sel, p_sel in (
        ("inside one tile", t_seen & ~t_cover.crosses, p_seen & ~p_cross),
        ("crosses a tile edge", t_cover.crosses, p_cross),
    ):
        rows.append(score_slice(name, np.flatnonzero(t_sel), np.flatnonzero(p_sel), matches, pieces))
    for name, lo, hi in SPAN_BUCKETS:
        t_sel = (t_cover.span >= lo) & (t_cover.span <= hi)
        p_sel = (p_span >= lo) & (p_span <= hi)
        rows.append(score_slice(f"seen by {name}", np.flatnonzero(t_sel), np.flatnonzero(p_sel), matches, pieces))
    if not (t_seen.all() and p_seen.all()):
        rows.append(score_slice("seen by no tile", np.flatnonzero(~t_seen), np.flatnonzero(~p_seen), matches, pieces))
    return tuple(rows)
