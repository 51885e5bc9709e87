"""Score predicted polygons against truth polygons: matching, AP and seam statistics.

Everything here works on polygons that are already in one CRS (the truth's), so the same code scores a
GeoPackage written by ``geomask predict`` against surveyed footprints and, in the seam benchmark,
merged masks traced in pixel space against the synthetic truth.

* **Matching** is one-to-one at IoU ≥ 0.5 (the SpaceNet metric): candidate pairs come from a shapely
  ``STRtree``, then pairs are taken greedily by IoU, highest first, so each truth object and each
  prediction is used at most once. Precision, recall and F1 follow from the matches.
* **AP** is COCO's mask AP: predictions ranked by ``score``, matched at each IoU in 0.50:0.05:0.95,
  101-point interpolated precision, averaged over thresholds and over classes.
* **Box mode** replaces both sides by their bounding boxes, for box-only truth (tree crowns).
* **Ignore** polygons (e.g. the edge of a labelled block, where buildings are cut by the labelling)
  remove truth objects and predictions that lie mostly inside them from every count.
* **Seam statistics** need the tiles a prediction run used (their read windows as polygons). A truth
  object *crosses a tile edge* when some tile sees only part of it; its *span* is the number of tiles
  that see it. A *duplicate* is a matched truth object with another prediction mostly inside it; a
  *split* is an unmatched truth object covered by two or more predictions each mostly inside it —
  the two failures a cross-tile merge can make.

Results are frozen dataclasses that render as a text table or JSON (:mod:`geomask.scores`); the seam
groups are computed in :mod:`geomask.seams`. This module matches, and reads the layers from files.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import shapely
from shapely import STRtree

from geomask.errors import LabelError, first_line
from geomask.matching import DEFAULT_IOU, IOU_EPS, Pairs, coco_ap, match_one_to_one, overlapping_pairs
from geomask.polygon_metrics import shape_scores
from geomask.qgis_style import STYLES_TABLE
from geomask.scores import Evaluation, FloatArray, GeometryArray, Objects, Scores, format_scores, pieces_per_truth, score_slice
from geomask.seams import TileCover, seam_scores, tile_cover, tile_polygons

# The result types and the seam helpers live in geomask.scores and geomask.seams; callers import them from here too.
__all__ = [
    "Evaluation",
    "Objects",
    "Scores",
    "TileCover",
    "check_iou",
    "check_layers",
    "evaluate",
    "evaluate_frames",
    "format_scores",
    "frame_objects",
    "inside_fraction",
    "read_layer",
    "tile_cover",
    "tile_polygons",
    "to_crs_of",
]

log = logging.getLogger(__name__)

# A prediction (or object) at least this much inside ignore polygons is not counted.
IGNORE_FRACTION = 0.5
CLASS_FIELDS = ("class", "class_id")


def inside_fraction(geometry: GeometryArray, regions: GeometryArray) -> FloatArray:
    """Return, for each geometry, the fraction of its area inside the union of ``regions``."""
    out = np.zeros(len(geometry))
    if len(geometry) == 0 or len(regions) == 0:
        return out
    tree = STRtree(regions)
    gi, ri = tree.query(geometry, predicate="intersects")
    for g in np.unique(gi).tolist():
        union = shapely.union_all(regions[ri[gi == g]])
        area = shapely.area(geometry[g])
        out[g] = shapely.area(shapely.intersection(geometry[g], union)) / area if area > 0 else 0.0
    return out


def _polygonal(geometry: GeometryArray) -> GeometryArray:
    """Make geometries valid and keep their polygonal parts (lines from make_valid are dropped)."""
    fixed = np.asarray(geometry, dtype=object).copy()
    bad = np.flatnonzero(~shapely.is_valid(fixed) & ~shapely.is_missing(fixed))
    fixed[bad] = shapely.make_valid(fixed[bad])
    fixed[shapely.is_missing(fixed)] = shapely.Polygon()
    for k in np.flatnonzero(shapely.get_type_id(fixed) == 7).tolist():  # GeometryCollection: keep only its polygons
        parts = [g for g in shapely.get_parts(fixed[k]) if shapely.get_type_id(g) in (3, 6)]
        fixed[k] = shapely.union_all(parts) if parts else shapely.Polygon()
    return fixed


def evaluate(
    pred: Objects,
    truth: Objects,
    *,
    iou_threshold: float = DEFAULT_IOU,
    box: bool = False,
    ignore: GeometryArray | None = None,
    tiles: GeometryArray | None = None,
    compute_ap: bool = True,
    shape_metrics: bool = False,
) -> Evaluation:
    """Score predictions against truth (both already in one CRS).

    Args:
        pred: Predicted polygons with scores and class labels.
        truth: Truth polygons with class labels (scores unused).
        iou_threshold: IoU a one-to-one match needs (SpaceNet: 0.5).
        box: Compare bounding boxes instead of polygons (box-only truth such as tree crowns).
        ignore: Polygons whose content is not scored: truth objects and predictions at least half
            inside them are dropped before matching.
        tiles: Read windows of the tiles the predictions came from, for seam statistics.
        compute_ap: Compute COCO AP (ten matchings); off where only F1 matters, e.g. in benchmarks.
        shape_metrics: Score the outlines of the matched pairs (:mod:`geomask.polygon_metrics`).

    Returns:
        Overall, per-class and (with ``tiles``) per-seam-group scores.
    """
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    pred = Objects(_polygonal(pred.geometry), pred.score, pred.label)
    truth = Objects(_polygonal(truth.geometry), truth.score, truth.label)
    pred = pred.take(~shapely.is_empty(pred.geometry))
    truth = truth.take(~shapely.is_empty(truth.geometry))
    if box:
        pred = Objects(np.asarray(shapely.envelope(pred.geometry), dtype=object), pred.score, pred.label)
        truth = Objects(np.asarray(shapely.envelope(truth.geometry), dtype=object), truth.score, truth.label)
    n_ign_t = n_ign_p = 0
    if ignore is not None and len(ignore):
        regions = _polygonal(np.asarray(ignore, dtype=object))
        drop_t = inside_fraction(truth.geometry, regions) >= IGNORE_FRACTION - IOU_EPS
        drop_p = inside_fraction(pred.geometry, regions) >= IGNORE_FRACTION - IOU_EPS
        n_ign_t, n_ign_p = int(drop_t.sum()), int(drop_p.sum())
        truth, pred = truth.take(~drop_t), pred.take(~drop_p)

    all_pairs = overlapping_pairs(pred.geometry, truth.geometry)
    same_class = all_pairs.take(pred.label[all_pairs.pred] == truth.label[all_pairs.truth])
    matches = match_one_to_one(same_class, iou_threshold)
    pieces = pieces_per_truth(all_pairs, len(truth))

    labels = sorted(set(truth.label.tolist()) | set(pred.label.tolist()))
    per_class: list[Scores] = []
    aps: list[tuple[float | None, float | None, float | None]] = []
    for lab in labels:
        t_idx = np.flatnonzero(truth.label == lab)
        p_idx = np.flatnonzero(pred.label == lab)
        ap: tuple[float | None, float | None, float | None] = (None, None, None)
        if compute_ap:
            # AP runs on the class's own predictions, re-indexed 0..n-1 so ranks follow their scores.
            sub = same_class.take(np.isin(same_class.pred, p_idx))
            remap = np.full(len(pred), -1, dtype=np.intp)
            remap[p_idx] = np.arange(len(p_idx))
            ap = coco_ap(Pairs(remap[sub.pred], sub.truth, sub.iou, sub.in_pred), pred.score[p_idx], len(t_idx))
            aps.append(ap)
        per_class.append(score_slice(lab or "all", t_idx, p_idx, matches, pieces, ap))

    overall_ap: tuple[float | None, float | None, float | None] = (None, None, None)
    with_truth = [a for a in aps if a[0] is not None]
    if with_truth:
        overall_ap = tuple(float(np.mean([a[k] for a in with_truth])) for k in range(3))  # type: ignore[assignment]
    overall = score_slice("all", np.arange(len(truth)), np.arange(len(pred)), matches, pieces, overall_ap)
    class_rows = tuple(per_class) if labels != [""] else ()

    seams: tuple[Scores, ...] = ()
    if tiles is not None:
        seams = seam_scores(pred, truth, np.asarray(tiles, dtype=object), matches, all_pairs, pieces)
    shape = shape_scores(list(pred.geometry[matches.pred]), list(truth.geometry[matches.truth])) if shape_metrics else None
    return Evaluation(iou_threshold, box, overall, class_rows, seams, n_ign_t, n_ign_p, shape)


def _only_layer(path: Path) -> str | None:
    """The one layer of a file besides QGIS's style table (geomask's GeoPackages carry one), else ``None`` (OGR's first)."""
    layers = [str(name) for name, _ in pyogrio.list_layers(path) if str(name) != STYLES_TABLE]
    return layers[0] if len(layers) == 1 else None


def read_layer(path: str | Path, layer: str | None = None) -> gpd.GeoDataFrame:
    """Read a vector layer in any OGR format (or GeoParquet), failing with one line on bad input."""
    p = Path(path)
    if not p.exists():
        raise LabelError(f"{p} does not exist; check the path")
    try:
        parquet = p.suffix.lower() in (".parquet", ".geoparquet")
        frame = gpd.read_parquet(p) if parquet else gpd.read_file(p, layer=layer or _only_layer(p), engine="pyogrio")
    except Exception as err:  # noqa: BLE001 - any reader failure is one line naming the file
        raise LabelError(
            f"cannot read {p}{f' layer {layer!r}' if layer else ''}: {first_line(err)}; give a polygon layer OGR can open"
        ) from None
    if not isinstance(frame, gpd.GeoDataFrame) or frame.geometry.name not in frame:
        raise LabelError(f"{p} has no geometry column; give a polygon layer")
    return frame


def _class_field(pred: pd.DataFrame, truth: pd.DataFrame, requested: str | None) -> str | None:
    if requested is not None:
        for name, frame in (("predictions", pred), ("truth", truth)):
            if requested not in frame.columns:
                raise LabelError(
                    f"{name} have no {requested!r} column (columns: {sorted(map(str, frame.columns))}); pass another --class-field"
                )
        return requested
    for name in CLASS_FIELDS:
        if name in pred.columns and name in truth.columns:
            return name
    return None


def frame_objects(frame: gpd.GeoDataFrame, class_field: str | None, score_field: str | None) -> Objects:
    """Turn a GeoDataFrame into :class:`Objects` (missing score → 1.0, no class field → one class)."""
    scores = frame[score_field].to_numpy(dtype=np.float64) if score_field and score_field in frame.columns else None
    labels = frame[class_field].astype(str).tolist() if class_field else None
    return Objects.of(frame.geometry.to_numpy(), scores, labels)


def to_crs_of(frame: gpd.GeoDataFrame, target: gpd.GeoDataFrame, what: str) -> gpd.GeoDataFrame:
    """Reproject ``frame`` to ``target``'s CRS; a missing CRS on either side is taken as the same one."""
    if frame.crs is None or target.crs is None:
        if frame.crs != target.crs:
            log.warning("%s or truth has no CRS; assuming both are in %s", what, frame.crs or target.crs)
        return frame
    return frame if frame.crs == target.crs else frame.to_crs(target.crs)


def check_layers(pred: gpd.GeoDataFrame, truth: gpd.GeoDataFrame, pred_name: str, truth_name: str) -> None:
    """Refuse layers whose scores would be a meaningless table of zeros, naming the cause.

    An empty layer, point truth and two layers that lie apart (one in the wrong CRS) all score 0
    without an error otherwise, which reads as a bad model rather than a bad input.

    Raises:
        LabelError: A layer is empty, the truth holds no polygons, or the extents do not overlap.
    """
    for what, frame, name in (("predictions", pred, pred_name), ("truth", truth, truth_name)):
        geoms = frame.geometry[~(frame.geometry.isna() | frame.geometry.is_empty)]
        if geoms.empty:
            raise LabelError(f"{what} {name} are an empty layer (no features); nothing to score; check the file (and its layer)")
        if not geoms.geom_type.isin(["Polygon", "MultiPolygon"]).any():
            kinds = ", ".join(sorted(set(geoms.geom_type)))
            raise LabelError(f"{what} must be polygons (or boxes drawn as polygons), {name} holds {kinds}; buffer or redraw them")
    extent = gpd.GeoSeries([shapely.box(*pred.total_bounds)], crs=pred.crs)
    if pred.crs is not None and truth.crs is not None and pred.crs != truth.crs:
        extent = extent.to_crs(truth.crs)
    if not extent.iloc[0].intersects(shapely.box(*truth.total_bounds)):
        where = f" ({pred.crs.to_string()} and {truth.crs.to_string()})" if pred.crs is not None and truth.crs is not None else ""
        raise LabelError(f"no overlap between the two layers' extents: {pred_name} and {truth_name} lie apart; check their CRSs{where}")


def evaluate_frames(
    pred: gpd.GeoDataFrame,
    truth: gpd.GeoDataFrame,
    *,
    iou_threshold: float = DEFAULT_IOU,
    box: bool = False,
    ignore: gpd.GeoDataFrame | None = None,
    tiles: gpd.GeoSeries | None = None,
    class_field: str | None = None,
    score_field: str = "score",
    compute_ap: bool = True,
    shape_metrics: bool = False,
) -> Evaluation:
    """Score prediction and truth layers in any CRS (predictions, ignore and tiles go to the truth's).

    Args:
        pred: Predicted polygons (``score`` ranks them for AP; absent → all 1.0).
        truth: Truth polygons.
        iou_threshold: IoU a match needs.
        box: Compare bounding boxes in the truth CRS.
        ignore: Polygons whose content is not scored.
        tiles: Tile read windows (with a CRS) for seam statistics.
        class_field: Column holding the class in both layers; ``None`` picks ``class`` or ``class_id``
            when both layers have it, else scores class-agnostically.
        score_field: Column holding prediction confidence.
        compute_ap: Whether to compute COCO AP.
        shape_metrics: Whether to score the matched pairs' outlines (C-IoU, PoLiS, angle, vertices).
    """
    pred = to_crs_of(pred, truth, "predictions")
    field = _class_field(pred, truth, class_field)
    if field is None:
        log.info("no class column in both layers; scoring class-agnostically")
    ign = None
    if ignore is not None:
        ign = to_crs_of(ignore, truth, "ignore layer").geometry.to_numpy()
    tile_geoms = None
    if tiles is not None:
        tile_frame = gpd.GeoDataFrame(geometry=tiles)
        tile_geoms = to_crs_of(tile_frame, truth, "tiles").geometry.to_numpy()
    return evaluate(
        frame_objects(pred, field, score_field),
        frame_objects(truth, field, None),
        iou_threshold=iou_threshold,
        box=box,
        ignore=ign,
        tiles=tile_geoms,
        compute_ap=compute_ap,
        shape_metrics=shape_metrics,
    )


def check_iou(iou_threshold: float) -> float:
    """Return ``iou_threshold`` if usable, else raise a one-line :class:`LabelError`."""
    if not (0.0 < iou_threshold <= 1.0) or math.isnan(iou_threshold):
        raise LabelError(f"IoU threshold must be in (0, 1], got {iou_threshold}; the SpaceNet metric uses 0.5")
    return iou_threshold
