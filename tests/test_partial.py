"""Objects next to a failed tile: kept, and marked ``partial`` in every format; all others are whole."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import pyogrio
import pytest
import shapely

from geomask.config import load_config
from geomask.export import FORMATS, PARQUET
from geomask.pipeline import plan_raster, run_serial
from tests.test_dask_support import SLOW, make_inputs, write_config

FAILED = [4]  # the centre tile of a 3 × 3 grid: its core touches every other tile


def _read(path: Path) -> gpd.GeoDataFrame:
    return gpd.read_parquet(path) if FORMATS[path.suffix].driver == PARQUET else pyogrio.read_dataframe(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A 700 px scene, its truth config, and a config whose detector fails on the centre tile."""
    d = tmp_path_factory.mktemp("partial")
    ((image, labels),) = make_inputs(d, size_px=700)
    flag = d / "broken"
    flag.mkdir()
    return image, write_config(d / "ok.yaml", labels), write_config(d / "bad.yaml", labels, SLOW, fail_tiles=FAILED, fail_while=str(flag))


@pytest.mark.parametrize("suffix", sorted(FORMATS))
def test_objects_touching_a_failed_tile_are_marked_partial(runs: tuple[Path, Path, Path], tmp_path: Path, suffix: str) -> None:
    image, ok, bad = runs
    whole = _read(Path(run_serial(image, tmp_path / f"whole{suffix}", load_config(ok)).output or ""))
    summary = run_serial(image, tmp_path / f"cut{suffix}", load_config(bad))
    assert [f.tile for f in summary.failures] == FAILED
    cut = _read(tmp_path / f"cut{suffix}")
    assert set(cut["partial"].astype(bool)) == {True, False} and not whole["partial"].astype(bool).any()
    plan = plan_raster(image, load_config(bad))
    w = plan.tiles[FAILED[0]].core
    x0, y0 = plan.grid.transform @ (w.col_off, w.row_off)
    x1, y1 = plan.grid.transform @ (w.col_off + w.width, w.row_off + w.height)
    core = shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
    partial = cut["partial"].astype(bool).to_numpy()
    touches = shapely.intersects(cut.geometry.to_crs(plan.info.crs).values, core) if FORMATS[suffix].map_crs else None
    if touches is not None:  # GeoJSON is in WGS 84: a reprojected edge may move by a hair; check the count only
        assert abs(int(touches.sum()) - int(partial.sum())) <= 1
    else:
        assert (shapely.intersects(cut.geometry.values, core) == partial).all()
        # every unmarked object is a whole one: exactly as in the run without failures
        key = set(shapely.to_wkb(shapely.normalize(whole.geometry.values), hex=True))
        unmarked = shapely.to_wkb(shapely.normalize(cut.geometry.values[~partial]), hex=True)
        assert set(unmarked) <= key
        # and some marked ones are truncated pieces (no whole object has their outline)
        marked = shapely.to_wkb(shapely.normalize(cut.geometry.values[partial]), hex=True)
        assert any(m not in key for m in marked)
