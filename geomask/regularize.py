"""Regular outlines for one polygon, in the working frame (square pixel units): the shape stage's methods.

* :func:`orthogonalize`: right angles (optionally 45° diagonals) about the dominant orientation
  (:func:`dominant_angle`, the peak of a length-weighted kernel density of edge directions folded
  mod 90°); each wall is the length-weighted mean offset of the raw trace edges it replaces, walls
  too short to be real are removed, and corners are the intersections of consecutive walls. Every
  ring is done this way, so holes and L/U/T shapes are kept.
* :func:`fit_circle`: the area-keeping circle about the centroid (tanks, silos).
* :func:`smooth`: Chaikin corner cutting of the simplified outline (tree crowns).

Pure shapely and numpy. Whether an outline is kept is the gate's decision (:mod:`geomask.shape`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import shapely
from shapely.geometry import LinearRing, Point, Polygon

# An edge within this angle of a diagonal (45°, 135°) of the dominant frame is snapped to it, when
# diagonals are allowed; otherwise to the nearer axis. Narrower than the 22.5° half-way point, because
# a stair-stepped wall that is slightly off-axis must not turn diagonal.
DIAGONAL_SNAP_DEG = 15.0
_CIRCLE_QUAD_SEGS = 8  # 32 vertices: a circle's outline within 0.5 % of its radius
_CHAIKIN_ROUNDS = 2
_ANGLE_KAPPA = 8.0  # concentration of the orientation kernel on 4·α: about ±5° wide in α
_ANGLE_NEAR_DEG = 7.5  # edges this close to the peak orientation refine it
_MIN_WALL = 3.0  # walls shorter than this many simplify tolerances are mask noise

FloatArray = npt.NDArray[np.float64]


def _open_coords(ring: LinearRing) -> FloatArray:
    """Ring vertices without the closing repeat."""
    return np.asarray(ring.coords, dtype=np.float64)[:-1]


def dominant_angle(poly: Polygon) -> float:
    """Return the dominant wall orientation of ``poly`` in radians, in ``[-π/4, π/4)``.

    Edge directions are folded modulo 90° (a wall and its perpendicular count the same). The peak of a
    length-weighted kernel density over the folded directions is found on a 0.5° grid and refined by
    the weighted circular mean of the edges near it. A plain mean over all edges would be pulled off
    by the few odd edges a simplified stair trace keeps; the peak is not.
    """
    parts = [np.diff(np.asarray(r.coords, dtype=np.float64), axis=0) for r in (poly.exterior, *poly.interiors)]
    d = np.vstack(parts)
    length = np.hypot(d[:, 0], d[:, 1])
    four = 4 * np.arctan2(d[:, 1], d[:, 0])  # 4·α: period 90° in α becomes a full turn
    grid = np.radians(np.arange(0.0, 360.0, 2.0))  # 4·θ every 2°: θ every 0.5°
    density = (length[None, :] * np.exp(_ANGLE_KAPPA * (np.cos(grid[:, None] - four[None, :]) - 1))).sum(axis=1)
    peak = float(grid[int(np.argmax(density))])
    near = np.cos(four - peak) > math.cos(math.radians(4 * _ANGLE_NEAR_DEG))
    sy, sx = float(np.sum(length[near] * np.sin(four[near]))), float(np.sum(length[near] * np.cos(four[near])))
    theta = math.atan2(sy, sx) / 4
    return 0.0 if abs(theta) < 1e-12 else theta  # an axis-aligned trace stays bit-exact


def _rotate(xy: FloatArray, theta: float) -> FloatArray:
    c, s = math.cos(theta), math.sin(theta)
    return np.column_stack([c * xy[:, 0] - s * xy[:, 1], s * xy[:, 0] + c * xy[:, 1]])


def _raw_indexes(raw: FloatArray, kept: FloatArray) -> list[int] | None:
    """Index in ``raw`` of each vertex ``kept`` by the simplifier (which keeps a subsequence of them)."""
    where: dict[tuple[float, float], list[int]] = {}
    for i, (x, y) in enumerate(raw.tolist()):
        where.setdefault((x, y), []).append(i)
    n = len(raw)
    out: list[int] = []
    for x, y in kept.tolist():
        options = where.get((x, y))
        if not options:
            return None
        if not out:
            out.append(options[0])
            continue
        start = out[0]
        prev = (out[-1] - start) % n
        later = [i for i in options if (i - start) % n > prev]
        if not later:
            return None
        out.append(min(later, key=lambda i: (i - start) % n))
    return out


def _directions(diagonals: bool) -> FloatArray:
    return np.array([0.0, math.pi / 2, math.pi / 4, 3 * math.pi / 4] if diagonals else [0.0, math.pi / 2])


def _classify(alpha: float, diagonals: bool) -> int:
    """Index into :func:`_directions` of the direction an edge at angle ``alpha`` is snapped to."""
    a = alpha % math.pi

    def gap(target: float) -> float:
        d = abs(a - target) % math.pi
        return min(d, math.pi - d)

    if diagonals:
        for k, target in ((2, math.pi / 4), (3, 3 * math.pi / 4)):
            if gap(target) < math.radians(DIAGONAL_SNAP_DEG):
                return k
    return 0 if gap(0.0) <= gap(math.pi / 2) else 1


@dataclass
class _Run:
    """Consecutive simplified edges snapped to one direction: one wall."""

    direction: int
    length: float  # of the simplified edges (what decides whether the wall is noise)
    weight: float  # Σ raw edge length
    moment: float  # Σ raw edge length × offset of its midpoint along the wall's normal


def _wall_runs(raw: FloatArray, kept: FloatArray, idx: list[int], diagonals: bool) -> list[_Run]:
    """Group the simplified ring's edges into walls and fit each wall's offset to the raw trace."""
    dirs = _directions(diagonals)
    normals = np.column_stack([-np.sin(dirs), np.cos(dirs)])
    n_raw, n_kept = len(raw), len(kept)
    runs: list[_Run] = []
    for k in range(n_kept):
        a, b = kept[k], kept[(k + 1) % n_kept]
        cls = _classify(math.atan2(b[1] - a[1], b[0] - a[0]), diagonals)
        i0, i1 = idx[k], idx[(k + 1) % n_kept]
        span = (i1 - i0) % n_raw or n_raw
        pts = raw[(i0 + np.arange(span + 1)) % n_raw]
        seg = np.diff(pts, axis=0)
        seg_len = np.hypot(seg[:, 0], seg[:, 1])
        mids = (pts[:-1] + pts[1:]) / 2
        weight = float(seg_len.sum())
        moment = float(np.sum(seg_len * (mids @ normals[cls])))
        edge = float(math.hypot(b[0] - a[0], b[1] - a[1]))
        if runs and runs[-1].direction == cls:
            last = runs[-1]
            last.length += edge
            last.weight += weight
            last.moment += moment
        else:
            runs.append(_Run(cls, edge, weight, moment))
    if len(runs) > 1 and runs[0].direction == runs[-1].direction:
        last = runs.pop()
        runs[0].length += last.length
        runs[0].weight += last.weight
        runs[0].moment += last.moment
    return runs


def _remove_wall(runs: list[_Run], k: int) -> None:
    """Remove wall ``k``, joining its neighbours into one wall when they are parallel."""
    del runs[k]
    prev, nxt = (k - 1) % len(runs), k % len(runs)
    if prev != nxt and runs[prev].direction == runs[nxt].direction:
        a, b = runs[prev], runs[nxt]
        a.length += b.length
        a.weight += b.weight
        a.moment += b.moment
        del runs[nxt]


def _drop_short_walls(runs: list[_Run], min_length: float) -> list[_Run]:
    """Remove walls shorter than ``min_length`` (mask noise), joining the neighbours they separated."""
    runs = list(runs)
    while len(runs) > 4:
        k = min(range(len(runs)), key=lambda i: runs[i].length)
        if runs[k].length >= min_length:
            break
        _remove_wall(runs, k)
    return runs


def _corners(runs: list[_Run], diagonals: bool) -> FloatArray | None:
    """Intersect consecutive walls (lines ``n·p = c``) into the ring's corners."""
    if len(runs) < 3:
        return None
    dirs = _directions(diagonals)
    out = []
    for k in range(len(runs)):
        r0, r1 = runs[k - 1], runs[k]
        if r0.direction == r1.direction or r0.weight <= 0 or r1.weight <= 0:
            return None
        n0 = np.array([-math.sin(dirs[r0.direction]), math.cos(dirs[r0.direction])])
        n1 = np.array([-math.sin(dirs[r1.direction]), math.cos(dirs[r1.direction])])
        out.append(np.linalg.solve(np.vstack([n0, n1]), np.array([r0.moment / r0.weight, r1.moment / r1.weight])))
    return np.asarray(out, dtype=np.float64)


def orthogonalize(poly: Polygon, simplify_px: float = 1.0, diagonals: bool = False) -> Polygon | None:
    """Return ``poly`` with walls at right angles (and 45° with ``diagonals``), or ``None`` if none fits.

    Working-frame coordinates. The dominant orientation comes from the simplified outline; each wall's
    position is the length-weighted mean offset of the raw trace edges it replaces, so a stair-stepped
    wall lands on the middle of its steps rather than on its outer corners.
    """
    simple = shapely.simplify(poly, simplify_px, preserve_topology=True)
    if not isinstance(simple, Polygon) or simple.is_empty:
        return None
    theta = dominant_angle(simple)
    raw_rings = [poly.exterior, *poly.interiors]
    kept_rings = [simple.exterior, *simple.interiors]
    if len(raw_rings) != len(kept_rings):
        return None
    rings: list[FloatArray] = []
    for raw_ring, kept_ring in zip(raw_rings, kept_rings, strict=True):
        raw, kept = _open_coords(raw_ring), _open_coords(kept_ring)
        idx = _raw_indexes(raw, kept)
        if idx is None or len(kept) < 3:
            return None
        runs = _wall_runs(_rotate(raw, -theta), _rotate(kept, -theta), idx, diagonals)
        runs = _drop_short_walls(runs, _MIN_WALL * simplify_px)
        corners = _corners(runs, diagonals)
        # A wall can also come out short once fitted (two parallel walls at nearly one offset): drop it too.
        while corners is not None and len(runs) > 4:
            sides = np.hypot(*(np.roll(corners, -1, axis=0) - corners).T)
            k = int(np.argmin(sides))
            if sides[k] >= simplify_px:
                break
            _remove_wall(runs, k)
            corners = _corners(runs, diagonals)
        if corners is None:
            return None
        rings.append(_rotate(corners, theta))
    return Polygon(rings[0], rings[1:])


def fit_circle(poly: Polygon) -> Polygon:
    """Return the circle about ``poly``'s centroid with the same area (holes are not kept)."""
    radius = math.sqrt(poly.area / math.pi)
    circle: Polygon = Point(poly.centroid.x, poly.centroid.y).buffer(radius, quad_segs=_CIRCLE_QUAD_SEGS)
    return circle


def _chaikin(xy: FloatArray, rounds: int) -> FloatArray:
    for _ in range(rounds):
        nxt = np.roll(xy, -1, axis=0)
        xy = np.column_stack([0.75 * xy + 0.25 * nxt, 0.25 * xy + 0.75 * nxt]).reshape(-1, 2)
    return xy


def smooth(poly: Polygon, simplify_px: float = 1.0) -> Polygon:
    """Return a smooth outline: the simplified polygon with its corners cut (Chaikin, two rounds)."""
    simple = shapely.simplify(poly, simplify_px, preserve_topology=True)
    if not isinstance(simple, Polygon) or simple.is_empty:
        return poly
    rings = [_chaikin(_open_coords(r), _CHAIKIN_ROUNDS) for r in (simple.exterior, *simple.interiors)]
    return Polygon(rings[0], rings[1:])
