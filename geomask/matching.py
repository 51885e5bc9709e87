"""Pairing predictions with truth objects: overlap, one-to-one matching and COCO AP.

The one matcher of geomask: ``geomask evaluate`` runs it on polygons (pairs from an ``STRtree``) and
training's validation on pixel masks (pairs from a mask product), so both report the same F1. Pure
numpy and shapely: no file, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import shapely
from shapely import STRtree

GeometryArray = npt.NDArray[np.object_]
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]

DEFAULT_IOU = 0.5
COCO_IOUS: tuple[float, ...] = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))
AREA_EPS = 1e-9  # relative: areas below this fraction of an object's area are numerical noise
# IoU of pixel-traced polygons is often exactly 0.5 in pixel units; in map units rounding moves it either way.
IOU_EPS = 1e-9


@dataclass(frozen=True)
class Pairs:
    """Overlapping (prediction, truth) pairs with their overlap measures.

    Attributes:
        pred: Prediction index of each pair.
        truth: Truth index of each pair.
        iou: Intersection over union.
        in_pred: Intersection over the prediction's area (how much of the prediction lies in the truth).
    """

    pred: IntArray
    truth: IntArray
    iou: FloatArray
    in_pred: FloatArray

    def take(self, keep: npt.NDArray[np.bool_]) -> Pairs:
        return Pairs(self.pred[keep], self.truth[keep], self.iou[keep], self.in_pred[keep])


def overlapping_pairs(pred: GeometryArray, truth: GeometryArray) -> Pairs:
    """Return every (prediction, truth) pair whose interiors overlap, found with an ``STRtree``."""
    empty_i = np.zeros(0, dtype=np.intp)
    if len(pred) == 0 or len(truth) == 0:
        return Pairs(empty_i, empty_i, np.zeros(0), np.zeros(0))
    tree = STRtree(truth)
    pi, ti = tree.query(pred, predicate="intersects")
    inter = shapely.area(shapely.intersection(pred[pi], truth[ti]))
    ap, at = shapely.area(pred[pi]), shapely.area(truth[ti])
    keep = inter > AREA_EPS * np.minimum(ap, at)  # touching along an edge is not overlapping
    pi, ti, inter, ap, at = pi[keep], ti[keep], inter[keep], ap[keep], at[keep]
    iou = inter / (ap + at - inter)
    in_pred = np.divide(inter, ap, out=np.zeros_like(inter), where=ap > 0)
    return Pairs(pi.astype(np.intp), ti.astype(np.intp), iou, in_pred)


def match_one_to_one(pairs: Pairs, iou_threshold: float) -> Pairs:
    """Match greedily by IoU (highest first), each prediction and truth object at most once.

    With IoU ≥ 0.5 the greedy matching is the optimal one: a prediction can overlap at most one truth
    object that much when truth objects do not overlap, and vice versa.
    """
    cand = np.flatnonzero(pairs.iou >= iou_threshold - IOU_EPS)
    order = cand[np.lexsort((pairs.truth[cand], pairs.pred[cand], -pairs.iou[cand]))]
    used_p: set[int] = set()
    used_t: set[int] = set()
    chosen: list[int] = []
    for k in order.tolist():
        p, t = int(pairs.pred[k]), int(pairs.truth[k])
        if p in used_p or t in used_t:
            continue
        used_p.add(p)
        used_t.add(t)
        chosen.append(k)
    keep = np.zeros(len(pairs.iou), dtype=bool)
    keep[chosen] = True
    return pairs.take(keep)


def average_precision(pairs: Pairs, scores: FloatArray, n_truth: int, iou_threshold: float) -> float | None:
    """Return COCO's 101-point interpolated AP at one IoU threshold, ``None`` without truth objects.

    Predictions are taken by score (highest first, ties by index); each takes the unmatched truth
    object it overlaps most at ``iou_threshold`` or above, as COCO's evaluator does.
    """
    if n_truth == 0:
        return None
    n_pred = len(scores)
    if n_pred == 0:
        return 0.0
    cand = np.flatnonzero(pairs.iou >= iou_threshold - IOU_EPS)
    by_pred: dict[int, list[tuple[float, int]]] = {}
    for k in cand.tolist():
        by_pred.setdefault(int(pairs.pred[k]), []).append((float(pairs.iou[k]), int(pairs.truth[k])))
    order = np.lexsort((np.arange(n_pred), -scores))
    taken: set[int] = set()
    tp = np.zeros(n_pred, dtype=bool)
    for rank, p in enumerate(order.tolist()):
        best = -1.0
        best_t = -1
        for iou, t in by_pred.get(p, ()):
            if t not in taken and iou > best:
                best, best_t = iou, t
        if best_t >= 0:
            taken.add(best_t)
            tp[rank] = True
    ctp = np.cumsum(tp)
    recall = ctp / n_truth
    precision = ctp / np.arange(1, n_pred + 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]  # precision never rises with recall
    points = np.linspace(0.0, 1.0, 101)
    at = np.searchsorted(recall, points, side="left")
    sampled = np.where(at < n_pred, envelope[np.minimum(at, n_pred - 1)], 0.0)
    return float(sampled.mean())


def coco_ap(pairs: Pairs, scores: FloatArray, n_truth: int) -> tuple[float | None, float | None, float | None]:
    """Return COCO's AP averaged over IoU 0.50:0.05:0.95, and AP at 0.50 and at 0.75 (``None`` without truth)."""
    per = [average_precision(pairs, scores, n_truth, t) for t in COCO_IOUS]
    if per[0] is None:
        return None, None, None
    vals = [v for v in per if v is not None]
    return float(np.mean(vals)), per[0], per[5]
