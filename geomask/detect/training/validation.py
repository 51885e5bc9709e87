"""Validation during training: F1 at mask IoU 0.5 on fixed chips, matched by :mod:`geomask.matching`.

The matching is the one ``geomask evaluate`` applies to polygons (one-to-one, greedy by IoU), here on
pixel masks, so the validation F1 a run logs and the F1 of its predictions on a test area measure the
same thing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from rasterio.windows import Window

from geomask.detect.base import TileImage
from geomask.detect.maskrcnn import MaskRCNNDetector
from geomask.detect.training.augment import Chip
from geomask.matching import DEFAULT_IOU, Pairs, match_one_to_one
from geomask.tiling import Tile

BoolArray = npt.NDArray[np.bool_]


def mask_pairs(pred_masks: Sequence[BoolArray], true_masks: Sequence[BoolArray]) -> Pairs:
    """Return every overlapping (prediction, truth) pair of same-shaped pixel masks with its IoU."""
    empty = np.zeros(0, dtype=np.intp)
    if not pred_masks or not true_masks:
        return Pairs(empty, empty, np.zeros(0), np.zeros(0))
    p = np.stack([m.ravel() for m in pred_masks]).astype(np.float32)
    t = np.stack([m.ravel() for m in true_masks]).astype(np.float32)
    inter = (p @ t.T).astype(np.float64)
    area_p = p.sum(1).astype(np.float64)
    union = area_p[:, None] + t.sum(1)[None, :] - inter
    pi, ti = np.nonzero(inter > 0)
    iou = inter[pi, ti] / np.maximum(union[pi, ti], 1.0)
    return Pairs(pi.astype(np.intp), ti.astype(np.intp), iou, inter[pi, ti] / np.maximum(area_p[pi], 1.0))


def match_f1(
    pred_masks: Sequence[BoolArray],
    pred_scores: Sequence[float],
    true_masks: Sequence[BoolArray],
    iou: float = DEFAULT_IOU,
    ignore_true: Sequence[bool] | None = None,
    ignore_pred: Sequence[bool] | None = None,
) -> tuple[int, int, int]:
    """Match predictions to truth one-to-one at mask IoU ≥ ``iou``: ``(tp, fp, fn)``.

    Pairs are taken by :func:`geomask.matching.match_one_to_one` (highest IoU first); among equal
    IoUs the higher-scoring prediction wins. Ignored truths (e.g. objects cut by the chip edge) count
    neither as misses nor, when matched, as hits; an ignored prediction that matches no counted truth
    is not a false positive.
    """
    ign_t = np.zeros(len(true_masks), dtype=bool) if ignore_true is None else np.asarray(ignore_true, dtype=bool)
    ign_p = np.zeros(len(pred_masks), dtype=bool) if ignore_pred is None else np.asarray(ignore_pred, dtype=bool)
    by_score = np.argsort(-np.asarray(pred_scores, dtype=np.float64), kind="stable")
    matches = match_one_to_one(mask_pairs([pred_masks[i] for i in by_score], true_masks), iou)
    matched_p = np.zeros(len(pred_masks), dtype=bool)
    matched_p[by_score[matches.pred]] = True
    matched_t = np.zeros(len(true_masks), dtype=bool)
    matched_t[matches.truth] = True
    tp = int((~ign_t[matches.truth]).sum())
    fp = int((~matched_p & ~ign_p).sum())
    return tp, fp, int((~matched_t & ~ign_t).sum())


def touches_edge(mask: BoolArray) -> bool:
    """Return whether a chip-sized mask reaches the chip's border (the object may be cut there)."""
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def evaluate_chips(detector: MaskRCNNDetector, chips: Sequence[Chip], batch_size: int) -> dict[str, float]:
    """Score ``detector`` on chips: precision, recall and F1 at mask IoU 0.5, summed over chips.

    Objects touching a chip's border are ignored (neither hit, miss nor false positive), as the
    ``*_labels_edge`` layers of the buildings data are: a cut object's fragment is no fair target.
    """
    tp = fp = fn = 0
    for start in range(0, len(chips), batch_size):
        part = chips[start : start + batch_size]
        size = part[0].valid.shape[0]
        tile = Tile(0, 0, 0, Window(0, 0, size, size), Window(0, 0, size, size), None)
        results = detector.detect([TileImage(tile, c.pixels, c.valid) for c in part])
        for chip, found in zip(part, results, strict=True):
            pm = []
            for inst in found:
                full = np.zeros(chip.valid.shape, dtype=bool)
                full[inst.row_off : inst.row_off + inst.height, inst.col_off : inst.col_off + inst.width] = inst.mask
                pm.append(full & chip.valid)
            # Objects cut by the chip edge are scored on the chip they lie in wholly, if any: ignore them here.
            a, b, c = match_f1(
                pm, [i.score for i in found], chip.masks, DEFAULT_IOU, [touches_edge(m) for m in chip.masks], [touches_edge(m) for m in pm]
            )
            tp, fp, fn = tp + a, fp + b, fn + c
    precision = tp / max(1, tp + fp)
    recall = tp / max(1, tp + fn)
    f1 = 2 * precision * recall / max(1e-9, precision + recall)
    return {"val_precision": precision, "val_recall": recall, "val_f1": f1, "val_tp": float(tp), "val_fp": float(fp), "val_fn": float(fn)}
