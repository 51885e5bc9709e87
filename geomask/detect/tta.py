"""Test-time augmentation for the built-in Mask R-CNN: the views of a tile and their fusion.

Nadir imagery has no "up", so the eight flips and quarter turns of a tile are equally valid views.
Each view's detections are mapped back to the tile's orientation and fused per tile (mask voting,
score summed over views) before the cross-tile merge, so the merge sees one set of instances per tile
exactly as without TTA.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

#: Test-time views as ``(quarter turns, horizontal flip)``: the first 4 are the flips (identity, h, v = 180° + h,
#: 180°), all 8 the dihedral group of the square.
TTA_VIEWS = ((0, False), (0, True), (2, True), (2, False), (1, False), (1, True), (3, False), (3, True))
TTA_CHOICES = (1, 4, 8)
#: Mask IoU at which detections of two views are one object.
TTA_MATCH_IOU = 0.5


def view_image(image: torch.Tensor, turns: int, flip: bool) -> torch.Tensor:
    """Return a ``(..., side, side)`` image rotated by ``turns`` quarter turns, then flipped left-right if ``flip``."""
    out = torch.rot90(image, turns, dims=(-2, -1))
    return out.flip(-1) if flip else out


def unview_output(output: dict[str, torch.Tensor], turns: int, flip: bool) -> dict[str, torch.Tensor]:
    """Map one view's masks back to the tile's orientation (boxes are dropped: they follow from the masks)."""
    masks = output["masks"].flip(-1) if flip else output["masks"]
    return {"masks": torch.rot90(masks, -turns, dims=(-2, -1)), "scores": output["scores"], "labels": output["labels"]}


def fuse_views(
    views: Sequence[dict[str, torch.Tensor]], score_threshold: float, mask_threshold: float, limit: int
) -> dict[str, torch.Tensor]:
    """Fuse the detections of several views of one tile (all in the tile's orientation) into one set.

    Views are visited in order and, within a view, detections by score: a detection joins the best
    group of its class whose mean mask it overlaps by mask IoU ≥ :data:`TTA_MATCH_IOU` and that has no
    member from this view yet, else it starts a group. A group's mask is its members' mean probability
    (mask voting); its score is the members' score sum over ``len(views)``, i.e. a view that missed the
    object counts as score 0. Groups scoring below ``score_threshold`` are dropped; at most ``limit``,
    best first, are kept.

    Args:
        views: torchvision outputs with ``masks`` ``(n, 1, h, w)`` probabilities, ``scores`` and ``labels``.
        score_threshold: Smallest fused score kept.
        mask_threshold: Probability at which a pixel is in a mask, for matching.
        limit: Most objects returned.

    Returns:
        ``masks``, ``scores`` and ``labels`` like a torchvision output, best first.
    """
    first = views[0]["masks"]
    h, w = first.shape[-2:]
    sums: list[torch.Tensor] = []  # per group: probability sum (h*w,)
    score_sum: list[float] = []
    count: list[int] = []
    labels: list[int] = []
    for out in views:
        probs = out["masks"].reshape(-1, h * w).float()
        if probs.shape[0] == 0:
            continue
        scores = out["scores"].float().cpu().numpy()
        labs = out["labels"].cpu().numpy()
        n_old = len(sums)
        if n_old:
            means = torch.stack(sums) / torch.tensor(count, dtype=torch.float32, device=probs.device)[:, None]
            group_bin = (means >= mask_threshold).float()
            binary = (probs >= mask_threshold).float()
            inter = binary @ group_bin.T
            union = binary.sum(1, keepdim=True) + group_bin.sum(1)[None, :] - inter
            iou = (inter / union.clamp(min=1.0)).cpu().numpy()
            iou[labs[:, None] != np.asarray(labels)[None, :]] = -1.0  # only groups of the same class
        taken = np.zeros(n_old, dtype=bool)  # a group takes at most one member per view
        for i in np.argsort(-scores, kind="stable"):
            g = -1
            if n_old:
                row = np.where(taken, -1.0, iou[i])
                g = int(row.argmax())
                g = g if row[g] >= TTA_MATCH_IOU else -1
            if g < 0:
                sums.append(probs[i].clone())
                score_sum.append(float(scores[i]))
                count.append(1)
                labels.append(int(labs[i]))
            else:
                sums[g] += probs[i]
                score_sum[g] += float(scores[i])
                count[g] += 1
                taken[g] = True
    fused = torch.tensor(score_sum, dtype=torch.float32) / len(views)
    keep = [g for g in torch.argsort(fused, descending=True).tolist() if float(fused[g]) >= score_threshold][:limit]
    device = first.device
    if not keep:
        return {
            "masks": first.new_zeros((0, 1, h, w), dtype=torch.float32),
            "scores": fused[:0].to(device),
            "labels": views[0]["labels"][:0],
        }
    masks = torch.stack([sums[g] / count[g] for g in keep]).reshape(-1, 1, h, w)
    return {
        "masks": masks,
        "scores": fused[keep].to(device),
        "labels": torch.tensor([labels[g] for g in keep], dtype=torch.int64, device=device),
    }
