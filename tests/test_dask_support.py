"""Detectors for the Dask tests, importable by worker processes (``tests.test_dask_support:slow_truth``).

They wrap :class:`geomask.testing.TruthDetector`: one is slow (so a worker or the job can be killed
mid-run), one fails on chosen tiles for a data reason while a flag folder exists (a folder, so the
model hash of the run folder does not change when it is removed).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from geomask.detect.base import ModelHints, TileImage
from geomask.errors import DetectorError
from geomask.instances import Instance
from geomask.testing import TruthDetector


class SlowTruth:
    """The truth, ``delay_s`` seconds per tile later."""

    def __init__(self, labels: str, delay_s: float, fail_tiles: Sequence[int] = (), fail_while: str | None = None):
        self.truth = TruthDetector(labels)
        self.name, self.classes, self.hints = self.truth.name, self.truth.classes, ModelHints()
        self.delay_s = delay_s
        self.fail_tiles = set(fail_tiles)
        self.fail_while = fail_while

    def detect(self, batch: Sequence[TileImage]) -> list[list[Instance]]:
        time.sleep(self.delay_s * len(batch))
        if self.fail_while is not None and Path(self.fail_while).exists():
            bad = [im.tile.index for im in batch if im.tile.index in self.fail_tiles]
            if bad:
                raise DetectorError(f"tile {bad[0]} is unreadable garbage (test)")
        return self.truth.detect(batch)


def slow_truth(labels: str, delay_s: float = 0.0, fail_tiles: Sequence[int] = (), fail_while: str | None = None) -> SlowTruth:
    """Factory for ``detector.factory: test_dask_support:slow_truth``."""
    return SlowTruth(labels, delay_s, fail_tiles, fail_while)


def broken_detector(labels: str) -> SlowTruth:
    """A factory that fails the way a model does when its weights or device are missing."""
    raise RuntimeError(f"CUDA error: no device for {Path(labels).name}")


SLOW = "tests.test_dask_support:slow_truth"

# -- helpers shared by test_dask.py and test_cli_cluster.py ------------------------------------------

TILE_PX, OVERLAP_PX, TILES_PER_TASK = 256, 32, 4  # 1500 px → 7 × 7 tiles → 16 detect tasks of 2 × 2 tiles


def make_inputs(directory: Path, n: int = 1, size_px: int = 1500) -> list[tuple[Path, Path]]:
    """Write ``n`` synthetic scenes (image, labels) with objects across tile borders and bigger than a tile."""
    from affine import Affine

    from geomask.testing import make_scene, write_scene

    out = []
    for k in range(n):
        labels = make_scene(size_px, size_px, 120, seed=11 + k, max_size_px=600)
        transform = Affine(0.3, 0, 500_000 + 1000 * k, 0, -0.3, 5_200_000)
        out.append(write_scene(directory, labels, transform, "EPSG:32633", name=f"scene{k}"))
    return out


def write_config(path: Path, labels: Path, factory: str = "geomask.testing:truth_detector", **options: object) -> Path:
    """Write a YAML config using a truth-based detector on ``labels``."""
    import yaml

    data = {
        "detector": {"factory": factory, "options": {"labels": str(labels), **options}, "batch_size": 2},
        "tiling": {"size_px": TILE_PX, "overlap_px": OVERLAP_PX},
        "dask": {"tiles_per_task": TILES_PER_TASK, "dashboard": False},
    }
    path.write_text(yaml.safe_dump(data))
    return path


def polygons(path: Path, source: str | None = None) -> list[tuple[object, ...]]:
    """Read an output back with pyogrio: the sorted set of (geometry, class, score, area) rows, order aside."""
    import pyogrio
    import shapely

    layer = "instances" if Path(path).suffix.lower() == ".gpkg" else None  # geomask's layer beside its QGIS style
    frame = pyogrio.read_dataframe(path, layer=layer)
    if source is not None:
        frame = frame[frame["source"] == source]
    geoms = shapely.to_wkb(shapely.normalize(frame.geometry.values), hex=True)
    return sorted(zip(geoms, frame["class_id"], frame["score"], frame["area_m2"], strict=True))


def serial_polygons(image: Path, config: Path, out: Path) -> list[tuple[object, ...]]:
    """Run the serial reference path and read its output back."""
    from geomask.config import load_config
    from geomask.pipeline import run_serial

    run_serial(image, out, load_config(config))
    return polygons(out)


def test_slow_truth_returns_the_truth(tmp_path: Path) -> None:
    ((image, labels),) = make_inputs(tmp_path, size_px=300)
    config = write_config(tmp_path / "slow.yaml", labels, "tests.test_dask_support:slow_truth", delay_s=0.0)
    assert serial_polygons(image, config, tmp_path / "a.gpkg") == serial_polygons(
        image, write_config(tmp_path / "t.yaml", labels), tmp_path / "b.gpkg"
    )
