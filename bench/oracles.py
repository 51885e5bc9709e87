"""Oracle detectors for the seam benchmark: per-tile predictions made from the truth label raster.

Both plug into geomask through ``detector.factory`` (``oracles:exact_truth_detector`` or
``oracles:noisy_truth_detector`` with ``bench/`` on ``PYTHONPATH``), so the benchmark measures the
real pipeline: reading, tiling, cleaning, merging, vectorising.

* **exact**: every object clipped to the tile's read window (``geomask.testing.TruthDetector``'s
  masks), scored 0.5 + 0.5 × the share of the object the tile sees.
* **noisy**: what a decent model does at a tile edge — the boundary moves by 1–2 px in patches
  (independently in each tile, so two tiles disagree in their overlap), fragments under 100 px cut
  by the tile edge are dropped half of the time, scores are lower for cut objects and noisy, and a
  few small false positives appear on background. The noise is seeded per tile, so a tile gives the
  same instances whatever the batch or the process that runs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import rasterio
from rasterio.windows import Window

from geomask.detect.base import TileImage
from geomask.instances import Instance, from_mask
from geomask.testing import TruthDetector, instances_from_labels

BoolArray = npt.NDArray[np.bool_]

MARGIN_PX = 3  # labels read around a tile so jitter near its edge comes from the real outline
PATCH_PX = 6  # the boundary moves in patches of this size, not pixel by pixel
SMALL_FRAGMENT_PX = 100


def dilate(m: BoolArray) -> BoolArray:
    """Grow a mask by one pixel (4-neighbourhood)."""
    out = m.copy()
    out[1:] |= m[:-1]
    out[:-1] |= m[1:]
    out[:, 1:] |= m[:, :-1]
    out[:, :-1] |= m[:, 1:]
    return out


def _erode(m: BoolArray) -> BoolArray:
    return ~dilate(~m)


def jitter(mask: BoolArray, offsets: npt.NDArray[np.int8]) -> BoolArray:
    """Move the boundary of ``mask`` outwards (offset > 0) or inwards (< 0) by up to 2 px, per pixel."""
    padded = np.pad(mask, 2)
    d = np.pad(offsets, 2, mode="edge")
    er1 = _erode(padded)
    di1 = dilate(padded)
    out = np.where(d <= -2, _erode(er1), np.where(d == -1, er1, np.where(d == 0, padded, np.where(d == 1, di1, dilate(di1)))))
    return out[2:-2, 2:-2]


class ExactTruthDetector(TruthDetector):
    """Truth clipped to each tile; the score grows with the visible share of the object.

    Masks are exact. Scores are not all 1.0 because a model is surer of an object it sees whole, and
    because tied scores hit a tie-breaking flaw in SAHI's NMM (see the benchmark notes).
    """

    def __init__(self, labels: str | Path, classes: Sequence[str] = ("object",), tile_size_px: int | None = None):
        super().__init__(labels, classes, tile_size_px)
        self.name = f"exact-truth:{Path(self.labels).name}"
        self._areas: npt.NDArray[np.int64] | None = None

    def _full_areas(self) -> npt.NDArray[np.int64]:
        if self._areas is None:
            with rasterio.open(self.labels) as src:
                self._areas = np.bincount(src.read(1).ravel())
        return self._areas

    def detect(self, batch: Sequence[TileImage]) -> list[list[Instance]]:
        if self._src is None:
            self._src = rasterio.open(self.labels)
        areas = self._full_areas()
        out = []
        for image in batch:
            win = image.tile.read
            labels = self._src.read(1, window=win)
            r0, c0 = int(win.row_off), int(win.col_off)
            found = []
            for inst in instances_from_labels(labels, r0, c0):
                full = int(areas[_object_id(inst, labels, r0, c0)])
                found.append(Instance(inst.row_off, inst.col_off, inst.mask, 0.5 + 0.5 * inst.area_px / full, inst.class_id))
            out.append(found)
        return out


def _object_id(inst: Instance, labels: npt.NDArray[np.integer], r0: int, c0: int) -> int:
    rr, cc = inst.row_off - r0, inst.col_off - c0
    return int(labels[rr : rr + inst.height, cc : cc + inst.width][inst.mask][0])


class NoisyTruthDetector(ExactTruthDetector):
    """Truth clipped to each tile, perturbed the way a model's output differs from tile to tile."""

    def __init__(
        self,
        labels: str | Path,
        seed: int = 0,
        jitter_px: int = 2,
        drop_probability: float = 0.5,
        false_positives_per_tile: float = 0.4,
        classes: Sequence[str] = ("object",),
        tile_size_px: int | None = None,
    ):
        super().__init__(labels, classes, tile_size_px)
        self.name = f"noisy-truth:{Path(self.labels).name}"
        self.seed = seed
        self.jitter_px = jitter_px
        self.drop_probability = drop_probability
        self.false_positives_per_tile = false_positives_per_tile

    def detect(self, batch: Sequence[TileImage]) -> list[list[Instance]]:
        if self._src is None:
            self._src = rasterio.open(self.labels)
        return [self._detect_tile(image) for image in batch]

    def _detect_tile(self, image: TileImage) -> list[Instance]:
        assert self._src is not None
        areas = self._full_areas()
        tile = image.tile
        rng = np.random.default_rng([self.seed, tile.index])
        win = tile.read
        t0, l0 = int(win.row_off), int(win.col_off)
        t1, l1 = t0 + int(win.height), l0 + int(win.width)
        # Read a margin around the tile so that erosion next to the tile edge follows the real outline.
        r0, c0 = max(0, t0 - MARGIN_PX), max(0, l0 - MARGIN_PX)
        r1, c1 = min(self._src.height, t1 + MARGIN_PX), min(self._src.width, l1 + MARGIN_PX)
        labels = self._src.read(1, window=Window(c0, r0, c1 - c0, r1 - r0))
        shape = labels.shape
        coarse = rng.integers(-self.jitter_px, self.jitter_px + 1, size=(shape[0] // PATCH_PX + 1, shape[1] // PATCH_PX + 1))
        offsets = np.repeat(np.repeat(coarse.astype(np.int8), PATCH_PX, axis=0), PATCH_PX, axis=1)[: shape[0], : shape[1]]
        out: list[Instance] = []
        for inst in instances_from_labels(labels, r0, c0):
            out.extend(self._perturb(inst, labels, r0, c0, (t0, l0, t1, l1), offsets, areas, rng))
        out.extend(self._false_positives(labels, r0, c0, (t0, l0, t1, l1), rng))
        return out

    def _perturb(
        self,
        inst: Instance,
        labels: npt.NDArray[np.integer],
        r0: int,
        c0: int,
        tile: tuple[int, int, int, int],
        offsets: npt.NDArray[np.int8],
        areas: npt.NDArray[np.int64],
        rng: np.random.Generator,
    ) -> list[Instance]:
        rr, cc = inst.row_off - r0, inst.col_off - c0
        obj_id = _object_id(inst, labels, r0, c0)
        # The exact fragment this tile sees, to decide whether a model would find it at all.
        vis = _clip(inst.mask, inst.row_off, inst.col_off, tile)
        if vis is None:
            return []
        visible = int(vis[0].sum())
        full = int(areas[obj_id]) if obj_id < len(areas) else visible
        if visible < full and visible < SMALL_FRAGMENT_PX and rng.random() < self.drop_probability:
            return []
        d = offsets[rr : rr + inst.height, cc : cc + inst.width]
        if min(inst.height, inst.width) < 8:
            d = np.clip(d, -1, 1)
        # Dilation may step 2 px outside the crop: jitter on a canvas with a 2 px border.
        moved = jitter(np.pad(inst.mask, 2), np.pad(d, 2, mode="edge"))
        clipped = _clip(moved, inst.row_off - 2, inst.col_off - 2, tile)
        if clipped is None:
            clipped = vis
        mask, row_off, col_off = clipped
        score = float(np.clip(0.6 + 0.35 * visible / max(full, 1) + rng.normal(0.0, 0.05), 0.05, 0.99))
        made = from_mask(mask, row_off=row_off, col_off=col_off, score=score, class_id=inst.class_id)
        return [made] if made is not None else []

    def _false_positives(
        self, labels: npt.NDArray[np.integer], r0: int, c0: int, tile: tuple[int, int, int, int], rng: np.random.Generator
    ) -> list[Instance]:
        t0, l0, t1, l1 = tile
        out: list[Instance] = []
        for _ in range(int(rng.poisson(self.false_positives_per_tile))):
            radius = int(rng.integers(3, 16))
            size = 2 * radius + 1
            r = int(rng.integers(t0, max(t0 + 1, t1 - size)))
            c = int(rng.integers(l0, max(l0 + 1, l1 - size)))
            yy, xx = np.mgrid[:size, :size]
            disc = (yy - radius) ** 2 + (xx - radius) ** 2 <= radius**2
            under = labels[r - r0 : r - r0 + size, c - c0 : c - c0 + size]
            if under.shape != disc.shape or under[disc].any():
                continue  # only on background: a false positive, not a wrong outline
            clipped = _clip(disc, r, c, tile)
            if clipped is None:
                continue
            made = from_mask(clipped[0], row_off=clipped[1], col_off=clipped[2], score=float(rng.uniform(0.3, 0.75)), class_id=0)
            if made is not None:
                out.append(made)
        return out


def _clip(mask: BoolArray, row_off: int, col_off: int, tile: tuple[int, int, int, int]) -> tuple[BoolArray, int, int] | None:
    """Clip a mask placed at ``(row_off, col_off)`` to the tile ``(top, left, bottom, right)``."""
    t0, l0, t1, l1 = tile
    h, w = mask.shape
    a0, b0 = max(row_off, t0), max(col_off, l0)
    a1, b1 = min(row_off + h, t1), min(col_off + w, l1)
    if a0 >= a1 or b0 >= b1:
        return None
    part = mask[a0 - row_off : a1 - row_off, b0 - col_off : b1 - col_off]
    if not part.any():
        return None
    return part, a0, b0


def exact_truth_detector(labels: str, classes: Sequence[str] = ("object",), tile_size_px: int | None = None) -> ExactTruthDetector:
    """Factory for ``detector.factory: oracles:exact_truth_detector`` (the truth clipped to each tile)."""
    return ExactTruthDetector(labels, classes, tile_size_px)


def noisy_truth_detector(labels: str, **options: Any) -> NoisyTruthDetector:
    """Factory for ``detector.factory: oracles:noisy_truth_detector`` (options as :class:`NoisyTruthDetector`)."""
    return NoisyTruthDetector(labels, **options)
