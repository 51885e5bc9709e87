"""Online hard-negative mining: where the model being trained reports an object that no label has.

A background chip drawn anywhere in a city still holds buildings, and a model trained from scratch
learns little about yards, roads and parked cars from it (``positive_fraction`` 0.5 lowered every
cross-validation fold: MODEL_CARD.md). Mining asks the model itself: every ``hard_negative_every``
iterations after the warm-up it reads ``hard_negative_windows`` background windows, unaugmented, and
keeps the centre of every detection (score ≥ ``val_score_threshold``) whose box is mostly unlabelled —
a false positive. From then on a share ``hard_negatives`` of the chips is centred near those spots
(:class:`geomask.detect.training.chips.ChipSampler`), so the model is shown exactly what it gets wrong,
with the true labels (often none) as targets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import numpy as np
import torch

from geomask.detect.training.chips import ChipReader, Spot

# A detection is a false positive when labels cover less than this share of its box.
MAX_LABELLED_SHARE = 0.2


def false_positives(
    model: torch.nn.Module,
    reader: ChipReader,
    windows: Sequence[tuple[int, float, float]],
    score_threshold: float,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager[object]],
) -> list[Spot]:
    """Return the working-grid centres of the detections in ``windows`` that no label accounts for.

    Args:
        model: The torchvision Mask R-CNN being trained (put in eval mode here, back in train mode after).
        reader: Reads chips of the training rasters, labels burned.
        windows: Chip top-left corners ``(raster, row, col)`` at scale 1 (:meth:`ChipSampler.background_window`).
        score_threshold: Detections below this score are not counted.
        device: Where the model is.
        autocast: The trainer's mixed-precision context.
    """
    spots: list[Spot] = []
    was_training = model.training
    model.eval()
    try:
        for k, row, col in windows:
            chip = reader.read(k, row, col, 1.0)
            row0, col0, fy, fx, _, _ = reader.place(k, row, col, 1.0)
            with torch.no_grad(), autocast():
                (out,) = model([torch.from_numpy(chip.pixels).to(device)])
            labelled = np.any(np.stack(chip.masks), axis=0) if chip.masks else np.zeros(chip.valid.shape, dtype=bool)
            for box, score in zip(out["boxes"].float().cpu().numpy(), out["scores"].float().cpu().numpy(), strict=True):
                if score < score_threshold:
                    continue
                c0, r0, c1, r1 = (int(v) for v in np.round(box))
                area = max(1, (r1 - r0) * (c1 - c0))
                h, w = chip.valid.shape
                if not chip.valid[int(np.clip((r0 + r1) // 2, 0, h - 1)), int(np.clip((c0 + c1) // 2, 0, w - 1))]:
                    continue  # in the padding of a raster smaller than a chip, or in nodata
                if labelled[max(0, r0) : r1, max(0, c0) : c1].sum() < MAX_LABELLED_SHARE * area:
                    spots.append(Spot(k, row0 + (r0 + r1) / 2 * fy, col0 + (c0 + c1) / 2 * fx))
    finally:
        model.train(was_training)
    return spots
