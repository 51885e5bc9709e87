"""Training chips: rasters opened once, chips read with :class:`geomask.raster.RasterReader`, labels burned per chip.

How a chip is made: a centre is drawn (near a mined false positive with probability ``hard_negatives``
once some are mined, else near a label with probability ``positive_fraction``, else anywhere, so
background is learnt too), a window of ``chip_size_px × scale`` working-grid pixels
around it is read from the source with resampling straight to ``chip_size_px`` (one windowed read on
a *chip grid*: the working grid coarsened by ``scale``), and labels are burned with that chip's own
affine transform. Scale jitter is therefore a different window size, never a second resampling.
Normalisation is the one ``predict`` applies (:func:`geomask.normalize.compute_norm_stats`, once per
raster), so training and inference see identical pixel values.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from affine import Affine
from rasterio.windows import Window

from geomask.detect.training.augment import Chip, augment, copy_paste, photometric
from geomask.detect.training.settings import NORMALIZE, TrainSettings
from geomask.labels import LabelSet, rasterize_instances, read_labels, window_bounds
from geomask.normalize import compute_norm_stats
from geomask.raster import Grid, NormStats, RasterInfo, RasterReader, inspect_raster, resolve_bands, working_grid

log = logging.getLogger(__name__)

BoolArray = npt.NDArray[np.bool_]
HARD_POOL = 256  # mined hard-negative spots kept (the newest: the model's current mistakes)


@dataclass(frozen=True)
class Spot:
    """A place in a training raster: raster index and working-grid ``(row, col)``."""

    raster: int
    row: float
    col: float


@dataclass
class TrainRaster:
    """One training or validation raster, opened once: grid, normalisation and its labels."""

    info: RasterInfo
    grid: Grid
    bands: list[int]
    stats: NormStats
    labels: LabelSet
    centers: npt.NDArray[np.float64]  # (n, 2) label centres in working-grid (row, col)


def open_rasters(images: Sequence[str], label_paths: Sequence[str], settings: TrainSettings) -> list[TrainRaster]:
    """Inspect rasters, fix their working grid and normalisation, and attach their share of the labels.

    Labels are read once per distinct raster CRS (reprojected by pyogrio/pyproj) and cut per raster.
    """
    out = []
    by_crs: dict[str, LabelSet] = {}
    norm = NORMALIZE
    for path in images:
        info = inspect_raster(path)
        grid = working_grid(info, settings.gsd_m)
        bands = resolve_bands(info, list(settings.bands) if settings.bands else None)
        stats = compute_norm_stats(info, grid, bands, norm.mode, norm.percentiles, norm.sample_windows, norm.sample_size_px)
        key = info.crs_wkt
        if key not in by_crs:
            by_crs[key] = read_labels(
                label_paths,
                info.crs,
                settings.class_field,
                settings.classes if not settings.class_field else None,
                settings.boxes_as_ellipses,
            )
        labels = _subset(by_crs[key], window_bounds(grid.transform, grid.height, grid.width))
        inv = ~grid.transform
        cents = [inv @ (c.x, c.y) for c in (g.centroid for g in labels.geoms)]
        centers = np.asarray([(row, col) for col, row in cents], dtype=np.float64).reshape(-1, 2)
        log.info("%s: %d x %d px at %.3f m, %d labels", path, grid.width, grid.height, grid.gsd_m, len(labels))
        out.append(TrainRaster(info, grid, bands, stats, labels, centers))
    return out


def _subset(labels: LabelSet, bounds: tuple[float, float, float, float]) -> LabelSet:
    idx = labels.query(bounds)
    return LabelSet(labels.geoms[idx], labels.class_ids[idx], labels.classes, labels.crs)


class ChipReader:
    """Chip reads through :class:`RasterReader` on a per-chip grid, plus label rasterisation on that grid."""

    def __init__(self, rasters: Sequence[TrainRaster], chip_size_px: int, min_area_px: int):
        self.rasters = list(rasters)
        self.size = chip_size_px
        self.min_area_px = min_area_px

    def close(self) -> None:
        """Release resources (each read opens and closes its raster; kept for callers that close)."""

    def place(self, k: int, row: float, col: float, scale: float = 1.0) -> tuple[float, float, float, float, int, int]:
        """Return where :meth:`read` puts a chip: ``(row, col, fy, fx, out_h, out_w)``.

        The top-left working-grid pixel (clamped inside the raster), the working pixels per chip pixel
        down and across, and the chip's size before padding.
        """
        grid = self.rasters[k].grid
        span_h = min(self.size * scale, grid.height)
        span_w = min(self.size * scale, grid.width)
        row = float(np.clip(row, 0, grid.height - span_h))
        col = float(np.clip(col, 0, grid.width - span_w))
        out_h = max(1, min(self.size, round(span_h / scale)))
        out_w = max(1, min(self.size, round(span_w / scale)))
        fx, fy = span_w / out_w, span_h / out_h  # working pixels per chip pixel
        if fx == 1.0 and fy == 1.0 and not grid.resampled:
            # An unresampled read takes whole source pixels: place the chip on them.
            row, col = float(round(row)), float(round(col))
        return row, col, fy, fx, out_h, out_w

    def read(self, k: int, row: float, col: float, scale: float = 1.0) -> Chip:
        """Read the chip of raster ``k`` whose top-left is working-grid ``(row, col)``, ``scale`` pixels per chip pixel.

        The window is clamped inside the raster; a raster smaller than a chip gives a zero-padded chip.
        """
        r = self.rasters[k]
        grid = r.grid
        row, col, fy, fx, out_h, out_w = self.place(k, row, col, scale)
        chip_grid = dataclasses.replace(
            grid,
            transform=grid.transform @ Affine.scale(fx, fy),
            scale_x=grid.scale_x * fx,
            scale_y=grid.scale_y * fy,
            gsd_m=grid.gsd_m * math.sqrt(fx * fy),
        )
        with RasterReader(r.info, chip_grid, r.bands, r.stats) as reader:
            pixels, valid = reader.read(Window(col / fx, row / fy, out_w, out_h))
        transform = grid.transform @ Affine.translation(col, row) @ Affine.scale(fx, fy)
        masks, ids = rasterize_instances(r.labels, transform, out_h, out_w, self.min_area_px)
        chip = Chip(pixels, valid, masks, ids)
        return _pad(chip, self.size) if (out_h, out_w) != (self.size, self.size) else chip


def _pad(chip: Chip, size: int) -> Chip:
    h, w = chip.valid.shape
    pixels = np.zeros((chip.pixels.shape[0], size, size), dtype=np.float32)
    pixels[:, :h, :w] = chip.pixels
    valid = np.zeros((size, size), dtype=bool)
    valid[:h, :w] = chip.valid
    masks = []
    for m in chip.masks:
        full = np.zeros((size, size), dtype=bool)
        full[:h, :w] = m
        masks.append(full)
    return Chip(pixels, valid, masks, chip.class_ids)


class ChipSampler:
    """Random training chips: biased towards labels, with background chips and augmentation."""

    def __init__(self, reader: ChipReader, settings: TrainSettings, rng: np.random.Generator):
        self.reader, self.settings, self.rng = reader, settings, rng
        areas = np.asarray([r.grid.width * r.grid.height for r in reader.rasters], dtype=np.float64)
        self._area_p = areas / areas.sum()
        counts = np.asarray([len(r.centers) for r in reader.rasters], dtype=np.float64)
        self._label_p = counts / counts.sum() if counts.sum() > 0 else None
        self.hard: list[Spot] = []  # where the model reported objects no label has (hard negatives), newest last

    def add_hard_negatives(self, spots: Sequence[Spot]) -> None:
        """Add mined false-positive spots; the newest :data:`HARD_POOL` are kept."""
        self.hard = [*self.hard, *spots][-HARD_POOL:]

    def background_window(self) -> tuple[int, float, float]:
        """Draw a chip's top-left ``(raster, row, col)`` anywhere (scale 1), as background chips are drawn."""
        return self._anywhere(self.settings.chip_size_px)

    def _anywhere(self, span: float) -> tuple[int, float, float]:
        """A window's top-left ``(raster, row, col)`` anywhere, rasters weighted by their area."""
        k = int(self.rng.choice(len(self._area_p), p=self._area_p))
        g = self.reader.rasters[k].grid
        return k, float(self.rng.uniform(0, max(0.0, g.height - span))), float(self.rng.uniform(0, max(0.0, g.width - span)))

    def sample(self) -> Chip:
        """Draw one augmented chip (retrying a few times to avoid mostly-nodata chips).

        Every augmentation that is off draws no random number, so runs without the newer options
        see exactly the chips they saw before those options existed.
        """
        s = self.settings
        chip = self._draw_valid(None)
        if s.copy_paste > 0 and self.rng.random() < s.copy_paste and self._label_p is not None:
            source = augment(self._draw_valid(True), self.rng, 0.0)
            chip = copy_paste(chip, source, self.rng, self.reader.min_area_px)
        return photometric(augment(chip, self.rng, s.color_jitter), self.rng, s)

    def _draw_valid(self, positive: bool | None) -> Chip:
        for _ in range(10):
            chip = self._draw(positive)
            if chip.valid.mean() >= 0.5:
                break
        return chip

    def _draw(self, positive: bool | None = None) -> Chip:
        s, rng = self.settings, self.rng
        lo, hi = s.scale_jitter
        scale = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        span = s.chip_size_px * scale
        centre: tuple[int, float, float] | None = None
        if positive is None and s.hard_negatives > 0 and self.hard and rng.random() < s.hard_negatives:
            # Around a spot where the model saw an object that no label has.
            spot = self.hard[int(rng.integers(len(self.hard)))]
            centre = (spot.raster, spot.row, spot.col)
        else:
            if positive is None:
                positive = bool(rng.random() < s.positive_fraction)
            if positive and self._label_p is not None:
                k = int(rng.choice(len(self._label_p), p=self._label_p))
                cy, cx = self.reader.rasters[k].centers[int(rng.integers(len(self.reader.rasters[k].centers)))]
                centre = (k, float(cy), float(cx))
        if centre is None:
            k, row, col = self._anywhere(span)
        else:
            # The spot lands anywhere in the chip's central 80 %, so cut objects are seen at every edge.
            k, cy, cx = centre
            row = cy - span * rng.uniform(0.1, 0.9)
            col = cx - span * rng.uniform(0.1, 0.9)
        return self.reader.read(k, row, col, scale)


def validation_chips(reader: ChipReader) -> list[Chip]:
    """Cut every validation raster into a fixed grid of non-overlapping chips (last one flush with the edge)."""
    chips = []
    size = reader.size
    for k, r in enumerate(reader.rasters):
        g = r.grid
        rows = sorted({*range(0, max(1, g.height - size + 1), size), max(0, g.height - size)})
        cols = sorted({*range(0, max(1, g.width - size + 1), size), max(0, g.width - size)})
        for row in rows:
            for col in cols:
                chip = reader.read(k, row, col, 1.0)
                if chip.valid.any():
                    chips.append(chip)
    return chips


def chip_target(chip: Chip) -> dict[str, torch.Tensor]:
    """Return torchvision's target dict (labels shifted by one: 0 is background)."""
    n = len(chip.masks)
    h, w = chip.valid.shape
    if n == 0:
        return {
            "boxes": torch.zeros((0, 4), dtype=torch.float32),
            "labels": torch.zeros((0,), dtype=torch.int64),
            "masks": torch.zeros((0, h, w), dtype=torch.uint8),
        }
    masks = np.stack(chip.masks)
    rows: BoolArray = np.asarray(masks.any(axis=2))
    cols: BoolArray = np.asarray(masks.any(axis=1))
    boxes = np.stack(
        [cols.argmax(1), rows.argmax(1), w - cols[:, ::-1].argmax(1), h - rows[:, ::-1].argmax(1)],
        axis=1,
    ).astype(np.float32)
    return {
        "boxes": torch.from_numpy(boxes),
        "labels": torch.as_tensor([c + 1 for c in chip.class_ids], dtype=torch.int64),
        "masks": torch.from_numpy(masks.astype(np.uint8)),
    }
