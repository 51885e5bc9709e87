"""Raster input: windowed reads, band selection, nodata, normalisation fixed per raster, resampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window

from geomask.errors import RasterContentError, RasterReadError
from geomask.normalize import compute_norm_stats
from geomask.pipeline import detect_tiles, plan_raster, predict_raster
from geomask.raster import inspect_raster, resolve_bands, working_grid
from geomask.testing import truth_detector, write_scene
from tests.helpers import UTM_TRANSFORM, truth_config, write_raster


def test_uint16_is_stretched_by_percentiles_not_divided_by_255(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(1000, 3000, size=(3, 300, 300)).astype(np.uint16)
    path = write_raster(tmp_path / "u16.tif", data)
    info = inspect_raster(path)
    grid = working_grid(info, None)
    stats = compute_norm_stats(info, grid, [1, 2, 3], "auto", (2.0, 98.0), 4, 128)
    assert stats.mode == "percentile"
    assert 1000 <= stats.low[0] < 1100 and 2900 < stats.high[0] <= 3000
    out = stats.apply(data[:, :10, :10])
    assert out.min() >= 0.0 and out.max() <= 1.0 and out.std() > 0.1


def test_uint8_uses_the_full_range(tmp_path: Path) -> None:
    path = write_raster(tmp_path / "u8.tif", np.full((3, 64, 64), 51, np.uint8))
    info = inspect_raster(path)
    stats = compute_norm_stats(info, working_grid(info, None), [1, 2, 3], "auto", (2.0, 98.0), 4, 32)
    assert stats.mode == "range" and stats.apply(np.full((3, 1, 1), 51, np.uint8))[0, 0, 0] == pytest.approx(0.2)


def test_normalisation_is_identical_in_every_tile(tmp_path: Path) -> None:
    # Left half dark, right half bright: a per-tile stretch would map value 500 differently in each half.
    data = np.zeros((1, 256, 512), np.uint16)
    data[:, :, :256] = np.linspace(100, 600, 256, dtype=np.uint16)
    data[:, :, 256:] = np.linspace(500, 4000, 256, dtype=np.uint16)
    data[:, 10, 10] = 500
    data[:, 10, 300] = 500
    path = write_raster(tmp_path / "halves.tif", data)
    plan = plan_raster(path, truth_config(path, size=256, overlap=16))
    with plan.reader() as reader:
        left, _ = reader.read(plan.tiles[0].read)
        right, _ = reader.read(plan.tiles[-1].read)
    c = int(plan.tiles[-1].read.col_off)
    assert left[0, 10, 10] == right[0, 10, 300 - c]
    assert left.shape[0] == 3  # single band expanded for RGB models


def test_band_selection_and_order(tmp_path: Path) -> None:
    data = np.stack([np.full((32, 32), v, np.uint8) for v in (10, 20, 30, 40)])
    path = write_raster(tmp_path / "four.tif", data)
    plan = plan_raster(path, truth_config(path, **{"raster.bands": [4, 2, 1]}))
    with plan.reader() as reader:
        pixels, _ = reader.read(Window(0, 0, 32, 32))
    assert [round(float(pixels[i, 0, 0]) * 255) for i in range(3)] == [40, 20, 10]
    with pytest.raises(RasterContentError, match=r"raster\.bands"):
        resolve_bands(inspect_raster(path), [5])


def test_nodata_pixels_never_belong_to_an_instance_and_empty_tiles_are_skipped(tmp_path: Path) -> None:
    labels = np.zeros((300, 600), np.int32)
    labels[100:200, 100:200] = 1
    image, label_path = write_scene(tmp_path, labels, UTM_TRANSFORM, "EPSG:32633", nodata=0)
    with rasterio.open(image, "r+") as dst:
        block = dst.read()
        block[:, :, 150:] = 0  # right side (and half of the object) is nodata
        dst.write(block)
    cfg = truth_config(label_path, size=128, overlap=16)
    plan = plan_raster(image, cfg)
    found = detect_tiles(plan, plan.tiles, truth_detector(str(label_path)), 4)
    instances, skipped = found.instances, found.n_skipped
    assert skipped == sum(1 for t in plan.tiles if t.read.col_off >= 150)
    assert skipped > 0
    for inst in instances:
        assert inst.col_off + inst.width <= 150
    _, feats, _ = predict_raster(image, cfg, truth_detector(str(label_path)))
    (feat,) = feats
    assert feat.area_m2 == pytest.approx(100 * 50 * 0.0625, rel=2e-3)


def test_internal_mask_is_respected(tmp_path: Path) -> None:
    labels = np.zeros((100, 100), np.int32)
    labels[20:80, 20:80] = 1
    image, label_path = write_scene(tmp_path, labels, UTM_TRANSFORM, "EPSG:32633")
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(image, "r+") as dst:
        mask = np.full((100, 100), 255, np.uint8)
        mask[:, 50:] = 0
        dst.write_mask(mask)
    _, feats, _ = predict_raster(image, truth_config(label_path, size=64, overlap=8), truth_detector(str(label_path)))
    assert feats[0].area_m2 == pytest.approx(60 * 30 * 0.0625, rel=2e-3)


def test_float32_input_is_read(tmp_path: Path) -> None:
    labels = np.zeros((128, 128), np.int32)
    labels[10:40, 10:40] = 1
    image, label_path = write_scene(tmp_path, labels, UTM_TRANSFORM, "EPSG:32633", dtype="float32")
    _, feats, _ = predict_raster(image, truth_config(label_path, size=64, overlap=8), truth_detector(str(label_path)))
    assert len(feats) == 1


def test_resampled_grid_keeps_the_extent_exactly(tmp_path: Path) -> None:
    path = write_raster(tmp_path / "fine.tif", np.zeros((3, 1000, 1500), np.uint8) + 7, Affine(0.075, 0, 500_000, 0, -0.075, 5e6))
    info = inspect_raster(path)
    assert info.gsd_m == pytest.approx(0.075, rel=1e-3)
    grid = working_grid(info, 0.3)
    assert (grid.width, grid.height) == (375, 250)
    assert grid.transform @ (grid.width, grid.height) == pytest.approx(info.transform @ (info.width, info.height))
    assert grid.gsd_m == pytest.approx(0.3, rel=1e-3)
    plan = plan_raster(path, truth_config(path, size=128, overlap=16, **{"raster.gsd_m": 0.3}))
    with plan.reader() as reader:
        pixels, valid = reader.read(plan.tiles[0].read)
    assert pixels.shape == (3, 128, 128) and valid.all()


def test_geographic_crs_gsd_is_in_metres(tmp_path: Path) -> None:
    path = write_raster(tmp_path / "geo.tif", np.zeros((3, 50, 50), np.uint8) + 1, Affine(1e-5, 0, 10.0, 0, -1e-5, 50.0), crs="EPSG:4326")
    gsd = inspect_raster(path).gsd_m
    assert 0.7 < gsd < 1.1  # ~1.11 m north-south × ~0.72 m east-west at 50°N


def test_missing_file_is_a_read_error(tmp_path: Path) -> None:
    with pytest.raises(RasterReadError, match="does not exist"):
        inspect_raster(tmp_path / "nope.tif")
