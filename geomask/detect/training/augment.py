"""Chip augmentation: nadir-safe geometry and colour, Simple Copy-Paste, and cross-city photometrics.

Every function takes the random generator it draws from, and an augmentation that is switched off
draws nothing, so a run with the same seed and settings sees the same chips as before an option
existed.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from geomask.detect.training.settings import TrainSettings

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]


@dataclass
class Chip:
    """A training chip: normalised pixels, validity, instance masks and their class ids."""

    pixels: FloatArray
    valid: BoolArray
    masks: list[BoolArray]
    class_ids: list[int]


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
