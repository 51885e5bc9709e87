"""The serial pipeline end to end with the truth detector: exact objects, exact coordinates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyogrio
import pytest
import shapely
from affine import Affine
from pyproj import CRS
from shapely import STRtree

from geomask.config import config_from_dict
from geomask.detect.base import TileImage
from geomask.instances import Instance
from geomask.pipeline import predict_raster, run_serial
from geomask.testing import instances_from_labels, make_scene, truth_detector, write_scene
from geomask.vectorize import Feature, vectorize_instances
from tests.helpers import truth_config, write_raster


def truth_features(labels: np.ndarray, transform: Affine, crs: str) -> list[Feature]:
    return vectorize_instances(instances_from_labels(labels, 0, 0), transform, CRS.from_user_input(crs), 0.25)


def match_one_to_one(pred: list[shapely.Geometry], truth: list[shapely.Geometry]) -> tuple[int, list[float]]:
    """Return (#truth matched by exactly one prediction, IoUs of the matches); asserts no pred is reused."""
    tree = STRtree(pred)
    used: set[int] = set()
    ious = []
    for g in truth:
        cands = [i for i in tree.query(g, predicate="intersects").tolist() if shapely.intersection(pred[i], g).area > 0]
        if len(cands) != 1:
            continue
        (i,) = cands
        assert i not in used
        used.add(i)
        ious.append(shapely.intersection(pred[i], g).area / shapely.union(pred[i], g).area)
    return len(ious), ious


@pytest.fixture(scope="module")
def big_scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    d = tmp_path_factory.mktemp("scene6000")
    labels = make_scene(6000, 6000, 500, seed=11, max_size_px=1500, n_big=4)
    image, label_path = write_scene(d, labels, Affine(0.25, 0, 500_000.0, 0, -0.25, 5_000_000.0), "EPSG:32633")
    return image, label_path, labels


@pytest.mark.slow
@pytest.mark.parametrize("size, overlap", [(256, 16), (256, 64), (512, 16), (512, 128), (1024, 16), (1024, 256)])
def test_6000px_scene_matches_truth_one_to_one(big_scene: tuple[Path, Path, np.ndarray], size: int, overlap: int) -> None:
    image, label_path, labels = big_scene
    cfg = truth_config(label_path, size=size, overlap=overlap)
    _, feats, summary = predict_raster(image, cfg, truth_detector(str(label_path)))
    truth = truth_features(labels, Affine(0.25, 0, 500_000.0, 0, -0.25, 5_000_000.0), "EPSG:32633")
    assert summary.n_tiles > 1
    assert len(feats) == len(truth)  # no duplicates, no splits
    matched, ious = match_one_to_one([f.geometry for f in feats], [t.geometry for t in truth])
    assert matched == len(truth)
    assert min(ious) >= 0.99


@pytest.mark.parametrize(
    "crs, transform",
    [
        ("EPSG:32633", Affine(0.25, 0.0, 500_000.0, 0.0, -0.25, 5_000_000.0)),
        ("EPSG:4326", Affine(2.5e-6, 0.0, 15.123456, 0.0, -2.5e-6, 48.654321)),
        ("EPSG:3857", Affine(0.3, 0.0, 1_683_000.0, 0.0, -0.3, 6_210_000.0)),
    ],
)
def test_output_coordinates_equal_truth_to_1e6_px(tmp_path: Path, crs: str, transform: Affine) -> None:
    labels = np.zeros((300, 400), dtype=np.int32)
    labels[10:60, 20:90] = 1
    labels[100:180, 150:330] = 2  # crosses tile borders
    labels[100:140, 150:200] = 0  # an L-shape
    labels[250:300, 380:400] = 3  # at the raster edge
    image, label_path = write_scene(tmp_path, labels, transform, crs)
    out = tmp_path / "out.gpkg"
    run_serial(image, out, truth_config(label_path, size=128, overlap=16))
    frame = pyogrio.read_dataframe(out)
    assert CRS.from_user_input(frame.crs).equals(CRS.from_user_input(crs))
    assert len(frame) == 3
    expected = {
        1: [(20, 10), (90, 10), (90, 60), (20, 60)],
        2: [(200, 100), (330, 100), (330, 180), (150, 180), (150, 140), (200, 140)],
        3: [(380, 250), (400, 250), (400, 300), (380, 300)],
    }
    inverse = ~transform
    got = []
    for geom in frame.geometry:
        pix = [tuple(inverse @ tuple(xy)) for xy in shapely.get_coordinates(geom).tolist()]
        got.append(pix)
    for corners in expected.values():
        hit = [
            g
            for g in got
            if len(set(map(lambda p: (round(p[0]), round(p[1])), g))) == len(corners)
            and all(min(abs(px - cx) + abs(py - cy) for px, py in g) < 1e-6 for cx, cy in corners)
        ]
        assert len(hit) == 1, f"no output polygon has corners {corners}"
        assert all(min(abs(px - cx) + abs(py - cy) for cx, cy in corners) < 1e-6 for px, py in hit[0])


def test_rotated_and_south_up_rasters_land_exactly(tmp_path: Path) -> None:
    labels = np.zeros((200, 200), dtype=np.int32)
    labels[50:150, 80:120] = 1
    for name, transform in {
        "rotated": Affine.translation(500_000.0, 5_000_000.0) @ Affine.rotation(20.0) @ Affine.scale(0.25, -0.25),
        "southup": Affine(0.25, 0.0, 500_000.0, 0.0, 0.25, 4_990_000.0),
    }.items():
        image, label_path = write_scene(tmp_path, labels, transform, "EPSG:32633", name=name)
        _, feats, _ = predict_raster(image, truth_config(label_path, size=64, overlap=8), truth_detector(str(label_path)))
        (feat,) = feats
        corners = {transform @ (c, r) for c in (80, 120) for r in (50, 150)}
        coords = shapely.get_coordinates(feat.geometry).tolist()
        assert len({(round(x, 6), round(y, 6)) for x, y in coords}) == 4
        for x, y in coords:
            assert min(abs(x - cx) + abs(y - cy) for cx, cy in corners) < 1e-6 * 0.25
        assert feat.area_m2 == pytest.approx(40 * 100 * 0.0625, rel=2e-3)


class BrightObjectDetector:
    """A real (if simple) detector: every 4-connected blob of bright pixels in a tile is an instance.

    It sees only the resampled tile pixels, so it proves that predict feeds the model at the model's
    GSD and maps its instances back to the original raster's coordinates.
    """

    classes = ("object",)
    name = "bright"

    def __init__(self, gsd_m: float, tile_size_px: int):
        from geomask.detect.base import ModelHints

        self.hints = ModelHints(tile_size_px=tile_size_px, gsd_m=gsd_m)

    def detect(self, batch: list[TileImage]) -> list[list[Instance]]:
        from rasterio.features import rasterize, shapes

        out = []
        for image in batch:
            bright = (image.pixels.mean(axis=0) > 0.5) & image.valid
            found = []
            for geom, _ in shapes(bright.astype(np.uint8), mask=bright, connectivity=4):
                mask = rasterize([geom], out_shape=bright.shape, dtype=np.uint8).astype(bool) & bright
                rows, cols = np.nonzero(mask)
                r0, c0 = rows.min(), cols.min()
                crop = mask[r0 : rows.max() + 1, c0 : cols.max() + 1]
                found.append(Instance(int(image.tile.read.row_off) + int(r0), int(image.tile.read.col_off) + int(c0), crop, 0.9, 0))
            out.append(found)
        return out


@pytest.mark.parametrize("source_gsd", [0.075, 0.3])
def test_input_is_resampled_to_the_models_gsd_and_polygons_come_back_in_its_coordinates(tmp_path: Path, source_gsd: float) -> None:
    """A model trained at 25 cm on a 7.5 cm drone mosaic and on a 30 cm one: same buildings, same place."""
    from rasterio.features import rasterize

    x0, y0, width_m, height_m = 400_000.0, 5_600_000.0, 72.0, 54.0
    rects = [(3.0, 3.0, 12.0, 9.0), (18.0, 6.0, 24.0, 18.0), (30.0, 3.0, 42.0, 7.2), (6.0, 24.0, 15.0, 45.0), (45.0, 27.0, 69.0, 51.0)]
    truth = [shapely.box(x0 + a, y0 - d, x0 + c, y0 - b) for a, b, c, d in rects]  # (left, top, right, bottom) in metres from the corner
    transform = Affine(source_gsd, 0, x0, 0, -source_gsd, y0)
    shape = (round(height_m / source_gsd), round(width_m / source_gsd))
    bright = rasterize([(g, 255) for g in truth], out_shape=shape, transform=transform, dtype=np.uint8)
    image = write_raster(tmp_path / "ortho.tif", np.stack([bright] * 3), transform, crs="EPSG:32633")

    plan, feats, _ = predict_raster(image, config_from_dict({"tiling": {"overlap_px": 16}}), BrightObjectDetector(0.25, 96))

    assert plan.grid.gsd_m == pytest.approx(0.25, rel=1e-3)
    assert (plan.grid.width, plan.grid.height) == (288, 216) and plan.config.tiling.size_px == 96
    assert len(plan.tiles) > 4  # objects cut by tile borders and merged back
    n, ious = match_one_to_one([f.geometry for f in feats], truth)
    assert n == len(truth) == len(feats), (n, len(feats))
    assert min(ious) > 0.9, ious  # one working pixel (0.25 m) of edge error at most
    n_exact = 0
    for f in feats:
        (g,) = [t for t in truth if t.intersects(f.geometry)]
        err = np.abs(np.array(f.geometry.bounds) - np.array(g.bounds))
        rem = np.remainder(np.array(g.bounds), 0.25)  # x0, y0 are multiples of 0.25 m
        on_grid = np.isclose(rem, 0) | np.isclose(rem, 0.25)
        # within one working pixel everywhere; exact where the edge lies on a working-pixel edge
        assert err.max() <= 0.25 + 1e-6 and np.all(err[on_grid] < 1e-6), (g.bounds, f.geometry.bounds)
        n_exact += int(on_grid.sum())
        assert f.area_m2 == pytest.approx(g.area, rel=0.1)
    assert n_exact == 19  # every edge but the one at 7.2 m


def test_prefetch_thread_ends_when_the_consumer_stops_early() -> None:
    """A detect task that fails mid-raster must not leave its reader thread blocked, holding tiles."""
    import itertools
    import threading

    from geomask.inference import prefetch

    def alive() -> int:
        return sum(t.name == "geomask-prefetch" and t.is_alive() for t in threading.enumerate())

    before = alive()
    items = prefetch(itertools.count(), depth=2)  # endless: the producer fills the queue and blocks
    assert next(items) == 0
    items.close()  # what a raising consumer does to the generator
    assert alive() == before
    with pytest.raises(RuntimeError, match="boom"):
        for _ in prefetch(itertools.count(), depth=1):
            raise RuntimeError("boom")
    assert alive() == before


def test_a_model_declares_the_bands_it_takes(tmp_path: Path) -> None:
    """``ModelHints.channels`` is checked against the band selection before any tile is read, for any
    detector, and the one-line error names the setting that fixes it."""
    import dataclasses

    from geomask.errors import DetectorError

    labels = make_scene(200, 200, 5, seed=3)
    image, label_path = write_scene(tmp_path, labels, Affine(0.25, 0, 500_000.0, 0, -0.25, 5_000_000.0), "EPSG:32633")
    detector = truth_detector(str(label_path))
    detector.hints = dataclasses.replace(detector.hints, channels=1)
    base = {"size": 128, "overlap": 16}
    with pytest.raises(DetectorError, match=r"takes 1-band tiles but raster.bands selects \[1, 2, 3\]; set raster.bands to 1 of the"):
        predict_raster(image, truth_config(label_path, **base), detector)
    with pytest.raises(DetectorError, match=r"selects \[2\]; set raster.expand_gray: false"):  # one band, expanded to 3 as gray
        predict_raster(image, truth_config(label_path, **base, **{"raster.bands": [2]}), detector)
    cfg = truth_config(label_path, **base, **{"raster.bands": [2], "raster.expand_gray": False})
    _, feats, _ = predict_raster(image, cfg, detector)
    assert len(feats) == len(np.unique(labels)) - 1 > 0
    detector.hints = dataclasses.replace(detector.hints, channels=3)
    with pytest.raises(DetectorError, match=r"set raster.expand_gray: true"):
        predict_raster(image, cfg, detector)
    detector.hints = dataclasses.replace(detector.hints, channels=4)
    with pytest.raises(DetectorError, match=r"the raster has only 3 band\(s\)"):
        predict_raster(image, truth_config(label_path, **base), detector)


def test_run_serial_opens_the_raster_header_once(
    small_scene: tuple[Path, Path, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import geomask.pipeline as pipeline

    image, label_path, _ = small_scene
    seen: list[str] = []
    real = pipeline.inspect_raster

    def counting(path: str | Path) -> object:
        seen.append(str(path))
        return real(path)

    monkeypatch.setattr(pipeline, "inspect_raster", counting)
    summary = run_serial(image, tmp_path / "o.gpkg", truth_config(label_path, size=256, overlap=32), truth_detector(str(label_path)))
    assert seen == [str(image)]  # checked before the model load, and planning reuses it
    assert summary.n_objects > 0 and summary.model_seconds >= 0.0
