"""The shape stage: regular outlines where they fit the mask, the gate where they do not, exact georeferencing."""

from __future__ import annotations

import math
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import shapely
from affine import Affine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pyproj import CRS
from rasterio import features
from scipy import ndimage
from shapely import affinity
from shapely.geometry import MultiPolygon, Polygon, box

from geomask.errors import ConfigError
from geomask.instances import Instance
from geomask.pipeline import run_serial
from geomask.polygon_metrics import iou
from geomask.shape import SHAPE_METHODS, ShapeRule, dominant_angle, orthogonalize, shape_features, shape_geometries
from geomask.testing import write_scene
from geomask.vectorize import mask_to_pixel_polygons, vectorize_instances
from tests.helpers import truth_config

TRANSFORMS = {
    "north-up": Affine(0.3, 0.0, 500_000.0, 0.0, -0.3, 5_000_000.0),
    "south-up": Affine(0.3, 0.0, 500_000.0, 0.0, 0.3, 4_999_000.0),
    "rotated": Affine.translation(500_000.0, 5_000_000.0) @ Affine.rotation(30.0) @ Affine.scale(0.3, -0.3),
    "non-square": Affine(0.3, 0.0, 500_000.0, 0.0, -0.2, 5_000_000.0),
}
L_SHAPE = Polygon([(10, 10), (60, 10), (60, 30), (30, 30), (30, 70), (10, 70)])


def trace(mask: np.ndarray, row: int = 0, col: int = 0) -> MultiPolygon:
    return mask_to_pixel_polygons(Instance(row, col, mask, 1.0, 0))


def noisy_mask(poly: Polygon, side: int, seed: int, noise_px: float = 1.0) -> np.ndarray:
    """Rasterise ``poly`` (pixel centres) and move its boundary by a smooth random field of ~``noise_px``."""
    clean = features.rasterize([poly], out_shape=(side, side)).astype(bool)
    signed = ndimage.distance_transform_edt(clean) - ndimage.distance_transform_edt(~clean)
    field = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=clean.shape), 3)
    noisy = signed + field * (noise_px / field.std()) > 0.5
    labels, _ = ndimage.label(noisy)
    return labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1


def one(geoms: MultiPolygon, rule: ShapeRule) -> tuple[MultiPolygon, str]:
    (g,), (label,) = shape_geometries([geoms], [rule])
    return g, label


def test_noisy_rotated_rectangle_becomes_four_right_angles_closer_to_the_truth() -> None:
    truth = affinity.rotate(box(40, 60, 130, 110), 27, origin="centroid")
    pix = trace(noisy_mask(truth, 180, seed=0))
    out, label = one(pix, ShapeRule("orthogonal"))
    (poly,) = out.geoms
    assert label == "orthogonal" and len(poly.exterior.coords) == 5
    assert math.degrees(dominant_angle(poly)) == pytest.approx(27.0, abs=2.0)
    assert iou(poly, truth) > iou(pix, truth)


def test_l_shape_and_courtyard_keep_their_corners_and_hole() -> None:
    out, label = one(trace(noisy_mask(L_SHAPE, 80, seed=1)), ShapeRule("orthogonal"))
    assert label == "orthogonal" and len(out.geoms[0].exterior.coords) == 7
    court = box(20, 20, 100, 100).difference(box(45, 45, 75, 75))
    out, label = one(trace(noisy_mask(court, 120, seed=2)), ShapeRule("orthogonal"))
    (poly,) = out.geoms
    assert label == "orthogonal" and len(poly.interiors) == 1 and len(poly.interiors[0].coords) == 5


@pytest.mark.parametrize("poly", [box(3, 4, 40, 21), L_SHAPE, affinity.rotate(box(0, 0, 40, 20), 33)], ids=["box", "L", "rotated"])
def test_orthogonal_is_idempotent_on_a_regular_polygon(poly: Polygon) -> None:
    once = orthogonalize(poly)
    assert once is not None
    assert shapely.equals_exact(shapely.normalize(once), shapely.normalize(poly), tolerance=1e-9)
    twice = orthogonalize(once)
    assert twice is not None and shapely.equals_exact(shapely.normalize(twice), shapely.normalize(once), tolerance=1e-9)


def test_round_tank_becomes_a_circle_and_smooth_has_no_stairs() -> None:
    tank = shapely.Point(50, 50).buffer(25)
    pix = trace(noisy_mask(tank, 100, seed=3))
    out, label = one(pix, ShapeRule("orthogonal"))
    assert label == "circle" and iou(out, tank) > iou(pix, tank)
    out, label = one(pix, ShapeRule("smooth"))
    assert label == "smooth" and out.is_valid and iou(out, tank) > iou(pix, tank)


def test_touching_neighbours_never_come_out_overlapping() -> None:
    """Two squares 1 px apart: their area-keeping circles would overlap; the second is cut by the first."""
    labels = np.zeros((12, 24), np.int32)
    labels[1:11, 1:11], labels[1:11, 12:22] = 1, 2
    geoms = [trace(labels == k) for k in (1, 2)]
    out, tags = shape_geometries(geoms, [ShapeRule("circle")] * 2)
    assert tags == ["circle", "circle"] and out[1].area < out[0].area
    assert shapely.area(shapely.intersection(out[0], out[1])) < 1e-9
    out, tags = shape_geometries(geoms, [ShapeRule("circle", max_area_change=0.01)] * 2)  # the cut circle loses too much
    assert tags == ["circle", "fallback"] and shapely.area(shapely.intersection(out[0], out[1])) < 1e-9


def test_gate_rejects_a_shape_far_from_the_mask() -> None:
    out, label = one(trace(np.ones((4, 40), bool)), ShapeRule("circle"))
    assert label == "fallback" and out.area == 160.0


def test_a_row_of_touching_houses_stays_apart() -> None:
    labels = np.zeros((60, 120), np.int32)
    for k in range(4):  # a rotated row of four houses sharing walls, with noisy walls between them
        house = affinity.rotate(box(10 + 25 * k, 15, 35 + 25 * k, 45), 12, origin=(60, 30))
        labels[noisy_mask(house, 120, seed=10 + k)[:60] & (labels == 0)] = k + 1
    geoms = [trace(labels == k) for k in range(1, 5) if (labels == k).any()]
    out, tags = shape_geometries(geoms, [ShapeRule("orthogonal")] * len(geoms))
    assert all(g.is_valid for g in out)
    for i in range(len(out)):
        for j in range(i + 1, len(out)):
            assert shapely.area(shapely.intersection(out[i], out[j])) < 1e-6, (tags[i], tags[j])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mask=arrays(np.bool_, (10, 12)), method=st.sampled_from(SHAPE_METHODS))
def test_any_mask_gives_valid_outlines_with_its_holes(mask: np.ndarray, method: str) -> None:
    mask = ndimage.binary_closing(mask) | mask  # some holes, some islands
    if not mask.any():
        return
    pix = trace(mask)
    out, label = one(pix, ShapeRule(method))  # type: ignore[arg-type]
    assert out.is_valid and not out.is_empty
    assert label in (method, "fallback", "circle")
    assert len(out.geoms) == len(pix.geoms)
    assert sum(len(p.interiors) for p in out.geoms) == sum(len(p.interiors) for p in pix.geoms)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_regular_corners_stay_exact_through_any_transform(name: str) -> None:
    t = TRANSFORMS[name]
    mask = np.zeros((30, 40), bool)
    mask[2:28, 3:15] = True
    mask[20:28, 3:37] = True  # an L: exact trace, already regular
    feats = vectorize_instances([Instance(100, 200, mask, 0.9, 0)], t, CRS.from_epsg(32633), 0.3)
    (out,) = shape_features(feats, t, CRS.from_epsg(32633), {}, ShapeRule("orthogonal", circles=False))
    assert out.shape == "orthogonal"
    corners = {(203, 102), (215, 102), (215, 120), (237, 120), (237, 128), (203, 128)}
    back = {tuple(xy) for xy in shapely.get_coordinates(shapely.affinity.affine_transform(out.geometry, list(_matrix(~t))))}
    assert len(back) == len(corners)
    for col, row in back:
        assert min(abs(col - c) + abs(row - r) for c, r in corners) < 1e-6
    assert out.area_m2 == pytest.approx(feats[0].area_m2, rel=1e-6)  # geodesic area of the same ring from another start vertex


def _matrix(t: Affine) -> tuple[float, ...]:
    return (t.a, t.b, t.d, t.e, t.c, t.f)


def test_pixel_leaves_features_untouched() -> None:
    t = TRANSFORMS["rotated"]
    feats = vectorize_instances([Instance(0, 0, np.ones((5, 5), bool), 0.9, 0)], t, CRS.from_epsg(32633), 0.3)
    (out,) = shape_features(feats, t, CRS.from_epsg(32633), {}, ShapeRule("pixel"))
    assert out.geometry is feats[0].geometry and out.shape == "pixel"


def _scene(tmp_path: Path) -> tuple[Path, Path]:
    labels = np.zeros((160, 160), np.int32)
    labels[10:40, 10:50] = 1
    labels[60:120, 70:100] = 2
    labels[100:120, 100:140] = 2
    yy, xx = np.mgrid[:160, :160]
    labels[(yy - 130) ** 2 + (xx - 30) ** 2 < 15**2] = 3
    return write_scene(tmp_path, labels, Affine(0.3, 0, 500_000.0, 0, -0.3, 5_000_000.0), "EPSG:32633")


def test_pipeline_writes_the_shape_field_and_applies_class_overrides(tmp_path: Path) -> None:
    image, label_path = _scene(tmp_path)
    out = tmp_path / "out.gpkg"
    cfg = truth_config(
        label_path, size=96, overlap=16, **{"vectorize.shape": {"method": "orthogonal", "classes": {"object": {"diagonals": True}}}}
    )
    run_serial(image, out, cfg)
    frame = gpd.read_file(out)
    assert sorted(frame["shape"]) == ["circle", "orthogonal", "orthogonal"]
    assert sorted(len(shapely.get_coordinates(g)) for g in frame.geometry) == [5, 7, 33]  # a box, an L, a 32-gon


def test_an_override_for_an_unknown_class_is_one_line(tmp_path: Path) -> None:
    image, label_path = _scene(tmp_path)
    cfg = truth_config(label_path, size=96, overlap=16, **{"vectorize.shape.classes": {"bulding": {"method": "circle"}}})
    with pytest.raises(ConfigError, match="'bulding' is not a class of the model"):
        run_serial(image, tmp_path / "out.gpkg", cfg)
