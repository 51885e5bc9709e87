"""What an evaluation reports: the objects scored, the counts and rates of each slice, the text table.

A *slice* is all objects, one class, or one seam group (:mod:`geomask.seams`); :func:`score_slice`
counts the one-to-one matches, duplicates and splits that fall on it. :mod:`geomask.evaluate` does the
matching and puts the slices together into an :class:`Evaluation`, which renders as a text table or
JSON (and, through :mod:`geomask.report`, as a page).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from geomask.matching import IOU_EPS, Pairs
from geomask.polygon_metrics import ShapeScores

GeometryArray = npt.NDArray[np.object_]
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]

# A prediction at least this much inside a truth object is a piece of it (duplicate / split counting).
PIECE_FRACTION = 0.5


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
    """The result of :func:`geomask.evaluate.evaluate`.

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


def pieces_per_truth(pairs: Pairs, n_truth: int) -> npt.NDArray[np.int64]:
    is_piece = pairs.in_pred >= PIECE_FRACTION - IOU_EPS
    return np.bincount(pairs.truth[is_piece], minlength=n_truth).astype(np.int64)


def score_slice(
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
