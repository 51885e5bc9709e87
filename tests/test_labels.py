"""Vector labels: any OGR format and CRS, reprojected, repaired, de-duplicated, rasterised per window."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import shapely
from affine import Affine
from pyproj import CRS

from geomask.errors import LabelError
from geomask.labels import dedupe, expand_paths, inscribed_ellipse, label_raster, rasterize_instances, read_labels, window_bounds

UTM = CRS.from_epsg(32633)
T = Affine(0.5, 0.0, 400_000.0, 0.0, -0.5, 6_000_000.0)  # 0.5 m pixels


def px_box(row: int, col: int, h: int, w: int) -> shapely.Polygon:
    """A polygon covering pixels rows ``row..row+h``, cols ``col..col+w`` of grid ``T`` (map coordinates)."""
    (x0, y0), (x1, y1) = T @ (col, row), T @ (col + w, row + h)
    return shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def write(frame: gpd.GeoDataFrame, path: Path, driver: str | None = None) -> str:
    frame.to_file(path, driver=driver, engine="pyogrio")
    return str(path)


def test_reads_any_format_and_crs_and_dedupes(tmp_path: Path) -> None:
    boxes = [px_box(10, 10, 20, 30), px_box(50, 5, 8, 8)]
    utm = gpd.GeoDataFrame({"kind": ["house", "shed"]}, geometry=boxes, crs=UTM)
    geo = write(utm.to_crs(4326), tmp_path / "a.geojson")
    gpkg = write(utm.to_crs(3857), tmp_path / "b.gpkg")  # the same objects again, in another CRS and format
    labels = read_labels([geo, gpkg], UTM)
    assert len(labels) == 2 and labels.crs == UTM
    for got, want in zip(sorted(labels.geoms, key=lambda g: g.bounds), sorted(boxes, key=lambda g: g.bounds)):
        assert shapely.equals_exact(shapely.normalize(got), shapely.normalize(want), tolerance=1e-3)
    masks, ids = rasterize_instances(labels, T, 64, 64)
    assert ids == [0, 0]
    big = next(m for m in masks if m.sum() == 600)
    assert big[10:30, 10:40].all()  # exact pixels: the label's edges fall on pixel edges


def test_class_field(tmp_path: Path) -> None:
    frame = gpd.GeoDataFrame({"kind": ["tree", "house"]}, geometry=[px_box(0, 0, 10, 10), px_box(20, 20, 10, 10)], crs=UTM)
    path = write(frame, tmp_path / "c.fgb", "FlatGeobuf")
    labels = read_labels([path], UTM, class_field="kind")
    assert labels.classes == ("house", "tree")
    assert sorted(labels.class_ids.tolist()) == [0, 1]
    with pytest.raises(LabelError, match="not among classes"):
        read_labels([path], UTM, class_field="kind", classes=["house"])
    with pytest.raises(LabelError, match="no field 'type'"):
        read_labels([path], UTM, class_field="type")


def test_repairs_invalid_polygons_and_drops_lines(tmp_path: Path) -> None:
    bowtie = shapely.Polygon([(400_000, 5_999_990), (400_010, 5_999_980), (400_010, 5_999_990), (400_000, 5_999_980)])
    line = shapely.LineString([(400_000, 5_999_990), (400_005, 5_999_985)])
    path = write(gpd.GeoDataFrame(geometry=[bowtie, line], crs=UTM), tmp_path / "bad.gpkg")
    labels = read_labels([path], UTM)
    assert len(labels) == 1 and labels.geoms[0].is_valid and labels.geoms[0].area == pytest.approx(50.0)


def test_window_edges_overlaps_and_fragments() -> None:
    from geomask.labels import LabelSet

    geoms = np.asarray([px_box(0, 0, 10, 10), px_box(5, 5, 10, 10), px_box(30, 62, 10, 10)], dtype=object)
    labels = LabelSet(geoms, np.zeros(3, dtype=np.int64), ("b",), UTM)
    masks, _ = rasterize_instances(labels, T, 64, 64, min_area_px=4)
    assert len(masks) == 3  # the third is cut by the window edge: its 2-px-wide part is kept (20 px)
    assert not (masks[0] & masks[1]).any()  # overlaps: the later label wins shared pixels
    masks, _ = rasterize_instances(labels, T, 64, 64, min_area_px=25)
    assert len(masks) == 2  # the fragment is now too small
    ids = label_raster(labels, T, 64, 64)
    assert set(np.unique(ids).tolist()) == {0, 1, 2, 3}
    assert window_bounds(T, 64, 64) == (400_000.0, 6_000_000.0 - 32, 400_032.0, 6_000_000.0)


def test_boxes_as_ellipses(tmp_path: Path) -> None:
    box = px_box(0, 0, 40, 20)
    ellipse = inscribed_ellipse(box)
    assert ellipse.area == pytest.approx(box.area * np.pi / 4, rel=0.01)
    assert shapely.equals_exact(shapely.box(*ellipse.bounds), box, tolerance=1e-9)
    path = write(gpd.GeoDataFrame(geometry=[box], crs=UTM), tmp_path / "boxes.geojson")
    (geom,) = read_labels([path], UTM, boxes_as_ellipses=True).geoms
    assert geom.area == pytest.approx(ellipse.area, rel=1e-6)


def test_dedupe_keeps_distinct_neighbours() -> None:
    a, b = px_box(0, 0, 10, 10), px_box(0, 10, 10, 10)  # touching, distinct
    c = px_box(0, 0, 10, 10).buffer(0.01)  # a near copy of a
    assert dedupe(np.asarray([a, b, c], dtype=object), 0.9).tolist() == [0, 1]


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(LabelError, match="matches no file"):
        expand_paths([str(tmp_path / "*.geojson")])
    junk = tmp_path / "junk.geojson"
    junk.write_text("{not json")
    with pytest.raises(LabelError, match="cannot read labels"):
        read_labels([str(junk)], UTM)
    shp = tmp_path / "nocrs.shp"
    with pytest.warns(UserWarning, match="'crs' was not provided"):  # a file without a CRS, on purpose
        gpd.GeoDataFrame(geometry=[px_box(0, 0, 4, 4)]).to_file(shp, engine="pyogrio")
    with pytest.raises(LabelError, match="have no CRS"):
        read_labels([str(shp)], UTM)


def test_labels_module_is_torch_free() -> None:
    code = "import sys, geomask.labels; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
