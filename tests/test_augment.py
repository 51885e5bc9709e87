"""Training augmentation on synthetic chips: copy-paste keeps targets consistent, photometric keeps geometry.

Chips are built in memory (no rasters), except the sampler test, which reads two square scenes of
:mod:`tests.test_train` as two "cities".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from geomask.detect.training import TrainSettings
from geomask.detect.training.augment import Chip, copy_paste, photometric
from geomask.detect.training.chips import ChipReader, ChipSampler, chip_target, open_rasters
from geomask.errors import ConfigError
from tests.test_train import square_scene

SIZE = 64


def _chip(boxes: list[tuple[int, int, int, int, int]], value: float, valid: np.ndarray | None = None) -> Chip:
    """A chip of flat ``value`` with one rectangle mask per ``(r0, r1, c0, c1, class_id)``."""
    pixels = np.full((3, SIZE, SIZE), value, dtype=np.float32)
    masks, ids = [], []
    for r0, r1, c0, c1, cls in boxes:
        m = np.zeros((SIZE, SIZE), dtype=bool)
        m[r0:r1, c0:c1] = True
        pixels[:, m] = 0.5 + 0.01 * cls
        masks.append(m)
        ids.append(cls)
    ok = np.ones((SIZE, SIZE), dtype=bool) if valid is None else valid
    pixels[:, ~ok] = 0.0
    return Chip(pixels, ok, masks, ids)


def _boxes_match_masks(chip: Chip) -> None:
    target = chip_target(chip)
    for box, mask in zip(target["boxes"].numpy(), chip.masks, strict=True):
        rows, cols = np.nonzero(mask)
        assert tuple(box) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)


def test_copy_paste_occludes_drops_and_keeps_classes() -> None:
    dst = _chip([(10, 30, 10, 30, 0), (40, 44, 40, 44, 1), (50, 60, 2, 12, 0)], 0.1)
    # Source objects: one covering the left half of dst's first, one swallowing dst's second, one alone.
    src = _chip([(5, 35, 0, 20, 2), (38, 46, 38, 46, 1), (2, 8, 50, 60, 3)], 0.9)
    out = copy_paste(dst, src, np.random.default_rng(0), min_area_px=6)
    rng = np.random.default_rng(0)
    n = int(rng.integers(1, 4))
    picked = sorted(int(i) for i in rng.choice(3, size=n, replace=False))
    assert len(out.masks) == len(out.class_ids)
    union = np.zeros((SIZE, SIZE), dtype=bool)
    for i in picked:
        union |= src.masks[i]
        assert any((m == src.masks[i]).all() and c == src.class_ids[i] for m, c in zip(out.masks, out.class_ids, strict=True))
    assert (out.pixels[:, union] == src.pixels[:, union]).all()  # pasted pixels are the source's
    assert (out.pixels[:, ~union] == dst.pixels[:, ~union]).all()  # the rest is untouched
    for m in out.masks:
        assert m.sum() >= 6  # no empty or sliver instance survives
    originals = [(m, c) for m, c in zip(out.masks, out.class_ids, strict=True) if not any((m == src.masks[i]).all() for i in picked)]
    for m, c in originals:  # every surviving original lost exactly what was pasted over it, and kept its class
        match = [k for k, dm in enumerate(dst.masks) if (dm & ~union == m).all()]
        assert match and dst.class_ids[match[0]] == c
        assert not (m & union).any()
    _boxes_match_masks(out)


@pytest.mark.parametrize("seed", range(12))
def test_copy_paste_invariants(seed: int) -> None:
    """Property over random layouts: disjoint instances, none empty, boxes from masks, only on valid pixels."""
    rng = np.random.default_rng(seed)

    def layout(k: int) -> list[tuple[int, int, int, int, int]]:
        out = []
        for _ in range(k):
            r, c = (int(v) for v in rng.integers(0, SIZE - 4, size=2))
            h, w = (int(v) for v in rng.integers(2, 20, size=2))
            out.append((r, min(SIZE, r + h), c, min(SIZE, c + w), int(rng.integers(3))))
        return out

    valid = np.ones((SIZE, SIZE), dtype=bool)
    valid[:, : int(rng.integers(0, 20))] = False  # a nodata strip
    dst = _chip(layout(5), 0.1, valid)
    # Labels of one chip do not overlap (later ones win here); the source's do, so pastes must occlude pastes.
    masks = [m & valid & ~np.any(dst.masks[k + 1 :], axis=0) for k, m in enumerate(dst.masks)]
    keep = [k for k, m in enumerate(masks) if m.sum() >= 4]
    dst = Chip(dst.pixels, valid, [masks[k] for k in keep], [dst.class_ids[k] for k in keep])
    src = _chip(layout(6), 0.9)
    out = copy_paste(dst, src, rng, min_area_px=4)
    for m in out.masks:
        assert m.sum() >= 4 and not (m & ~out.valid).any()
    if out.masks:
        assert (np.stack(out.masks).sum(0) <= 1).all()  # the pasted layer occludes: no pixel in two instances
        _boxes_match_masks(out)
    assert (out.pixels[:, ~out.valid] == 0).all()
    assert set(out.class_ids) <= set(dst.class_ids) | set(src.class_ids)


def test_copy_paste_with_an_empty_source_changes_nothing() -> None:
    dst = _chip([(10, 30, 10, 30, 0)], 0.1)
    assert copy_paste(dst, _chip([], 0.9), np.random.default_rng(0), 6) is dst


def test_photometric_is_off_by_default_and_keeps_geometry() -> None:
    chip = _chip([(10, 30, 10, 30, 0)], 0.2, valid=np.pad(np.ones((SIZE, SIZE - 8), dtype=bool), ((0, 0), (8, 0))))
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert photometric(chip, rng, TrainSettings()) is chip and rng.bit_generator.state == state  # no draw: old runs unchanged
    chip.pixels[0] += np.linspace(0, 0.3, SIZE, dtype=np.float32)[None, :] * chip.valid  # some colour to rotate
    on = TrainSettings(hue_jitter=0.2, saturation_jitter=0.5, blur=1.0, noise=0.05, jpeg=1.0)
    out = photometric(chip, np.random.default_rng(1), on)
    assert out.masks is chip.masks and out.valid is chip.valid and out.class_ids == chip.class_ids
    assert out.pixels.dtype == np.float32 and out.pixels.shape == chip.pixels.shape
    assert out.pixels.min() >= 0.0 and out.pixels.max() <= 1.0 and (out.pixels[:, ~chip.valid] == 0).all()
    assert 0.01 < np.abs(out.pixels - chip.pixels)[:, chip.valid].mean() < 0.2


def test_hue_and_saturation_keep_gray_and_luma() -> None:
    gray = _chip([], 0.4)
    out = photometric(gray, np.random.default_rng(0), TrainSettings(hue_jitter=0.3, saturation_jitter=0.5))
    np.testing.assert_allclose(out.pixels, gray.pixels, atol=1e-5)  # gray has no hue and no saturation
    colour = Chip(np.stack([np.full((SIZE, SIZE), v, np.float32) for v in (0.6, 0.4, 0.3)]), gray.valid, [], [])
    out = photometric(colour, np.random.default_rng(0), TrainSettings(hue_jitter=0.1))
    luma = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
    assert not np.allclose(out.pixels, colour.pixels, atol=1e-3)
    np.testing.assert_allclose(np.einsum("c,chw->hw", luma, out.pixels), np.einsum("c,chw->hw", luma, colour.pixels), atol=1e-4)


def test_jpeg_makes_blocks_and_blur_smooths() -> None:
    rng = np.random.default_rng(0)
    noisy = Chip(rng.random((3, SIZE, SIZE), dtype=np.float32), np.ones((SIZE, SIZE), dtype=bool), [], [])
    jpg = photometric(noisy, np.random.default_rng(0), TrainSettings(jpeg=1.0))
    blurred = photometric(noisy, np.random.default_rng(0), TrainSettings(blur=1.0))

    def roughness(p: np.ndarray) -> float:
        return float(np.abs(np.diff(p, axis=-1)).mean())

    assert roughness(blurred.pixels) < 0.6 * roughness(noisy.pixels)
    assert roughness(jpg.pixels) < roughness(noisy.pixels) and np.abs(jpg.pixels - noisy.pixels).mean() > 0.02


def test_bad_augmentation_settings() -> None:
    for bad in ({"copy_paste": 1.5}, {"jpeg": -0.1}, {"hue_jitter": 0.7}, {"noise": 1.0}, {"saturation_jitter": 2.0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            TrainSettings(**bad)


def test_sampler_pastes_across_rasters(tmp_path: Path) -> None:
    """With copy_paste 1 every positive source is pasted: chips carry more objects, all consistent."""
    a, la, _ = square_scene(tmp_path, "a", 11, size=160, n=8)
    b, lb, _ = square_scene(tmp_path, "b", 12, size=160, n=8)
    settings = TrainSettings(arch="tiny_fpn", chip_size_px=64, gsd_m=None, min_area_px=4, color_jitter=0.0)
    rasters = open_rasters([str(a), str(b)], [str(la), str(lb)], settings)
    reader = ChipReader(rasters, 64, 4)
    plain = ChipSampler(reader, settings, np.random.default_rng(0))
    pasted = ChipSampler(reader, settings.replace(copy_paste=1.0), np.random.default_rng(0))
    n_plain = sum(len(plain.sample().masks) for _ in range(20))
    chips = [pasted.sample() for _ in range(20)]
    reader.close()
    assert sum(len(c.masks) for c in chips) > n_plain
    for chip in chips:
        assert all(m.sum() >= 4 for m in chip.masks)
        if chip.masks:
            _boxes_match_masks(chip)
