"""The one block runner: serial and Dask share it, so a corrupt block fails the same way on both paths."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from geomask.detect.base import ModelHints, TileImage
from geomask.errors import DetectorError
from geomask.inference import SKIPPED_PER_YIELD, TileFailure, read_batches, run_tiles
from geomask.instances import Instance
from geomask.pipeline import plan_raster
from geomask.testing import make_scene, write_scene
from tests.helpers import truth_config
from tests.test_bad_input import run_cli
from tests.test_dask_support import polygons, write_config


def tiled_copy(src_path: Path, dst_path: Path) -> Path:
    """Rewrite a raster as a tiled, DEFLATE-compressed GeoTIFF with 256-px blocks."""
    with rasterio.open(src_path) as src:
        profile = src.profile | {"tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate", "interleave": "pixel"}
        data = src.read()
    with rasterio.open(dst_path, "w", **profile) as dst:
        dst.write(data)
    return dst_path


def corrupt_block(path: Path, row: int, col: int) -> None:
    """Overwrite one compressed block with garbage, as a bad disk or an interrupted copy leaves it."""
    with rasterio.open(path) as src:
        offset = int(src.get_tag_item(f"BLOCK_OFFSET_{col}_{row}", "TIFF", bidx=1))
        size = int(src.get_tag_item(f"BLOCK_SIZE_{col}_{row}", "TIFF", bidx=1))
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)))


@pytest.fixture
def corrupt_scene(tmp_path: Path) -> tuple[Path, Path]:
    labels = make_scene(1024, 1024, 60, seed=5, max_size_px=300)
    image, label_path = write_scene(tmp_path, labels, Affine(0.3, 0, 500_000, 0, -0.3, 5_200_000), "EPSG:32633", name="plain")
    bad = tiled_copy(image, tmp_path / "scene.tif")
    corrupt_block(bad, 0, 2)  # rows 0..256, cols 512..768; half the normalisation samples read it
    return bad, label_path


@pytest.mark.slow
def test_corrupt_block_gives_the_same_output_and_exit_code_serial_and_dask(
    tmp_path: Path, corrupt_scene: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    image, labels = corrupt_scene
    config = write_config(tmp_path / "c.yaml", labels)
    code_s, err_s = run_cli(["predict", str(image), "-o", str(tmp_path / "serial.gpkg"), "-c", str(config), "--serial"], capsys)
    code_d, err_d = run_cli(["predict", str(image), "-o", str(tmp_path / "dask.gpkg"), "-c", str(config), "--workers", "1"], capsys)
    assert (code_s, code_d) == (3, 3), (err_s, err_d)
    assert "tile(s) failed" in err_s and "tile(s) failed" in err_d
    serial = polygons(tmp_path / "serial.gpkg")
    assert serial and serial == polygons(tmp_path / "dask.gpkg")


def test_failed_tiles_are_recorded_and_the_rest_is_detected(corrupt_scene: tuple[Path, Path]) -> None:
    image, labels = corrupt_scene
    cfg = truth_config(labels)
    from geomask.testing import truth_detector

    det = truth_detector(str(labels))
    plan = plan_raster(image, cfg)
    found: list[Instance] = []
    with plan.reader() as reader:
        run = run_tiles(reader, plan.tiles, det, 4, found.extend)
    assert run.failures and {f.stage for f in run.failures} == {"read"}
    # Every tile that reads the corrupt block (rows 0..256, cols 512..768) failed, and only those.
    touching = {t.index for t in plan.tiles if t.read.row_off < 256 and t.read.col_off < 768 and t.read.col_off + t.read.width > 512}
    assert {f.tile for f in run.failures} == touching
    assert found and {i.tile_id for i in found}.isdisjoint(touching)


class _PickyDetector:
    """Rejects any batch holding tile 1 for a data reason; returns nothing otherwise."""

    name, classes, hints = "picky", ("object",), ModelHints()

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def detect(self, batch: Sequence[TileImage]) -> list[list[Instance]]:
        self.calls.append([im.tile.index for im in batch])
        if any(im.tile.index == 1 for im in batch):
            raise DetectorError("tile 1 is garbage")
        return [[] for _ in batch]


def test_a_rejected_batch_is_retried_tile_by_tile(corrupt_scene: tuple[Path, Path], tmp_path: Path) -> None:
    _image, labels = corrupt_scene
    plan = plan_raster(tmp_path / "plain.tif", truth_config(labels))
    det = _PickyDetector()
    with plan.reader() as reader:
        run = run_tiles(reader, plan.tiles[:4], det, 4, lambda insts: None, threading.Lock())
    assert run.failures == [TileFailure(1, "detect", "tile 1 is garbage")]
    assert det.calls[0] == [0, 1, 2, 3] and sorted(det.calls[1:]) == [[0], [1], [2], [3]]


def test_a_nodata_collar_still_yields_so_a_stop_is_seen(tmp_path: Path) -> None:
    data = np.zeros((3, 64 * 80, 64), dtype=np.uint8)
    with rasterio.open(
        tmp_path / "empty.tif", "w", driver="GTiff", width=64, height=64 * 80, count=3, dtype="uint8", nodata=0,
        crs="EPSG:32633", transform=Affine(0.3, 0, 500_000, 0, -0.3, 5_200_000),
    ) as dst:  # fmt: skip
        dst.write(data)
    cfg = truth_config(tmp_path / "empty.tif", size=64, overlap=8)
    with pytest.raises(Exception, match="no valid pixel"):
        plan_raster(tmp_path / "empty.tif", cfg)  # an all-nodata raster is refused at planning...
    data[:, -10:, :] = 7  # ...so give it a few valid rows at the far end
    with rasterio.open(tmp_path / "empty.tif", "r+") as dst:
        dst.write(data)
    plan = plan_raster(tmp_path / "empty.tif", cfg)
    with plan.reader() as reader:
        batches = list(read_batches(reader, plan.tiles, 4))
    assert max(b.skipped for b in batches) <= SKIPPED_PER_YIELD
    assert len(batches) >= len(plan.tiles) // SKIPPED_PER_YIELD
