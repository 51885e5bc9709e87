"""The shape stage: turn exact pixel-edge outlines into outlines a mapper would keep.

Runs after the merge on the final features of one input, so every neighbour of an object is known.
Each feature is mapped from map coordinates into the *working frame* (the working grid's pixel space,
rescaled to square units when pixels are not square), reshaped there by its class's method, checked by
an acceptance gate, and mapped back through the same affine, so georeferencing stays exact.

Methods:

* ``pixel``: the exact trace, untouched (the default; the seam benchmark's exactness depends on it).
* ``simplify``: topology-preserving Douglas–Peucker.
* ``orthogonal``: right angles (optionally 45° diagonals) about the dominant orientation, found from
  length-weighted edge directions; each wall is a line fitted to the raw trace it replaces, and
  corners are the intersections of consecutive walls, so L/U/T shapes and courtyards are kept. A round
  mask becomes a circle when a circle fits it better (``circles``).
* ``circle``: the area-preserving circle about the centroid (tanks, silos).
* ``smooth``: Chaikin corner cutting of the simplified outline (tree crowns).

The per-polygon methods are in :mod:`geomask.regularize`; this module holds the rules, the gate and
the stage over one input's features.

The gate (as Esri's "Regularize Building Footprint" does it): the new outline must be valid, keep the
number of parts and holes, stay within ``tolerance_px`` of the mask outline (Hausdorff distance of the
boundaries), keep its area within ``max_area_change``, and overlap no neighbour that the mask did not
overlap (an outline that only overlaps neighbours is cut by them and checked again). Otherwise the
simplified outline is kept, and failing that the exact trace; both are labelled ``fallback``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import shapely
from affine import Affine
from pyproj import CRS
from shapely import STRtree
from shapely.geometry import MultiPolygon, Polygon

from geomask.polygon_metrics import polis
from geomask.regularize import dominant_angle, fit_circle, orthogonalize, smooth
from geomask.vectorize import AreaMeter, Feature, as_multipolygon

# The per-polygon methods live in geomask.regularize; they are part of the stage's public names.
__all__ = [
    "FALLBACK",
    "SHAPE_METHODS",
    "ShapeRule",
    "dominant_angle",
    "fit_circle",
    "orthogonalize",
    "passes_gate",
    "shape_features",
    "shape_geometries",
    "smooth",
    "working_frame",
]

ShapeMethod = Literal["pixel", "simplify", "orthogonal", "circle", "smooth"]
SHAPE_METHODS: tuple[ShapeMethod, ...] = ("pixel", "simplify", "orthogonal", "circle", "smooth")
FALLBACK = "fallback"
_AREA_EPS_PX2 = 1e-6  # intersections smaller than this (working px²) are touching, not overlapping
# ``orthogonal`` simplifies 1.5× harder than ``simplify`` before snapping: on 1–2 px mask noise a
# rotated wall then keeps one straight edge instead of a few jogs (bench/shapes.py, 1.0 vs 1.5 vs 2.0).
_ORTHO_SIMPLIFY = 1.5


@dataclass(frozen=True)
class ShapeRule:
    """How one class's outlines are reshaped, in working-frame pixels.

    Attributes:
        method: One of :data:`SHAPE_METHODS`.
        tolerance_px: Gate: the new outline stays within this distance of the mask outline.
        simplify_px: Douglas–Peucker tolerance of ``simplify``, of the fallback, and of the first step
            of ``orthogonal`` and ``smooth``.
        diagonals: ``orthogonal`` may snap walls to 45° as well as 90°.
        circles: ``orthogonal`` turns a mask into a circle when a circle passes the gate and fits closer.
        max_area_change: Gate: the area may change by at most this fraction of the mask's area.
    """

    method: ShapeMethod = "pixel"
    tolerance_px: float = 3.0
    simplify_px: float = 1.0
    diagonals: bool = False
    circles: bool = True
    max_area_change: float = 0.2


def _candidate(geom: MultiPolygon, rule: ShapeRule) -> tuple[MultiPolygon | None, str]:
    """The method's outline for one feature (working frame) before the gate, and its label.

    ``orthogonal`` is labelled ``circle`` when every part of the feature became a circle.
    """
    if rule.method == "simplify":
        return as_multipolygon(shapely.simplify(geom, rule.simplify_px, preserve_topology=True)), "simplify"
    parts: list[Polygon] = []
    circles = 0
    for poly in geom.geoms:
        new: Polygon | None
        if rule.method == "orthogonal":
            new = orthogonalize(poly, _ORTHO_SIMPLIFY * rule.simplify_px, rule.diagonals)
            if rule.circles and not poly.interiors:
                circle = fit_circle(poly)
                new = _closer(poly, new, circle, rule)
                circles += new is circle
        elif rule.method == "circle":
            new = fit_circle(poly)
        else:
            new = smooth(poly, rule.simplify_px)
        if new is None:
            return None, rule.method
        parts.append(new)
    return MultiPolygon(parts), "circle" if circles == len(parts) else rule.method


def _closer(poly: Polygon, a: Polygon | None, b: Polygon, rule: ShapeRule) -> Polygon | None:
    """Of two outlines for ``poly``, the one that passes the gate and lies closer to it on average."""
    fits = [p for p in (a, b) if p is not None and passes_gate(MultiPolygon([p]), MultiPolygon([poly]), rule)]
    if not fits:
        return a
    return min(fits, key=lambda p: polis(p, poly))


# --------------------------------------------------------------------------------------------------
# The gate and the stage
# --------------------------------------------------------------------------------------------------


def _ring_counts(geom: MultiPolygon) -> tuple[int, int]:
    return len(geom.geoms), sum(len(p.interiors) for p in geom.geoms)


def passes_gate(candidate: MultiPolygon, outline: MultiPolygon, rule: ShapeRule) -> bool:
    """Whether ``candidate`` may replace the mask ``outline`` (neighbours aside): valid, same parts and
    holes, within ``tolerance_px`` of it and its area within ``max_area_change``."""
    if candidate.is_empty or not candidate.is_valid or _ring_counts(candidate) != _ring_counts(outline):
        return False
    if abs(candidate.area - outline.area) > rule.max_area_change * outline.area:
        return False
    return float(shapely.hausdorff_distance(candidate.boundary, outline.boundary)) <= rule.tolerance_px


def shape_geometries(geoms: Sequence[MultiPolygon], rules: Sequence[ShapeRule]) -> tuple[list[MultiPolygon], list[str]]:
    """Reshape working-frame outlines, each by its rule, through the gate; return outlines and labels.

    Overlap is judged against every neighbour's *current* outline (already reshaped or not yet), so
    whichever of two neighbours is reshaped second sees the other's final outline: no pair that did
    not overlap as masks overlaps in the output.
    """
    out = list(geoms)
    labels: list[str] = [r.method for r in rules]
    tree = STRtree(list(geoms))
    reach = 2.0 * max((r.tolerance_px for r in rules), default=0.0)

    def new_overlaps(i: int, cand: MultiPolygon) -> list[int]:
        """Neighbours ``cand`` overlaps although mask ``i`` did not overlap them."""
        hits = []
        for j in tree.query(cand, predicate="dwithin", distance=reach).tolist():
            if j == i or shapely.area(shapely.intersection(cand, out[j])) <= _AREA_EPS_PX2:
                continue
            if shapely.area(shapely.intersection(geoms[i], geoms[j])) <= _AREA_EPS_PX2:
                hits.append(j)
        return hits

    def accept(i: int, cand: MultiPolygon | None, rule: ShapeRule) -> MultiPolygon | None:
        """``cand`` if it passes the gate; else, when it only overlaps neighbours, ``cand`` minus them if that passes.

        Cutting the neighbours out is what keeps a row of houses regular: the first house's shared wall
        becomes the second's, instead of the second falling back.
        """
        if cand is None or not passes_gate(cand, geoms[i], rule):
            return None
        hits = new_overlaps(i, cand)
        if not hits:
            return cand
        cut = as_multipolygon(shapely.difference(cand, shapely.union_all([out[j] for j in hits])))
        return cut if passes_gate(cut, geoms[i], rule) and not new_overlaps(i, cut) else None

    for i, (geom, rule) in enumerate(zip(geoms, rules, strict=True)):
        if rule.method == "pixel" or geom.is_empty:
            continue
        cand, label = _candidate(geom, rule)
        got = accept(i, cand, rule)
        if got is not None:
            out[i], labels[i] = got, label
            continue
        labels[i] = FALLBACK
        simple = accept(i, as_multipolygon(shapely.simplify(geom, rule.simplify_px, preserve_topology=True)), rule)
        if simple is not None:
            out[i] = simple
    return out, labels


def working_frame(transform: Affine) -> Affine:
    """Return the affine from the working frame to map coordinates.

    The working frame is the grid's pixel space, with columns or rows stretched so both pixel sides
    have the map length of the shorter one: right angles there are right angles on the ground for any
    north-up, south-up or rotated grid. For square pixels it is the pixel space itself.
    """
    col = math.hypot(transform.a, transform.d)
    row = math.hypot(transform.b, transform.e)
    unit = min(col, row)
    return transform @ Affine.scale(unit / col, unit / row)


def _affine_matrix(t: Affine) -> list[float]:
    return [t.a, t.b, t.d, t.e, t.c, t.f]


def shape_features(
    feats: Sequence[Feature],
    transform: Affine,
    crs: CRS,
    rules: Mapping[int, ShapeRule],
    default: ShapeRule,
    traced: str = "pixel",
) -> list[Feature]:
    """Apply the shape stage to one input's final features (map coordinates of the raster's CRS).

    Args:
        feats: Merged, vectorised features of one input: all its objects, so neighbours are known.
        transform: The working grid's affine transform (working pixels → map coordinates).
        crs: The raster's CRS, to re-measure geodesic area and perimeter of reshaped outlines.
        rules: Rule per class id; classes not named use ``default``.
        default: Rule for the other classes.
        traced: Label of features left as traced (``pixel``, or ``simplify`` when the vectorizer
            already simplified them).

    Returns:
        Features in the input order, each with its ``shape`` label; untouched ones are the same objects.
    """
    chosen = [rules.get(f.class_id, default) for f in feats]
    if all(r.method == "pixel" for r in chosen):
        return [replace(f, shape=traced) for f in feats]
    frame = working_frame(transform)
    to_frame, to_map = _affine_matrix(~frame), _affine_matrix(frame)
    local = [as_multipolygon(shapely.affinity.affine_transform(f.geometry, to_frame)) for f in feats]
    shaped, labels = shape_geometries(local, chosen)
    meter = AreaMeter(crs)
    out: list[Feature] = []
    for f, before, after, label in zip(feats, local, shaped, labels, strict=True):
        if after is before:
            out.append(replace(f, shape=traced if label == "pixel" else label))
            continue
        geom = as_multipolygon(shapely.orient_polygons(shapely.affinity.affine_transform(after, to_map)))
        area, perim = meter.measure(geom)
        out.append(replace(f, geometry=geom, area_m2=area, perim_m=perim, shape=label))
    return out
