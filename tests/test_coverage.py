"""Empty regions cost nothing: coverage from sparse blocks and overviews, tiles skipped only when provably empty, the AOI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
import shapely.affinity
from affine import Affine
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from rasterio.features import rasterize
from rasterio.windows import Window

from geomask.config import Config, merge_overrides
from geomask.coverage import aoi_in_pixels, raster_coverage
from geomask.detect.base import TileImage
from geomask.instances import Instance
from geomask.pipeline import RasterPlan, plan_raster, predict_raster
from geomask.raster import NormStats, RasterReader, inspect_raster, working_grid
from geomask.testing import TruthDetector, make_scene, write_sparse_scene
from geomask.tiling import plan_tiles
from tests.helpers import UTM, write_raster

TRANSFORM = Affine(0.3, 0.0, 500_000.0, 0.0, -0.3, 5_200_000.0)
SIDE = 1536


class CountingTruth(TruthDetector):
    """The truth detector, remembering which tiles it was shown."""

    def __init__(self, labels: str | Path):
        super().__init__(labels)
        self.seen: list[int] = []

    def detect(self, batch: list[TileImage]) -> list[list[Instance]]:  # type: ignore[override]
        self.seen += [im.tile.index for im in batch]
        return super().detect(batch)


def footprint(side: int = SIDE) -> shapely.Polygon:
    """An irregular, rotated flight area in pixel space (x = column, y = row), about a third of the raster."""
    pts = [(0.30, 0.08), (0.78, 0.22), (0.70, 0.55), (0.92, 0.80), (0.45, 0.93), (0.12, 0.60), (0.35, 0.42)]
    return shapely.Polygon([(x * side, y * side) for x, y in pts])


def polygon_scene(directory: Path, overviews: tuple[int, ...] = ()) -> tuple[Path, Path]:
    labels = make_scene(SIDE, SIDE, 150, seed=5, max_size_px=500, n_big=1)
    valid = rasterize([footprint()], out_shape=(SIDE, SIDE), transform=Affine.identity()).astype(bool)
    return write_sparse_scene(directory, SIDE, SIDE, TRANSFORM, UTM, [(0, 0, labels, valid)], block_px=64, overviews=overviews)


def config(labels: Path, **more: object) -> Config:
    over: dict[str, object] = {
        "detector.factory": "geomask.testing:truth_detector",
        "detector.options": {"labels": str(labels)},
        "detector.batch_size": 2,
        "tiling.size_px": 256,
        "tiling.overlap_px": 32,
        "dask.tiles_per_task": 4,
        "dask.dashboard": False,
    }
    over.update(more)
    return merge_overrides(Config(), over)


def geoms(feats: list) -> list[bytes]:
    return sorted(shapely.to_wkb(shapely.normalize(f.geometry)) for f in feats)


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return polygon_scene(tmp_path_factory.mktemp("polygon"))


# -- coverage ---------------------------------------------------------------------------------------


def test_unwritten_blocks_are_the_only_ones_skipped(tmp_path: Path) -> None:
    labels = np.zeros((256, 256), np.int32)
    valid = np.zeros((256, 256), bool)
    valid[70:80, 130:200] = True  # blocks (1, 2) and (1, 3) of 64 px
    image, _ = write_sparse_scene(tmp_path, 512, 512, TRANSFORM, UTM, [(0, 0, labels, valid)], block_px=64)
    cov = raster_coverage(inspect_raster(image))
    assert cov.method == "sparse-blocks" and cov.cells.shape == (8, 8)
    assert sorted(map(tuple, np.argwhere(cov.cells).tolist())) == [(1, 2), (1, 3)]


def test_a_raster_without_nodata_is_valid_everywhere(tmp_path: Path) -> None:
    image = write_raster(tmp_path / "full.tif", np.full((3, 64, 64), 9, np.uint8), TRANSFORM, tiled=True, blockxsize=16, blockysize=16)
    assert raster_coverage(inspect_raster(image)).method == "everywhere"


@pytest.mark.parametrize("resampling, trusted", [("average", True), ("nearest", False)])
def test_only_overviews_that_keep_partial_footprints_valid_are_trusted(tmp_path: Path, resampling: str, trusted: bool) -> None:
    data = np.zeros((3, 512, 512), np.uint8)  # a written nodata collar: no sparse blocks to go by
    data[:, 300:303, 40:43] = 120
    image = write_raster(tmp_path / "c.tif", data, TRANSFORM, nodata=0, tiled=True, blockxsize=64, blockysize=64, compress="deflate")
    with rasterio.open(image, "r+") as dst:
        dst.build_overviews([4, 16], rasterio.enums.Resampling[resampling])
    cov = raster_coverage(inspect_raster(image))
    assert cov.method == ("overview" if trusted else "everywhere")
    if trusted:
        assert cov.fraction < 0.05
        assert cov.windows_may_hold([40], [300], [43], [303])[0]


def test_the_mask_scan_is_exact_where_a_decimated_read_is_not(tmp_path: Path) -> None:
    """A striped raster written in full (a stored nodata collar): no sparse block, no overview to go by."""
    data = np.zeros((3, 700, 900), np.uint8)
    data[:, 301, 45] = 120  # a one-pixel island, between the samples of a decimated read
    data[:, 640:700, 820:900] = 50
    image = write_raster(tmp_path / "striped.tif", data, TRANSFORM, nodata=0, tiled=False, compress="deflate")
    info = inspect_raster(image)
    assert raster_coverage(info).method == "everywhere"  # without the scan nothing is known
    with rasterio.open(image) as src:
        decimated = src.dataset_mask(out_shape=(22, 29), resampling=rasterio.enums.Resampling.nearest)
    assert decimated[301 * 22 // 700, 45 * 29 // 900] == 0  # the island is lost: a decimated read proves nothing
    cov = raster_coverage(info, scan=True)
    assert cov.method == "mask-scan" and cov.cell_width_px == cov.cell_height_px == 32.0
    expected = np.zeros(cov.cells.shape, bool)
    expected[301 // 32, 45 // 32] = True
    expected[640 // 32 :, 820 // 32 :] = True
    assert np.array_equal(cov.cells, expected)  # exactly the cells holding a valid pixel, no more


@st.composite
def masks(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    block = draw(st.sampled_from([16, 32]))
    h, w = draw(st.integers(40, 260)), draw(st.integers(40, 260))
    valid = np.zeros((h, w), bool)
    for _ in range(draw(st.integers(0, 4))):  # rectangles
        r, c = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        valid[r : r + draw(st.integers(1, 40)), c : c + draw(st.integers(1, 40))] = True
    for _ in range(draw(st.integers(0, 4))):  # single pixels: the ones an overview could lose
        valid[draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))] = True
    if not valid.any():
        valid[draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))] = True
    return valid, block


@settings(
    max_examples=30, deadline=None, phases=[Phase.explicit, Phase.generate], suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    mask=masks(),
    overviews=st.sampled_from([(), (2, 4), (4, 8, 16)]),
    resampling=st.sampled_from(["average", "nearest"]),
    sparse=st.booleans(),
    striped=st.booleans(),
    scan=st.booleans(),
    size=st.integers(16, 96),
    scale=st.sampled_from([1.0, 0.6, 1.7]),
    data=st.data(),
)
def test_no_tile_holding_a_valid_pixel_is_ever_skipped(
    tmp_path_factory: pytest.TempPathFactory,
    mask: tuple[np.ndarray, int],
    overviews: tuple[int, ...],
    resampling: str,
    sparse: bool,
    striped: bool,
    scan: bool,
    size: int,
    scale: float,
    data: st.DataObject,
) -> None:
    valid, block = mask
    h, w = valid.shape
    d = tmp_path_factory.mktemp("prop")
    if sparse:
        hp, wp = -(-h // block) * block, -(-w // block) * block
        padded = np.zeros((hp, wp), bool)
        padded[:h, :w] = valid
        image, _ = write_sparse_scene(
            d, h, w, TRANSFORM, UTM, [(0, 0, np.zeros((hp, wp), np.int32), padded)], block, overviews=overviews, resampling=resampling
        )
    else:
        pixels = np.where(valid, 100, 0).astype(np.uint8)[None].repeat(3, 0)
        layout = {"tiled": False} if striped else {"tiled": True, "blockxsize": block, "blockysize": block}
        image = write_raster(d / "dense.tif", pixels, TRANSFORM, nodata=0, **layout)
        if overviews:
            with rasterio.open(image, "r+") as dst:
                dst.build_overviews(list(overviews), rasterio.enums.Resampling[resampling])
    info = inspect_raster(image)
    grid = working_grid(info, info.gsd_m * scale)
    overlap = data.draw(st.integers(1, size - 1))
    tiles = plan_tiles(grid.width, grid.height, size, overlap)
    cov = raster_coverage(info, scan=scan)
    if not scan:
        assert "mask-scan" not in cov.method
    elif not sparse and (not overviews or resampling == "nearest"):
        assert cov.method == "mask-scan"  # no other evidence: the scan is the fallback
    kept = cov.tiles_may_hold(grid, [t.read for t in tiles])
    identity = NormStats((0.0,) * 3, (1.0,) * 3, "none")
    with RasterReader(info, grid, [1, 2, 3], identity) as reader:
        for tile, keep in zip(tiles, kept, strict=True):
            if not keep:
                assert not reader.read_raw(tile.read)[1].any(), f"tile {tile.index} {tile.read} holds valid pixels ({cov.method})"


# -- the same objects with and without skipping --------------------------------------------------------


def test_skipping_empty_tiles_gives_the_same_objects(scene: tuple[Path, Path]) -> None:
    image, labels = scene
    plan, feats, summary = predict_raster(image, config(labels), TruthDetector(labels))
    ref_plan, ref, ref_summary = predict_raster(image, config(labels, **{"tiling.skip_empty": False}), TruthDetector(labels))
    assert len(ref) > 40 and geoms(feats) == geoms(ref)
    assert summary.n_tiles_empty > 0 and summary.n_tiles + summary.n_tiles_empty == ref_summary.n_tiles == 49
    assert {t.index for t in plan.tiles} < {t.index for t in ref_plan.tiles}


def test_the_mask_scan_skips_a_stored_collar_with_the_same_objects(scene: tuple[Path, Path], tmp_path: Path) -> None:
    image, labels = scene
    with rasterio.open(image) as src:  # the same pixels, striped and written in full: nothing sparse
        striped = write_raster(tmp_path / "striped.tif", src.read(), src.transform, nodata=0, tiled=False, compress="deflate")
    _, feats, summary = predict_raster(striped, config(labels, **{"tiling.scan_mask": True}), TruthDetector(labels))
    _, ref, ref_summary = predict_raster(striped, config(labels), TruthDetector(labels))
    assert ref_summary.n_tiles_empty == 0 and ref_summary.n_tiles == 49  # without the scan: no evidence
    assert summary.n_tiles_empty > 0 and len(ref) > 40 and geoms(feats) == geoms(ref)


# -- the area of interest --------------------------------------------------------------------------


def write_aoi(path: Path, plan: RasterPlan, box_px: tuple[float, float, float, float]) -> shapely.Polygon:
    """Write a pixel-space box as a polygon in EPSG:4326 (another CRS than the raster's); return it in map coordinates."""
    import geopandas as gpd

    t = plan.grid.transform
    poly = shapely.affinity.affine_transform(shapely.box(*box_px), [t.a, t.b, t.d, t.e, t.xoff, t.yoff])
    gpd.GeoDataFrame(geometry=[poly], crs=UTM).to_crs("EPSG:4326").to_file(path)
    return poly


def aoi_expectations(plan: RasterPlan, aoi_path: Path, full: list) -> tuple[set[int], list[bytes], int]:
    """Tiles an AOI run may read, the objects it must write, and how many of those cross the AOI's edge."""
    aoi = shapely.union_all(pyogrio.read_dataframe(aoi_path).to_crs(UTM).geometry.to_numpy())
    aoi_px = aoi_in_pixels(aoi, plan.grid.transform)
    overlap = plan.config.tiling.overlap_px
    assert overlap is not None
    near = {t.index for t in plan.tiles if shapely.box(*_bounds(t.read)).distance(aoi_px) <= overlap}
    keep = [f for f in full if f.geometry.intersects(aoi)]
    crossing = sum(1 for f in keep if not f.geometry.within(aoi))
    return near, geoms(keep), crossing


def _bounds(w: Window) -> tuple[float, float, float, float]:
    return (w.col_off, w.row_off, w.col_off + w.width, w.row_off + w.height)


def test_aoi_reads_only_touching_tiles_and_keeps_edge_objects_whole_once(scene: tuple[Path, Path], tmp_path: Path) -> None:
    image, labels = scene
    full_plan, full, _ = predict_raster(image, config(labels), TruthDetector(labels))
    aoi_path = tmp_path / "aoi.gpkg"
    write_aoi(aoi_path, full_plan, (500, 450, 950, 900))
    near, want, crossing = aoi_expectations(full_plan, aoi_path, full)
    det = CountingTruth(labels)
    plan, feats, summary = predict_raster(image, config(labels, **{"tiling.aoi": str(aoi_path)}), det)
    assert summary.n_tiles_outside_aoi > 0 and summary.n_tiles == len(plan.tiles) == len(set(det.seen))
    assert set(det.seen) <= near and len(det.seen) < len(full_plan.tiles)
    touching = {t.index for t in full_plan.tiles if shapely.box(*_bounds(t.read)).intersects(aoi_in_pixels(plan.aoi, plan.grid.transform))}
    assert touching <= set(det.seen)
    assert crossing >= 3, "the AOI must cut through objects for this test to mean anything"
    assert geoms(feats) == want and len(set(geoms(feats))) == len(feats)


def test_an_unreadable_aoi_is_one_line(scene: tuple[Path, Path], tmp_path: Path) -> None:
    from geomask.errors import ConfigError

    image, labels = scene
    (tmp_path / "aoi.gpkg").write_text("not a geopackage")
    with pytest.raises(ConfigError, match=r"tiling.aoi .*cannot read it"):
        plan_raster(image, config(labels, **{"tiling.aoi": str(tmp_path / "aoi.gpkg")}))


# -- the Dask path ------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_dask_skips_empty_and_aoi_tiles_with_the_serial_objects(scene: tuple[Path, Path], tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    from tests.test_dask_support import polygons
    from workflows.inputs import plan_outputs
    from workflows.job import run_job

    image, labels = scene
    full_plan, full, _ = predict_raster(image, config(labels, **{"tiling.skip_empty": False}), TruthDetector(labels))
    aoi_path = tmp_path / "aoi.gpkg"
    write_aoi(aoi_path, full_plan, (500, 450, 950, 900))
    near, want, _ = aoi_expectations(full_plan, aoi_path, full)
    aoi_plan, _, _ = predict_raster(image, config(labels, **{"tiling.aoi": str(aoi_path)}), TruthDetector(labels))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, Client(cluster) as client:
        out = tmp_path / "all.gpkg"
        summary = run_job(client, [image], plan_outputs(str(out), [image]), config(labels), progress_every_s=1.0)
        assert summary.n_tiles_empty > 0 and summary.n_tiles + summary.n_tiles_empty == len(full_plan.tiles)
        assert summary.tasks_total < 16 and not summary.failures  # blocks without a planned tile are never submitted
        assert [g for g, *_ in polygons(out)] == sorted(shapely.to_wkb(shapely.normalize(f.geometry), hex=True) for f in full)
        out = tmp_path / "aoi_out.gpkg"
        summary = run_job(
            client, [image], plan_outputs(str(out), [image]), config(labels, **{"tiling.aoi": str(aoi_path)}), progress_every_s=1.0
        )
        assert summary.n_tiles_outside_aoi > 0 and summary.n_tiles == len(aoi_plan.tiles) and {t.index for t in aoi_plan.tiles} <= near
        assert [g for g, *_ in polygons(out)] == sorted(shapely.to_wkb(w, hex=True) for w in (shapely.from_wkb(b) for b in want))
