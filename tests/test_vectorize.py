"""Masks → polygons on pixel edges, mapped exactly through the affine transform."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from affine import Affine
from pyproj import CRS

from geomask.instances import Instance
from geomask.vectorize import mask_to_pixel_polygons, pixel_to_map, vectorize_instances

TRANSFORMS = {
    "north-up": Affine(0.25, 0.0, 500_000.0, 0.0, -0.25, 5_000_000.0),
    "south-up": Affine(0.25, 0.0, 500_000.0, 0.0, 0.25, 4_999_000.0),
    "non-square": Affine(0.3, 0.0, 500_000.0, 0.0, -0.2, 5_000_000.0),
    "rotated": Affine.translation(500_000.0, 5_000_000.0) @ Affine.rotation(30.0) @ Affine.scale(0.25, -0.25),
}


def test_polygon_is_traced_on_pixel_edges() -> None:
    inst = Instance(10, 20, np.ones((3, 4), bool), 1.0, 0)
    (poly,) = mask_to_pixel_polygons(inst).geoms
    assert poly.bounds == (20.0, 10.0, 24.0, 13.0)
    assert poly.area == 12.0


def test_holes_are_kept() -> None:
    mask = np.ones((10, 10), bool)
    mask[3:7, 3:7] = False
    (poly,) = mask_to_pixel_polygons(Instance(0, 0, mask, 1.0, 0)).geoms
    assert len(poly.interiors) == 1 and poly.area == 84.0


def test_disconnected_parts_become_one_valid_multipolygon() -> None:
    mask = np.zeros((5, 12), bool)
    mask[:, :3] = True
    mask[:, 8:] = True
    geom = mask_to_pixel_polygons(Instance(0, 0, mask, 1.0, 0))
    assert geom.geom_type == "MultiPolygon" and len(geom.geoms) == 2 and geom.is_valid


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_corners_map_exactly_through_the_transform(name: str) -> None:
    t = TRANSFORMS[name]
    inst = Instance(7, 11, np.ones((5, 9), bool), 1.0, 0)
    geom = pixel_to_map(mask_to_pixel_polygons(inst), t)
    expected = {t @ (c, r) for c in (11, 20) for r in (7, 12)}
    got = {tuple(xy) for xy in shapely.get_coordinates(geom).tolist()}
    inverse = ~t
    for x, y in got:
        col, row = inverse @ (x, y)
        assert min(abs(col - c) + abs(row - r) for c in (11, 20) for r in (7, 12)) < 1e-6
    assert len(got) == len(expected) == 4
    assert geom.is_valid and all(shapely.is_ccw(p.exterior) for p in geom.geoms)  # OGC ring order after any reflection


def test_area_is_geodesic_and_min_area_filters() -> None:
    t = TRANSFORMS["north-up"]
    small = Instance(0, 0, np.ones((2, 2), bool), 1.0, 0)  # 0.25 m²
    big = Instance(10, 10, np.ones((40, 40), bool), 1.0, 0)  # 100 m²
    feats = vectorize_instances([small, big], t, CRS.from_epsg(32633), 0.25, min_area_m2=1.0)
    assert len(feats) == 1
    # UTM is conformal with scale ~0.9996 near the central meridian: true area within 0.1 %.
    assert feats[0].area_m2 == pytest.approx(100.0, rel=1e-3)
    assert feats[0].perim_m == pytest.approx(40.0, rel=1e-3)


def test_web_mercator_area_is_ground_area_not_nominal() -> None:
    lat = 60.0
    import math

    y0 = 6378137.0 * math.log(math.tan(math.pi / 4 + math.radians(lat) / 2))
    t = Affine(1.0, 0.0, 0.0, 0.0, -1.0, y0)
    (feat,) = vectorize_instances([Instance(0, 0, np.ones((100, 100), bool), 1.0, 0)], t, CRS.from_epsg(3857), 0.5)
    assert feat.area_m2 == pytest.approx(10_000 * math.cos(math.radians(lat)) ** 2, rel=5e-3)


def test_simplification_is_in_metres() -> None:
    mask = np.zeros((40, 40), bool)
    yy, xx = np.mgrid[:40, :40]
    mask[(yy - 20) ** 2 + (xx - 20) ** 2 < 18**2] = True
    inst = Instance(0, 0, mask, 1.0, 0)
    t = TRANSFORMS["north-up"]
    exact = vectorize_instances([inst], t, CRS.from_epsg(32633), 0.25)[0]
    simple = vectorize_instances([inst], t, CRS.from_epsg(32633), 0.25, simplify_tolerance_m=0.5)[0]
    assert len(shapely.get_coordinates(simple.geometry)) < len(shapely.get_coordinates(exact.geometry)) / 2
    assert simple.geometry.is_valid
    assert simple.area_m2 == pytest.approx(exact.area_m2, rel=0.05)
