"""Train a Mask R-CNN on GeoTIFFs and vector labels: chips by windowed reads, validation by area.

How a chip is made: a centre is drawn (near a label with probability ``positive_fraction``, else
anywhere, so background is learnt too), a window of ``chip_size_px × scale`` working-grid pixels
around it is read from the source with resampling straight to ``chip_size_px`` (one windowed read,
the working grid being the source resampled to ``gsd_m``), and labels are burned with that chip's
own affine transform. Scale jitter is therefore a different window size, never a second resampling.
Normalisation is the one ``predict`` applies (:func:`geomask.raster.compute_norm_stats`, once per
raster), so training and inference see identical pixel values.

Validation is by file (whole rasters, normally a whole area held out), never by random chips: chips
of one area are strongly correlated, and a random split would measure memory, not generalisation.
Every ``val_every`` iterations (one "epoch") the model is scored on a fixed grid of validation
chips (F1 at mask IoU 0.5, one-to-one); the best model (or, with ``keep="last"``, the latest) is
written to ``output`` (the moving average of the weights when ``ema_decay`` is set); the full training
state goes to ``output.last.pt`` every ``checkpoint_every_s`` seconds so a run can be stopped any
time and resumed.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
import platform
import random
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import rasterio
import torch
from affine import Affine
from rasterio.enums import Resampling
from rasterio.windows import Window

from geomask.detect.base import ModelHints, TileImage
from geomask.detect.checkpoint import CheckpointMeta, check_inference, load_checkpoint, save_checkpoint
from geomask.detect.maskrcnn import ARCHS, MaskRCNNDetector, build_model, coco_state_dict, count_parameters, resolve_device
from geomask.errors import ConfigError, LabelError, WeightsError
from geomask.labels import LabelSet, expand_paths, rasterize_instances, read_labels, window_bounds
from geomask.raster import Grid, NormStats, RasterInfo, compute_norm_stats, inspect_raster, resolve_bands, working_grid
from geomask.tiling import Tile

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class TrainSettings:
    """Every training knob, with its default in one place.

    Attributes:
        arch: Architecture (see :data:`geomask.detect.maskrcnn.ARCHS`).
        classes: Class names (used when labels carry no class field).
        class_field: Label attribute holding the class name, or ``None`` (one class).
        boxes_as_ellipses: Labels are boxes: train on the inscribed ellipse (see :mod:`geomask.labels`).
        chip_size_px: Chip side in pixels; becomes the model's tile size.
        gsd_m: Resample chips to this ground sample distance (metres); ``None``: native resolution.
        bands: 1-based bands in model order; ``None``: the first three.
        batch_size: Chips per iteration.
        iterations: Total optimiser steps.
        lr: Peak AdamW learning rate (linear warm-up, then cosine decay to 5 %).
        weight_decay: AdamW weight decay.
        warmup_iters: Warm-up length in iterations.
        positive_fraction: Share of chips centred near a label; the rest are anywhere (background).
        scale_jitter: Range of window-size factors (object size jitter).
        color_jitter: Strength of per-band gain, brightness and contrast jitter.
        min_area_px: Smallest training mask (chip pixels); smaller fragments are dropped.
        val_every: Iterations per epoch (validation, metrics, best checkpoint).
        checkpoint_every_s: Seconds between ``.last.pt`` checkpoints.
        max_minutes: Stop (cleanly, with checkpoints) after this long, even before ``iterations``.
        device: ``auto``, ``cpu``, ``cuda``...
        amp: Mixed precision: float16 + grad scaling on CUDA, bfloat16 autocast on CPU.
        threads: torch CPU threads (``None``: torch's default).
        seed: Random seed for chip sampling, augmentation and initialisation.
        init: Start from a geomask checkpoint path, ``coco``/``coco_v2`` (torchvision COCO, heads
            replaced for our classes), or ``None`` (from scratch).
        attribution: Credit for the training data, stored in the checkpoint.
        rois_per_image: RoIs sampled per chip for the box and mask heads (``None``: the architecture's).
            On CPU the mask head's cost grows with it and dominates an iteration; halving it nearly
            halves the time per iteration at little cost in accuracy.
        val_score_threshold: Score threshold for validation F1.
        log_every: Iterations between loss log lines.
        ema_decay: Keep an exponential moving average of the weights with this decay (e.g. 0.998, a
            horizon of ~500 iterations); validation and the written model use the average, which is
            steadier than the last step's weights when batches are small and noisy. ``None``: off.
        keep: Which weights ``output`` holds: ``best`` (best validation F1) or ``last`` (the weights
            at each validation, finally the last). Use ``last`` when the validation rasters are also
            your test set, so that choosing a checkpoint does not peek at the test.
        copy_paste: Probability per chip of Simple Copy-Paste (Ghiasi et al. 2021): a random subset of the
            labelled objects of another positive chip (any training raster, its own scale jitter, flip and
            rotation) is pasted on, occluding what it covers. Few labels then appear in many contexts.
        hue_jitter: Largest hue rotation as a fraction of the colour wheel (0.05: ±18°); 3-band chips only.
        saturation_jitter: Saturation factor drawn from ``[1 - s, 1 + s]``; 3-band chips only.
        blur: Probability per chip of a Gaussian blur (sigma 0.5–1.5 px): soft or resampled imagery.
        noise: Largest standard deviation of added Gaussian noise, in normalised pixel units (0..1).
        jpeg: Probability per chip of a JPEG round trip at quality 30–90: the blocky artefacts of
            compressed orthophotos and web tiles.
        inference: Inference defaults written into every checkpoint of the run (keys of
            :data:`geomask.detect.checkpoint.INFERENCE_KEYS`), so ``--weights`` alone gives the card's
            settings; a config still overrides each.
    """

    arch: str = "resnet18_fpn"
    classes: tuple[str, ...] = ("building",)
    class_field: str | None = None
    boxes_as_ellipses: bool = False
    chip_size_px: int = 256
    gsd_m: float | None = 0.3
    bands: tuple[int, ...] | None = None
    batch_size: int = 8
    iterations: int = 2000
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    positive_fraction: float = 0.8
    scale_jitter: tuple[float, float] = (0.8, 1.25)
    color_jitter: float = 0.15
    min_area_px: int = 6
    val_every: int = 200
    checkpoint_every_s: float = 300.0
    max_minutes: float | None = None
    device: str = "auto"
    amp: bool = True
    threads: int | None = None
    seed: int = 0
    init: str | None = None
    rois_per_image: int | None = None
    attribution: str = ""
    val_score_threshold: float = 0.5
    log_every: int = 10
    ema_decay: float | None = None
    keep: str = "best"
    copy_paste: float = 0.0
    hue_jitter: float = 0.0
    saturation_jitter: float = 0.0
    blur: float = 0.0
    noise: float = 0.0
    jpeg: float = 0.0
    inference: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid setting."""
        if self.arch not in ARCHS:
            raise ConfigError(f"unknown architecture {self.arch!r}; use one of {list(ARCHS)}")
        if self.chip_size_px < 32 or self.chip_size_px % 32:
            raise ConfigError(f"chip_size_px must be a multiple of 32 and at least 32, got {self.chip_size_px}")
        if self.rois_per_image is not None and self.rois_per_image < 8:
            raise ConfigError(f"rois_per_image must be at least 8, got {self.rois_per_image}")
        for name in ("batch_size", "iterations", "val_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.positive_fraction <= 1.0:
            raise ConfigError(f"positive_fraction must be in [0, 1], got {self.positive_fraction}")
        lo, hi = self.scale_jitter
        if not 0.0 < lo <= hi:
            raise ConfigError(f"scale_jitter must satisfy 0 < low <= high, got {self.scale_jitter}")
        if self.gsd_m is not None and self.gsd_m <= 0:
            raise ConfigError(f"gsd_m must be positive, got {self.gsd_m}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if not self.classes:
            raise ConfigError("classes must name at least one class")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in (0, 1), e.g. 0.998, got {self.ema_decay}")
        if self.keep not in ("best", "last"):
            raise ConfigError(f"keep must be 'best' or 'last', got {self.keep!r}")
        for name in ("copy_paste", "blur", "jpeg"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} is a probability per chip and must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.hue_jitter <= 0.5:
            raise ConfigError(f"hue_jitter is a fraction of the colour wheel and must be in [0, 0.5], got {self.hue_jitter}")
        if not 0.0 <= self.saturation_jitter <= 1.0:
            raise ConfigError(f"saturation_jitter must be in [0, 1], got {self.saturation_jitter}")
        try:
            check_inference(self.inference)
        except WeightsError as err:
            raise ConfigError(str(err)) from None
        if not 0.0 <= self.noise <= 0.5:
            raise ConfigError(f"noise is a standard deviation in normalised pixel units and must be in [0, 0.5], got {self.noise}")


@dataclass
class TrainRaster:
    """One training or validation raster, opened once: grid, normalisation and its labels."""

    info: RasterInfo
    grid: Grid
    bands: list[int]
    stats: NormStats
    labels: LabelSet
    centers: npt.NDArray[np.float64]  # (n, 2) label centres in working-grid (row, col)


@dataclass
class Chip:
    """A training chip: normalised pixels, validity, instance masks and their class ids."""

    pixels: FloatArray
    valid: BoolArray
    masks: list[BoolArray]
    class_ids: list[int]


@dataclass
class TrainResult:
    """What a training run did (also written into the checkpoint's ``training`` metadata)."""

    output: Path
    iterations: int
    seconds: float
    best_metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


def open_rasters(images: Sequence[str], label_paths: Sequence[str], settings: TrainSettings) -> list[TrainRaster]:
    """Inspect rasters, fix their working grid and normalisation, and attach their share of the labels.

    Labels are read once per distinct raster CRS (reprojected by pyogrio/pyproj) and cut per raster.
    """
    out = []
    by_crs: dict[str, LabelSet] = {}
    for path in images:
        info = inspect_raster(path)
        grid = working_grid(info, settings.gsd_m)
        bands = resolve_bands(info, list(settings.bands) if settings.bands else None)
        stats = compute_norm_stats(info, grid, bands, "auto", (2.0, 98.0), 16, 512)
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
    """Windowed chip reads with resampling, plus label rasterisation on the chip's own grid."""

    def __init__(self, rasters: Sequence[TrainRaster], chip_size_px: int, min_area_px: int):
        self.rasters = list(rasters)
        self.size = chip_size_px
        self.min_area_px = min_area_px
        self._src: dict[int, rasterio.DatasetReader] = {}

    def close(self) -> None:
        for src in self._src.values():
            src.close()
        self._src.clear()

    def read(self, k: int, row: float, col: float, scale: float = 1.0) -> Chip:
        """Read the chip of raster ``k`` whose top-left is working-grid ``(row, col)``, ``scale`` pixels per chip pixel.

        The window is clamped inside the raster; a raster smaller than a chip gives a zero-padded chip.
        """
        r = self.rasters[k]
        grid = r.grid
        span_h = min(self.size * scale, grid.height)
        span_w = min(self.size * scale, grid.width)
        row = float(np.clip(row, 0, grid.height - span_h))
        col = float(np.clip(col, 0, grid.width - span_w))
        out_h = max(1, min(self.size, round(span_h / scale)))
        out_w = max(1, min(self.size, round(span_w / scale)))
        window = grid.source_window(Window(col, row, span_w, span_h))
        if k not in self._src:
            self._src[k] = rasterio.open(r.info.path)
        src = self._src[k]
        raw = src.read(r.bands, window=window, out_shape=(len(r.bands), out_h, out_w), resampling=Resampling.bilinear)
        valid = src.dataset_mask(window=window, out_shape=(out_h, out_w), resampling=Resampling.nearest) > 0
        pixels = r.stats.apply(raw)
        pixels[:, ~valid] = 0.0
        if pixels.shape[0] == 1:
            pixels = np.repeat(pixels, 3, axis=0)
        transform = grid.transform @ Affine.translation(col, row) @ Affine.scale(span_w / out_w, span_h / out_h)
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
        if positive is None:
            positive = bool(rng.random() < s.positive_fraction)
        if positive and self._label_p is not None:
            k = int(rng.choice(len(self._label_p), p=self._label_p))
            cy, cx = self.reader.rasters[k].centers[int(rng.integers(len(self.reader.rasters[k].centers)))]
            # The object lands anywhere in the chip's central 80 %, so cut objects are seen at every edge.
            row = cy - span * rng.uniform(0.1, 0.9)
            col = cx - span * rng.uniform(0.1, 0.9)
        else:
            k = int(rng.choice(len(self._area_p), p=self._area_p))
            g = self.reader.rasters[k].grid
            row = rng.uniform(0, max(0.0, g.height - span))
            col = rng.uniform(0, max(0.0, g.width - span))
        return self.reader.read(k, row, col, scale)


def augment(chip: Chip, rng: np.random.Generator, color_jitter: float) -> Chip:
    """Apply nadir-safe augmentation: flips, 90° rotations, per-band gain, brightness and contrast.

    Nadir imagery has no "up", so the eight dihedral transforms are all realistic views.
    """
    pixels, valid, masks = chip.pixels, chip.valid, chip.masks
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))

    def geo(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
        a = np.rot90(a, k, axes=(-2, -1))
        return a[..., ::-1] if flip else a

    pixels = np.ascontiguousarray(geo(pixels))
    valid = np.ascontiguousarray(geo(valid))
    masks = [np.ascontiguousarray(geo(m)) for m in masks]
    if color_jitter > 0:
        j = color_jitter
        gain = rng.uniform(1 - j, 1 + j, size=(pixels.shape[0], 1, 1)).astype(np.float32)
        contrast = np.float32(rng.uniform(1 - j, 1 + j))
        bright = np.float32(rng.uniform(-j / 2, j / 2))
        mean = np.float32(pixels[:, valid].mean()) if valid.any() else np.float32(0.5)
        pixels = ((pixels * gain - mean) * contrast + mean + bright).astype(np.float32)
        np.clip(pixels, 0.0, 1.0, out=pixels)
        pixels[:, ~valid] = 0.0
    return Chip(pixels, valid, masks, chip.class_ids)


def copy_paste(chip: Chip, source: Chip, rng: np.random.Generator, min_area_px: int) -> Chip:
    """Paste a random non-empty subset of ``source``'s objects onto ``chip`` (Simple Copy-Paste).

    Both chips share one pixel grid (same size; ``source`` carries its own scale jitter and dihedral
    transform). Pasted pixels occlude what they cover: the masks of covered objects lose those
    pixels, and an object left with fewer than ``min_area_px`` pixels is dropped, as is a pasted one
    that keeps fewer than that on ``chip``'s valid pixels. Later pastes occlude earlier ones. Class
    ids travel with their masks; boxes are derived from masks by :func:`chip_target`, so they follow.
    """
    if not source.masks:
        return chip
    n = int(rng.integers(1, len(source.masks) + 1))
    picked = sorted(int(i) for i in rng.choice(len(source.masks), size=n, replace=False))
    pixels = chip.pixels.copy()
    masks = [m.copy() for m in chip.masks]
    class_ids = list(chip.class_ids)
    for i in picked:
        pasted = source.masks[i] & source.valid & chip.valid
        if int(pasted.sum()) < min_area_px:
            continue
        pixels[:, pasted] = source.pixels[:, pasted]
        for m in masks:
            m &= ~pasted
        masks.append(pasted)
        class_ids.append(source.class_ids[i])
    kept = [k for k, m in enumerate(masks) if int(m.sum()) >= min_area_px]
    return Chip(pixels, chip.valid, [masks[k] for k in kept], [class_ids[k] for k in kept])


# RGB <-> YIQ: hue is the angle and saturation the radius of (I, Q), so both jitters are one linear map.
_RGB_TO_YIQ = np.asarray([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=np.float64)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def photometric(chip: Chip, rng: np.random.Generator, settings: TrainSettings) -> Chip:
    """Apply the cross-city photometric augmentation the settings switch on (each off by default).

    Order follows image formation: colour (hue, saturation), optics (blur), sensor (noise), then
    compression (JPEG). Geometry, validity and masks are untouched; invalid pixels stay 0.
    """
    s = settings
    pixels = chip.pixels
    if (s.hue_jitter > 0 or s.saturation_jitter > 0) and pixels.shape[0] == 3:
        angle = rng.uniform(-s.hue_jitter, s.hue_jitter) * 2 * math.pi if s.hue_jitter > 0 else 0.0
        sat = rng.uniform(1 - s.saturation_jitter, 1 + s.saturation_jitter) if s.saturation_jitter > 0 else 1.0
        cos, sin = math.cos(angle) * sat, math.sin(angle) * sat
        rotate = np.asarray([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
        matrix = (_YIQ_TO_RGB @ rotate @ _RGB_TO_YIQ).astype(np.float32)
        pixels = np.einsum("ij,jhw->ihw", matrix, pixels).astype(np.float32)
    if s.blur > 0 and rng.random() < s.blur:
        from torchvision.transforms.v2.functional import gaussian_blur

        sigma = float(rng.uniform(0.5, 1.5))
        kernel = 2 * math.ceil(2 * sigma) + 1
        pixels = gaussian_blur(torch.from_numpy(np.ascontiguousarray(pixels)), [kernel, kernel], [sigma, sigma]).numpy()
    if s.noise > 0:
        sigma = float(rng.uniform(0.0, s.noise))
        pixels = pixels + rng.normal(0.0, sigma, size=pixels.shape).astype(np.float32)
    if s.jpeg > 0 and rng.random() < s.jpeg:
        pixels = _jpeg_round_trip(pixels, int(rng.integers(30, 91)))
    if pixels is chip.pixels:
        return chip
    pixels = np.clip(pixels, 0.0, 1.0).astype(np.float32)
    pixels[:, ~chip.valid] = 0.0
    return Chip(pixels, chip.valid, chip.masks, chip.class_ids)


def _jpeg_round_trip(pixels: FloatArray, quality: int) -> FloatArray:
    """Encode and decode ``pixels`` (``[0, 1]``, bands first) as 8-bit JPEG, band by band unless RGB."""
    from PIL import Image

    as_bytes = np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)
    groups = [as_bytes.transpose(1, 2, 0)] if as_bytes.shape[0] == 3 else list(as_bytes)
    decoded = []
    for group in groups:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(group)).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        decoded.append(np.asarray(Image.open(buffer), dtype=np.float32) / 255.0)
    out = decoded[0].transpose(2, 0, 1) if as_bytes.shape[0] == 3 else np.stack(decoded)
    return np.ascontiguousarray(out, dtype=np.float32)


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


def match_f1(
    pred_masks: Sequence[BoolArray],
    pred_scores: Sequence[float],
    true_masks: Sequence[BoolArray],
    iou: float = 0.5,
    ignore_true: Sequence[bool] | None = None,
    ignore_pred: Sequence[bool] | None = None,
) -> tuple[int, int, int]:
    """Match predictions to truth one-to-one at mask IoU ≥ ``iou``, greedy by score: ``(tp, fp, fn)``.

    Ignored truths (e.g. objects cut by the chip edge) count neither as misses nor, when matched, as
    hits; an ignored prediction that matches no counted truth is not a false positive.
    """
    ign_t = np.zeros(len(true_masks), dtype=bool) if ignore_true is None else np.asarray(ignore_true, dtype=bool)
    ign_p = np.zeros(len(pred_masks), dtype=bool) if ignore_pred is None else np.asarray(ignore_pred, dtype=bool)
    if not pred_masks:
        return 0, 0, int((~ign_t).sum())
    if not true_masks:
        return 0, int((~ign_p).sum()), 0
    p = np.stack([m.ravel() for m in pred_masks]).astype(np.float32)
    t = np.stack([m.ravel() for m in true_masks]).astype(np.float32)
    inter = p @ t.T
    union = p.sum(1)[:, None] + t.sum(1)[None, :] - inter
    ious = inter / np.maximum(union, 1.0)
    matched = np.zeros(len(true_masks), dtype=bool)
    tp = fp = 0
    for i in np.argsort(-np.asarray(pred_scores), kind="stable"):
        cand = np.where(~matched & (ious[i] >= iou))[0]
        if cand.size:
            j = cand[np.argmax(ious[i, cand])]
            matched[j] = True
            tp += int(not ign_t[j])
        elif not ign_p[i]:
            fp += 1
    return tp, fp, int((~matched & ~ign_t).sum())


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
                pm, [i.score for i in found], chip.masks, 0.5, [touches_edge(m) for m in chip.masks], [touches_edge(m) for m in pm]
            )
            tp, fp, fn = tp + a, fp + b, fn + c
    precision = tp / max(1, tp + fp)
    recall = tp / max(1, tp + fn)
    f1 = 2 * precision * recall / max(1e-9, precision + recall)
    return {"val_precision": precision, "val_recall": recall, "val_f1": f1, "val_tp": float(tp), "val_fp": float(fp), "val_fn": float(fn)}


def _lr_factor(it: int, s: TrainSettings) -> float:
    if it < s.warmup_iters:
        return 0.1 + 0.9 * it / s.warmup_iters
    t = min(1.0, (it - s.warmup_iters) / max(1, s.iterations - s.warmup_iters))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))


def _init_weights(model: torch.nn.Module, init: str, num_classes: int, arch: str) -> list[str]:
    """Load a starting point, replacing the class-specific heads when the class count differs.

    Args:
        model: A freshly built model of ``arch`` for ``num_classes`` classes.
        init: A geomask checkpoint path, or ``coco``/``coco_v2`` (torchvision's COCO weights).
        num_classes: Object classes being trained (background excluded).
        arch: The model's architecture.

    Returns:
        The tensors left at their fresh initialisation because their shape differs from the source's
        (the class-specific predictors when the class counts differ).

    Raises:
        WeightsError: The source is unreadable or holds another architecture.
    """
    if init in ("coco", "coco_v2"):
        src_arch, state, _ = coco_state_dict(init)
        source = f"torchvision {init}"
    else:
        ckpt = load_checkpoint(init)
        src_arch = ckpt.meta.arch if ckpt.meta is not None else arch
        state, source = ckpt.state_dict, init
    if src_arch != arch:
        raise WeightsError(f"{source} holds a {src_arch!r} model but training uses arch {arch!r}; set --arch {src_arch}")
    own = model.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown:
        raise WeightsError(f"{source} does not fit architecture {arch!r} (e.g. unexpected key {unknown[0]!r}); set --arch to match")
    fitting = {k: v.to(own[k].dtype) for k, v in state.items() if v.shape == own[k].shape}
    replaced = sorted(k for k in state if k not in fitting)
    # Tensors the source lacks: BatchNorm step counters when it was trained with frozen BatchNorm (COCO).
    absent = [k for k in own if k not in state]
    model.load_state_dict(fitting, strict=False)
    log.info(
        "initialised from %s (%d tensors; %d re-initialised for %d classes; %d not in the source)",
        source,
        len(fitting),
        len(replaced),
        num_classes,
        len(absent),
    )
    return replaced


class _Ema:
    """An exponential moving average of a model's weights (BatchNorm statistics included).

    The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` over the first updates, so the average
    is not dominated by the initial weights.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.steps = 0

    def load(self, state: dict[str, torch.Tensor], steps: int) -> None:
        self.model.load_state_dict(state)
        self.steps = steps

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for avg, cur in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True):
            if avg.is_floating_point():
                avg.mul_(d).add_(cur.detach(), alpha=1.0 - d)
            else:
                avg.copy_(cur)


class _Logger:
    """Loss/metric lines to the Python log and, as JSON, to a ``.log.jsonl`` file beside the output."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")


def train(
    images: Sequence[str],
    labels: Sequence[str],
    output: str | Path,
    settings: TrainSettings,
    val_images: Sequence[str] | None = None,
    val_labels: Sequence[str] | None = None,
    resume: bool = False,
    command: str = "",
) -> TrainResult:
    """Train a Mask R-CNN and write the best (or, with ``settings.keep == "last"``, the latest) checkpoint to ``output``.

    Args:
        images: Raster paths or globs.
        labels: Vector label paths or globs (any OGR format and CRS).
        output: Best-model checkpoint path; ``output.last.pt`` holds the resumable state and
            ``output.log.jsonl`` the losses and metrics.
        settings: Training settings.
        val_images: Validation rasters (paths or globs); excluded from training. ``None``: hold out the
            rasters of the last folder when images come from several folders, else the last raster.
        val_labels: Labels for validation (default: ``labels``).
        resume: Continue from ``output.last.pt``.
        command: Command line, recorded in the checkpoint.

    Raises:
        ConfigError: Invalid settings. LabelError: unusable labels. WeightsError: bad init/resume file.
    """
    settings.check()
    t_start = time.perf_counter()
    out = Path(output)
    if not out.parent.exists():
        raise ConfigError(f"output folder {out.parent} does not exist; create it first")
    last_path = out.with_name(out.name + ".last.pt")
    logger = _Logger(out.with_name(out.name + ".log.jsonl"))
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    device = resolve_device(settings.device)

    all_images = expand_paths(images)
    val_list = expand_paths(val_images) if val_images else _default_holdout(all_images)
    train_list = [p for p in all_images if p not in val_list]
    if not train_list:
        raise ConfigError("every image is a validation image; give --val-images that leave some images for training")
    label_list = expand_paths(labels)
    log.info("training on %d rasters, validating on %d: %s", len(train_list), len(val_list), [Path(p).name for p in val_list])
    train_rasters = open_rasters(train_list, label_list, settings)
    if sum(len(r.labels) for r in train_rasters) == 0:
        raise LabelError(f"no label overlaps the training rasters; check that {label_list[:3]} cover {train_list[:3]}")
    val_rasters = open_rasters(val_list, expand_paths(val_labels) if val_labels else label_list, settings) if val_list else []
    classes = train_rasters[0].labels.classes
    n_classes = len(classes)

    model = build_model(settings.arch, n_classes, settings.chip_size_px)
    if settings.rois_per_image is not None:
        model.roi_heads.fg_bg_sampler.batch_size_per_image = settings.rois_per_image
    model.to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr, weight_decay=settings.weight_decay)
    start_it, best_f1, elapsed0 = 0, -1.0, 0.0
    best_metrics: dict[str, float] = {}
    history: list[dict[str, float]] = []
    resume_state: dict[str, Any] = {}
    if resume:
        ckpt = load_checkpoint(last_path)
        if ckpt.meta is None or ckpt.train_state is None:
            raise WeightsError(f"{last_path} holds no training state; start without --resume")
        if ckpt.meta.arch != settings.arch:
            raise WeightsError(f"{last_path} was trained as {ckpt.meta.arch!r}, not {settings.arch!r}; pass --arch {ckpt.meta.arch}")
        model.load_state_dict(ckpt.state_dict)
        opt.load_state_dict(ckpt.train_state["optimizer"])
        resume_state = ckpt.train_state
        start_it = int(ckpt.train_state["iteration"])
        best_f1 = float(ckpt.train_state.get("best_f1", -1.0))
        elapsed0 = float(ckpt.train_state.get("elapsed_s", 0.0))
        best_metrics = {k: float(v) for k, v in dict(ckpt.train_state.get("best_metrics", {})).items()}
        rng = np.random.default_rng(settings.seed + start_it)
        log.info("resumed from %s at iteration %d (best val F1 %.3f)", last_path, start_it, best_f1)
    elif settings.init:
        _init_weights(model, settings.init, n_classes, settings.arch)
    ema = _Ema(model, settings.ema_decay) if settings.ema_decay is not None else None
    if "ema" in resume_state and ema is None:
        raise ConfigError(f"{last_path} was trained with a weight average; pass --ema (ema_decay) again to resume it")
    if ema is not None and "ema" in resume_state:
        ema.load(resume_state["ema"], int(resume_state.get("ema_steps", 0)))
    eval_model = ema.model if ema is not None else model
    log.info(
        "model %s: %.1f M parameters on %s (%d threads)", settings.arch, count_parameters(model) / 1e6, device, torch.get_num_threads()
    )

    reader = ChipReader(train_rasters, settings.chip_size_px, settings.min_area_px)
    sampler = ChipSampler(reader, settings, rng)
    val_reader = ChipReader(val_rasters, settings.chip_size_px, settings.min_area_px)
    val_chips = validation_chips(val_reader) if val_rasters else []
    val_reader.close()
    log.info("%d validation chips", len(val_chips))

    first = train_rasters[0]
    hardware = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
        if device.type == "cpu"
        else torch.cuda.get_device_name(device)
    )

    def meta(metrics: dict[str, float], it: int, seconds: float) -> CheckpointMeta:
        return CheckpointMeta(
            arch=settings.arch,
            classes=tuple(classes),
            tile_size_px=settings.chip_size_px,
            gsd_m=settings.gsd_m,
            bands=tuple(first.bands),
            normalize_mode="auto",
            percentiles=(2.0, 98.0),
            attribution=settings.attribution,
            metrics=metrics,
            inference=check_inference(settings.inference),
            training={
                "iterations": it,
                "seconds": round(seconds, 1),
                "device": str(device),
                "hardware": hardware,
                "threads": torch.get_num_threads(),
                "images": [Path(p).name for p in train_list],
                "val_images": [Path(p).name for p in val_list],
                "settings": json.dumps(asdict(settings)),
                "command": command,
                "torch": str(torch.__version__),
            },
        )

    cuda_amp = settings.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if cuda_amp else None

    def autocast() -> AbstractContextManager[Any]:
        if not settings.amp:
            return nullcontext()
        return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)

    def validate(it: int, seconds: float) -> dict[str, float]:
        nonlocal best_f1, best_metrics
        if not val_chips:
            metrics = {"iteration": float(it)}
            save_checkpoint(out, meta(metrics, it, seconds), eval_model.state_dict())
            return metrics
        det = MaskRCNNDetector(eval_model, classes, ModelHints(), "training", device, settings.val_score_threshold, 0.5, settings.amp)
        metrics = evaluate_chips(det, val_chips, settings.batch_size)
        metrics["iteration"] = float(it)
        model.train()
        if metrics["val_f1"] > best_f1:
            best_f1, best_metrics = metrics["val_f1"], dict(metrics)
            if settings.keep == "best":
                save_checkpoint(out, meta(metrics, it, seconds), eval_model.state_dict())
                log.info("new best val F1 %.3f at iteration %d -> %s", best_f1, it, out)
        if settings.keep == "last":
            save_checkpoint(out, meta(metrics, it, seconds), eval_model.state_dict())
        return metrics

    def save_last(it: int, seconds: float) -> None:
        state = {"optimizer": opt.state_dict(), "iteration": it, "best_f1": best_f1, "elapsed_s": seconds, "best_metrics": best_metrics}
        if ema is not None:
            state.update(ema=ema.model.state_dict(), ema_steps=ema.steps)
        # The metadata describes *this* model: its latest validation, not the best one's (none when the
        # validated weights were the average, not these).
        latest = history[-1] if ema is None and history and history[-1].get("iteration") == it else {}
        save_checkpoint(last_path, meta(latest, it, seconds), model.state_dict(), train_state=state)

    model.train()
    last_save = time.perf_counter()
    window: list[float] = []
    it = start_it
    deadline = None if settings.max_minutes is None else t_start + settings.max_minutes * 60
    try:
        while it < settings.iterations:
            chips = [sampler.sample() for _ in range(settings.batch_size)]
            imgs = [torch.from_numpy(c.pixels).to(device) for c in chips]
            targets = [{k: v.to(device) for k, v in chip_target(c).items()} for c in chips]
            factor = _lr_factor(it, settings)
            for group in opt.param_groups:
                group["lr"] = settings.lr * factor
            with autocast():
                losses = model(imgs, targets)
            loss = torch.stack([v.float() for v in losses.values()]).sum()
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()  # type: ignore[no-untyped-call]
                torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
                opt.step()
            it += 1
            if ema is not None:
                ema.update(model)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise ConfigError(f"training loss became {value} at iteration {it}; lower --lr or disable amp")
            window.append(value)
            now = time.perf_counter()
            seconds = elapsed0 + now - t_start
            if it % settings.log_every == 0 or it == settings.iterations:
                record = {"iteration": it, "seconds": round(seconds, 1), "lr": settings.lr * factor, "loss": float(np.mean(window))}
                record.update({k: round(float(v.detach()), 4) for k, v in losses.items()})
                logger.write(record)
                log.info("it %d  loss %.3f  (%.3f it/s)", it, record["loss"], (it - start_it) / max(1e-9, now - t_start))
                window = []
            stop = deadline is not None and now >= deadline
            if it % settings.val_every == 0 or it == settings.iterations or stop:
                metrics = validate(it, seconds)
                history.append(metrics)
                logger.write({"epoch": it // settings.val_every, **metrics})
                log.info("epoch %d: %s", it // settings.val_every, {k: round(v, 3) for k, v in metrics.items()})
                save_last(it, seconds)
                last_save = now
            elif now - last_save >= settings.checkpoint_every_s:
                save_last(it, seconds)
                last_save = now
            if stop:
                log.info("stopping at iteration %d: max_minutes %.1f reached", it, settings.max_minutes or 0.0)
                break
    finally:
        reader.close()
    seconds = elapsed0 + time.perf_counter() - t_start
    return TrainResult(out, it, seconds, best_metrics, history)


def _default_holdout(images: Sequence[str]) -> list[str]:
    """Hold out the last folder's rasters when images span several folders (areas), else the last raster."""
    if len(images) < 2:
        return []
    folders = sorted({str(Path(p).parent) for p in images})
    if len(folders) > 1:
        return [p for p in images if str(Path(p).parent) == folders[-1]]
    return [images[-1]]
