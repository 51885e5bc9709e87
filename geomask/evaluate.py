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

Results are frozen dataclasses that render as a text table or JSON.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import numpy.typing as npt
import pandas as pd
import pyogrio
import shapely
import shapely.affinity
from affine import Affine
from shapely import STRtree

from geomask.errors import LabelError, first_line
from geomask.matching import AREA_EPS, DEFAULT_IOU, IOU_EPS, Pairs, coco_ap, match_one_to_one, overlapping_pairs
from geomask.polygon_metrics import ShapeScores, shape_scores
from geomask.qgis_style import STYLES_TABLE
from geomask.tiling import Tile

log = logging.getLogger(__name__)

GeometryArray = npt.NDArray[np.object_]
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]

# A prediction (or object) at least this much inside ignore polygons is not counted.
IGNORE_FRACTION = 0.5
# A prediction at least this much inside a truth object is a piece of it (duplicate / split counting).
PIECE_FRACTION = 0.5
CLASS_FIELDS = ("class", "class_id")
SPAN_BUCKETS: tuple[tuple[str, int, int], ...] = (("1 tile", 1, 1), ("2 tiles", 2, 2), ("3-4 tiles", 3, 4), (">=5 tiles", 5, 1 << 30))


@dataclass(frozen=True)
class Objects:
    """Polygons to score, with their ranking score and class label (one CRS for all).

    Attributes:
        geometry: Shapely polygons or multipolygons.
        score: Confidence used to rank predictions for AP (1.0 for truth).
        label: Class label as text; ``""`` everywhere when scoring class-agnostically.
    """

    geometry: GeometryArray
    score: FloatArray
    label: npt.NDArray[np.str_]

    @classmethod
    def of(
        cls, geometry: Sequence[Any] | GeometryArray, score: Sequence[float] | None = None, label: Sequence[str] | None = None
    ) -> Objects:
        """Build from plain sequences; missing scores are 1.0 and missing labels ``""``."""
        geoms = np.asarray(list(geometry), dtype=object)
        n = len(geoms)
        scores = np.ones(n) if score is None else np.asarray(score, dtype=np.float64)
        labels = np.full(n, "", dtype=str) if label is None else np.asarray([str(v) for v in label], dtype=str)
        if len(scores) != n or len(labels) != n:
            raise ValueError(f"Objects needs one score and one label per geometry, got {n}, {len(scores)}, {len(labels)}")
        return cls(geoms, scores, labels)

    def __len__(self) -> int:
        return len(self.geometry)

    def take(self, keep: npt.NDArray[np.bool_] | IntArray) -> Objects:
        return Objects(self.geometry[keep], self.score[keep], self.label[keep])


@dataclass(frozen=True)
class Scores:
    """Counts and rates for one slice of the data (all objects, one class, or one seam group).

    Attributes:
        name: What the slice is (``all``, a class name, ``crosses a tile edge``, ``2 tiles``…).
        n_truth: Truth objects counted.
        n_pred: Predictions counted.
        tp: One-to-one matches at the IoU threshold.
        mean_iou: Mean IoU of the matches, ``None`` without matches.
        duplicates: Matched truth objects with at least one more prediction mostly inside them.
        splits: Unmatched truth objects covered by two or more predictions mostly inside them.
        ap: COCO mask (or box) AP over IoU 0.50:0.95, ``None`` when not computed or no truth.
        ap50: AP at IoU 0.50.
        ap75: AP at IoU 0.75.
    """

    name: str
    n_truth: int
    n_pred: int
    tp: int
    mean_iou: float | None
    duplicates: int
    splits: int
    ap: float | None = None
    ap50: float | None = None
    ap75: float | None = None

    @property
    def fp(self) -> int:
        return self.n_pred - self.tp

    @property
    def fn(self) -> int:
        return self.n_truth - self.tp

    @property
    def precision(self) -> float | None:
        return self.tp / self.n_pred if self.n_pred else None

    @property
    def recall(self) -> float | None:
        return self.tp / self.n_truth if self.n_truth else None

    @property
    def f1(self) -> float | None:
        # 2TP / (P + T) equals the harmonic mean of precision and recall and is defined when either is 0.
        total = self.n_pred + self.n_truth
        return 2 * self.tp / total if total else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n_truth": self.n_truth,
            "n_pred": self.n_pred,
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "mean_iou": self.mean_iou,
            "duplicates": self.duplicates,
            "splits": self.splits,
            "ap": self.ap,
            "ap50": self.ap50,
            "ap75": self.ap75,
        }


@dataclass(frozen=True)
class Evaluation:
    """The result of :func:`evaluate`.

    Attributes:
        iou_threshold: IoU a match needs.
        box: Whether bounding boxes were compared instead of polygons.
        overall: Scores over every class (AP is the mean over classes).
        per_class: Scores per class label, empty when scoring class-agnostically.
        seams: Scores per seam group (crossing a tile edge or not, then tiles spanned), empty without tiles.
        n_ignored_truth: Truth objects dropped by the ignore layer.
        n_ignored_pred: Predictions dropped by the ignore layer.
        shape: Outline metrics (C-IoU, PoLiS, ...) of the matched pairs, ``None`` unless asked for.
    """

    iou_threshold: float
    box: bool
    overall: Scores
    per_class: tuple[Scores, ...] = ()
    seams: tuple[Scores, ...] = ()
    n_ignored_truth: int = 0
    n_ignored_pred: int = 0
    shape: ShapeScores | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "iou_threshold": self.iou_threshold,
            "box": self.box,
            "overall": self.overall.to_dict(),
            "per_class": [s.to_dict() for s in self.per_class],
            "seams": [s.to_dict() for s in self.seams],
            "n_ignored_truth": self.n_ignored_truth,
            "n_ignored_pred": self.n_ignored_pred,
            "shape": self.shape.to_dict() if self.shape is not None else None,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        """Render as a fixed-width text table (overall, then classes, then seam groups)."""
        kind = "box" if self.box else "mask"
        head = f"{kind} IoU >= {self.iou_threshold:g}"
        if self.n_ignored_truth or self.n_ignored_pred:
            head += f"; ignored {self.n_ignored_truth} truth, {self.n_ignored_pred} predicted"
        lines = [head, format_scores([self.overall, *self.per_class])]
        if self.shape is not None:
            lines += ["", self.shape.table()]
        if self.seams:
            lines += ["", "seams (truth objects by the tiles that see them)", format_scores(self.seams, ap=False)]
        return "\n".join(lines)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_scores(rows: Sequence[Scores], ap: bool = True) -> str:
    """Format score rows as a fixed-width text table."""
    cols = ["", "truth", "pred", "TP", "FP", "FN", "prec", "recall", "F1", "mIoU", "dup", "split"]
    if ap:
        cols += ["AP", "AP50", "AP75"]
    body = []
    for s in rows:
        row = [s.name, str(s.n_truth), str(s.n_pred), str(s.tp), str(s.fp), str(s.fn)]
        row += [_fmt(s.precision), _fmt(s.recall), _fmt(s.f1), _fmt(s.mean_iou), str(s.duplicates), str(s.splits)]
        if ap:
            row += [_fmt(s.ap), _fmt(s.ap50), _fmt(s.ap75)]
        body.append(row)
    widths = [max(len(r[k]) for r in [cols, *body]) for k in range(len(cols))]
    out = []
    for r in [cols, *body]:
        out.append("  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip())
    return "\n".join(out)


def _pieces_per_truth(pairs: Pairs, n_truth: int) -> npt.NDArray[np.int64]:
    is_piece = pairs.in_pred >= PIECE_FRACTION - IOU_EPS
    return np.bincount(pairs.truth[is_piece], minlength=n_truth).astype(np.int64)


def _scores(
    name: str,
    truth_idx: IntArray,
    pred_idx: IntArray,
    matches: Pairs,
    pieces: npt.NDArray[np.int64],
    ap: tuple[float | None, float | None, float | None] = (None, None, None),
) -> Scores:
    """Summarise the matches that fall on the given truth objects and predictions."""
    in_t = np.zeros(len(pieces), dtype=bool)
    in_t[truth_idx] = True
    sel = in_t[matches.truth] & np.isin(matches.pred, pred_idx)
    matched = np.zeros(len(pieces), dtype=bool)
    matched[matches.truth[sel]] = True
    ious = matches.iou[sel]
    dup = int(np.count_nonzero(matched[truth_idx] & (pieces[truth_idx] >= 2)))
    split = int(np.count_nonzero(~matched[truth_idx] & (pieces[truth_idx] >= 2)))
    return Scores(
        name=name,
        n_truth=len(truth_idx),
        n_pred=len(pred_idx),
        tp=int(np.count_nonzero(sel)),
        mean_iou=float(ious.mean()) if ious.size else None,
        duplicates=dup,
        splits=split,
        ap=ap[0],
        ap50=ap[1],
        ap75=ap[2],
    )


# --------------------------------------------------------------------------------------------------
# Ignore regions and tiles
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


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
    pieces = _pieces_per_truth(all_pairs, len(truth))

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
        per_class.append(_scores(lab or "all", t_idx, p_idx, matches, pieces, ap))

    overall_ap: tuple[float | None, float | None, float | None] = (None, None, None)
    with_truth = [a for a in aps if a[0] is not None]
    if with_truth:
        overall_ap = tuple(float(np.mean([a[k] for a in with_truth])) for k in range(3))  # type: ignore[assignment]
    overall = _scores("all", np.arange(len(truth)), np.arange(len(pred)), matches, pieces, overall_ap)
    class_rows = tuple(per_class) if labels != [""] else ()

    seams: tuple[Scores, ...] = ()
    if tiles is not None:
        seams = _seam_scores(pred, truth, np.asarray(tiles, dtype=object), matches, all_pairs, pieces)
    shape = shape_scores(list(pred.geometry[matches.pred]), list(truth.geometry[matches.truth])) if shape_metrics else None
    return Evaluation(iou_threshold, box, overall, class_rows, seams, n_ign_t, n_ign_p, shape)


def _seam_scores(
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
        rows.append(_scores(name, np.flatnonzero(t_sel), np.flatnonzero(p_sel), matches, pieces))
    for name, lo, hi in SPAN_BUCKETS:
        t_sel = (t_cover.span >= lo) & (t_cover.span <= hi)
        p_sel = (p_span >= lo) & (p_span <= hi)
        rows.append(_scores(f"seen by {name}", np.flatnonzero(t_sel), np.flatnonzero(p_sel), matches, pieces))
    if not (t_seen.all() and p_seen.all()):
        rows.append(_scores("seen by no tile", np.flatnonzero(~t_seen), np.flatnonzero(~p_seen), matches, pieces))
    return tuple(rows)


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


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
