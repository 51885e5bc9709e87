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

from geomask.pipeline import predict_raster, run_serial
from geomask.testing import instances_from_labels, make_scene, truth_detector, write_scene
from geomask.vectorize import Feature, vectorize_instances
from tests.helpers import truth_config


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
