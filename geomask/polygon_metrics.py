"""Outline-quality metrics of the building-polygon literature, on matched (prediction, truth) pairs.

IoU says how much area agrees; it cannot tell a clean four-corner footprint from a 200-vertex stair
trace of the same area. These metrics can:

* **C-IoU** (Zorzi et al., PolyWorld): ``IoU × (1 − |N − N_gt| / (N + N_gt))``, ``N`` the vertex count:
  IoU discounted by how far the vertex count is off.
* **PoLiS** (Avbelj et al. 2015): the mean distance of each outline's vertices to the other outline's
  boundary, averaged both ways, in the CRS's units (metres in a projected CRS).
* **Max tangent angle error** (Girard et al., frame field learning): at the midpoint of every edge of
  one outline, the angle between that edge and the nearest edge of the other outline, folded to
  0–90°; the largest over both outlines. A stair trace of a rotated wall scores its rotation.
* **Vertex-count ratio** ``N / N_gt``.

Pure shapely/numpy, in whatever CRS both polygons share.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import shapely

FloatArray = npt.NDArray[np.float64]


def vertex_count(geom: Any) -> int:
    """Count the distinct vertices of a (multi)polygon: every ring's, without its closing repeat."""
    return sum(len(ring.coords) - 1 for ring in _rings(geom))


def _rings(geom: Any) -> list[Any]:
    polys = list(getattr(geom, "geoms", [geom]))
    return [r for p in polys if not p.is_empty for r in (p.exterior, *p.interiors)]


def iou(a: Any, b: Any) -> float:
    """Intersection over union of two areal geometries (0 when both are empty)."""
    union = float(shapely.area(shapely.union(a, b)))
    return float(shapely.area(shapely.intersection(a, b))) / union if union > 0 else 0.0


def c_iou(pred: Any, truth: Any) -> float:
    """IoU times ``1 − |N − N_gt| / (N + N_gt)`` (N: vertex counts)."""
    n, n_gt = vertex_count(pred), vertex_count(truth)
    return iou(pred, truth) * (1.0 - abs(n - n_gt) / (n + n_gt)) if n + n_gt else 0.0


def polis(a: Any, b: Any) -> float:
    """PoLiS distance: mean vertex-to-boundary distance, averaged over both directions (CRS units)."""
    ba, bb = shapely.boundary(a), shapely.boundary(b)
    va, vb = shapely.points(_vertices(a)), shapely.points(_vertices(b))
    return 0.5 * float(np.mean(shapely.distance(va, bb))) + 0.5 * float(np.mean(shapely.distance(vb, ba)))


def _vertices(geom: Any) -> FloatArray:
    """Every ring's vertices without its closing repeat (which would count one vertex twice)."""
    return np.concatenate([np.asarray(r.coords, dtype=np.float64)[:-1] for r in _rings(geom)] or [np.zeros((0, 2))])


def _segments(geom: Any) -> FloatArray:
    """Every edge of every ring as an ``(n, 2, 2)`` array of start and end points."""
    parts = []
    for ring in _rings(geom):
        xy = np.asarray(ring.coords, dtype=np.float64)
        parts.append(np.stack([xy[:-1], xy[1:]], axis=1))
    return np.concatenate(parts) if parts else np.zeros((0, 2, 2))


def _one_way_angle(src: FloatArray, dst: FloatArray) -> float:
    """Largest angle (degrees) between an edge of ``src`` and the ``dst`` edge nearest its midpoint."""
    mid = src.mean(axis=1)
    a, d = dst[:, 0], dst[:, 1] - dst[:, 0]
    dd = np.einsum("ij,ij->i", d, d)
    t = np.clip(np.einsum("kij,ij->ki", mid[:, None, :] - a[None], d) / np.where(dd > 0, dd, 1.0), 0.0, 1.0)
    near = a[None] + t[..., None] * d[None]
    nearest = np.argmin(np.hypot(*(near - mid[:, None, :]).transpose(2, 0, 1)), axis=1)
    s = src[:, 1] - src[:, 0]
    diff = np.abs(np.arctan2(s[:, 1], s[:, 0]) - np.arctan2(d[nearest, 1], d[nearest, 0])) % math.pi
    return float(np.degrees(np.minimum(diff, math.pi - diff)).max())


def max_tangent_angle_error(pred: Any, truth: Any) -> float:
    """Largest tangent angle difference (degrees, 0–90) between the two outlines, both ways."""
    sp, st = _segments(pred), _segments(truth)
    if len(sp) == 0 or len(st) == 0:
        return 90.0
    return max(_one_way_angle(sp, st), _one_way_angle(st, sp))


@dataclass(frozen=True)
class ShapeScores:
    """Outline metrics averaged over matched pairs.

    Attributes:
        n_pairs: Matched pairs scored.
        mean_iou: Mean IoU.
        c_iou: Mean C-IoU.
        polis: Mean PoLiS (CRS units: metres in a projected CRS).
        max_angle_deg: Mean over pairs of the max tangent angle error, degrees.
        vertex_ratio: Mean of ``N / N_gt``.
    """

    n_pairs: int
    mean_iou: float | None
    c_iou: float | None
    polis: float | None
    max_angle_deg: float | None
    vertex_ratio: float | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> str:
        def f(v: float | None, d: int = 3) -> str:
            return "-" if v is None else f"{v:.{d}f}"

        return (
            f"outlines of {self.n_pairs} matched pairs: mIoU {f(self.mean_iou)}  C-IoU {f(self.c_iou)}  "
            f"PoLiS {f(self.polis)}  max angle {f(self.max_angle_deg, 1)} deg  vertices/truth {f(self.vertex_ratio, 2)}"
        )


def shape_scores(pred: Sequence[Any], truth: Sequence[Any]) -> ShapeScores:
    """Score matched pairs ``(pred[k], truth[k])`` (same CRS)."""
    if len(pred) != len(truth):
        raise ValueError(f"shape_scores needs pairs, got {len(pred)} predictions and {len(truth)} truth polygons")
    if not pred:
        return ShapeScores(0, None, None, None, None, None)
    rows = np.array(
        [
            (iou(p, t), c_iou(p, t), polis(p, t), max_tangent_angle_error(p, t), vertex_count(p) / max(vertex_count(t), 1))
            for p, t in zip(pred, truth, strict=True)
        ]
    )
    means = rows.mean(axis=0).tolist()
    return ShapeScores(len(pred), *means)
