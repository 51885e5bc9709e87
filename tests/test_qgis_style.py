"""Every GeoPackage geomask writes opens styled in QGIS; a Shapefile gets a ``.qml``.

Read back as QGIS reads it: the ``layer_styles`` table through OGR (pyogrio, ogrinfo) and SQLite, the
row QGIS's ``loadStyle`` selects (``f_table_schema=''``, the layer's name and geometry column,
``useAsDefault``), and the QML parsed as XML.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import xml.etree.ElementTree as ET
from contextlib import closing
from pathlib import Path

import geopandas as gpd
import pyogrio
import pytest
from shapely.geometry import LineString, box

from geomask.config import Config
from geomask.export import write_output
from geomask.palette import class_colour, rgb
from geomask.qgis_style import QGIS_COLUMNS, STYLE_NAME
from tests.test_export import REQUIRE_OGRINFO


def _frame(n: int = 6) -> gpd.GeoDataFrame:
    classes = ["building", "tree"]
    return gpd.GeoDataFrame(
        {
            "class_id": [i % 2 for i in range(n)],
            "class": [classes[i % 2] for i in range(n)],
            "score": [0.5 + i / 20 for i in range(n)],
        },
        geometry=[box(500000 + 10 * i, 5e6, 500005 + 10 * i, 5e6 + 5) for i in range(n)],
        crs=32633,
    )


def _styles(path: Path) -> list[dict[str, object]]:
    with closing(sqlite3.connect(path)) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM layer_styles ORDER BY id")]


def _default_qml(path: Path, layer: str) -> ET.Element:
    """The style QGIS's loadStyle picks for ``layer``: its default row, else the newest."""
    geom = pyogrio.read_info(path, layer=layer)["geometry_name"]
    with closing(sqlite3.connect(path)) as db:
        rows = db.execute(
            "SELECT styleQML FROM layer_styles WHERE f_table_schema='' AND f_table_name=? AND f_geometry_column=? "
            "ORDER BY CASE WHEN useAsDefault THEN 1 ELSE 2 END, update_time DESC LIMIT 1",
            (layer, geom),
        ).fetchall()
    assert len(rows) == 1
    return ET.fromstring(rows[0][0].split("\n", 1)[1])  # after the DOCTYPE line


def _check_qml(root: ET.Element, classes: dict[str, int]) -> None:
    renderer = root.find("renderer-v2")
    assert renderer is not None and renderer.get("type") == "categorizedSymbol" and renderer.get("attr") == "class"
    cats = {c.get("value"): c.get("symbol") for c in renderer.iter("category")}
    assert set(cats) == set(classes)
    symbols = {s.get("name"): s for s in renderer.find("symbols") or []}
    for name, class_id in classes.items():
        opts = {o.get("name"): o.get("value") for o in symbols[cats[name]].iter("Option") if o.get("name")}
        assert opts["style"] == "no"  # outline only
        assert opts["outline_color"] == ",".join(map(str, rgb(class_colour(class_id)))) + ",255"
    text = root.find("labeling/settings/text-style")
    assert text is not None and '"score"' in (text.get("fieldName") or "") and root.get("labelsEnabled") == "1"


def test_a_geopackage_carries_a_default_qgis_style(tmp_path: Path) -> None:
    out = tmp_path / "out.gpkg"
    write_output(_frame(), out, Config())
    rows = _styles(out)
    assert len(rows) == 1
    row = rows[0]
    assert set(QGIS_COLUMNS) | {"id"} == set(row)
    assert (row["f_table_catalog"], row["f_table_schema"], row["f_table_name"]) == ("", "", "instances")
    assert row["f_geometry_column"] == pyogrio.read_info(out, layer="instances")["geometry_name"] == "geom"
    assert row["useAsDefault"] == 1 and row["styleName"] == STYLE_NAME
    _check_qml(_default_qml(out, "instances"), {"building": 0, "tree": 1})
    with closing(sqlite3.connect(out)) as db:  # registered as OGR and QGIS register it: a non-spatial table
        assert db.execute("SELECT data_type FROM gpkg_contents WHERE table_name='layer_styles'").fetchall() == [("attributes",)]
    info = pyogrio.read_info(out, layer="layer_styles")
    assert info["fid_column"] == "id" and info["geometry_type"] is None
    assert len(gpd.read_file(out, layer="instances", engine="pyogrio")) == 6


def test_ogrinfo_reads_the_style_table(tmp_path: Path) -> None:
    ogrinfo = shutil.which("ogrinfo")
    if ogrinfo is None:
        if REQUIRE_OGRINFO:
            pytest.fail("GEOMASK_REQUIRE_OGRINFO=1 but GDAL's ogrinfo is not on PATH (apt-get install gdal-bin)")
        pytest.skip("GDAL's ogrinfo is not installed (apt-get install gdal-bin)")
    out = tmp_path / "out.gpkg"
    write_output(_frame(), out, Config())
    proc = subprocess.run([ogrinfo, "-ro", "-so", str(out), "layer_styles"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Geometry: None" in proc.stdout and "Feature Count: 1" in proc.stdout and "FID Column = id" in proc.stdout
    assert "useAsDefault: Integer(Boolean)" in proc.stdout and "update_time: DateTime" in proc.stdout
    proc = subprocess.run([ogrinfo, "-ro", "-q", str(out), "-sql", "SELECT styleQML FROM layer_styles"], capture_output=True, text=True)
    assert proc.returncode == 0 and "categorizedSymbol" in proc.stdout


def test_other_layers_styles_are_kept_and_ours_replaced(tmp_path: Path) -> None:
    out = tmp_path / "mine.gpkg"
    roads = gpd.GeoDataFrame({"name": ["A1"]}, geometry=[LineString([(500000, 5e6), (500050, 5e6 - 60)])], crs=32633)
    pyogrio.write_dataframe(roads, out, layer="my_roads")
    write_output(_frame(2), out, Config())
    with closing(sqlite3.connect(out)) as db, db:  # as QGIS saves a user's styles: one of the roads, one of ours
        db.execute(
            "INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, f_geometry_column, styleName, styleQML, "
            "useAsDefault, update_time) VALUES ('', '', 'my_roads', 'geom', 'roads', '<qgis/>', 1, '2024-01-01T00:00:00.000Z'), "
            "('', '', 'instances', 'geom', 'mine', '<qgis>mine</qgis>', 1, '2024-01-01T00:00:00.000Z')"
        )
    before = {r["styleName"]: r for r in _styles(out)}
    write_output(_frame(4), out, Config(), overwrite=True)
    after = {r["styleName"]: r for r in _styles(out)}
    assert after["roads"] == before["roads"]  # another layer's style: untouched
    assert after["mine"]["useAsDefault"] == 0 and after["mine"]["styleQML"] == "<qgis>mine</qgis>"  # kept, no longer the default
    assert sorted(after) == ["geomask", "mine", "roads"] and after["geomask"]["useAsDefault"] == 1
    _check_qml(_default_qml(out, "instances"), {"building": 0, "tree": 1})
    with closing(sqlite3.connect(out)) as db:  # OGR's feature count stays right (its triggers fired)
        assert db.execute("SELECT feature_count FROM gpkg_ogr_contents WHERE table_name='layer_styles'").fetchone() == (3,)
    assert len(gpd.read_file(out, layer="instances", engine="pyogrio")) == 4


def test_a_shapefile_gets_a_qml_beside_it(tmp_path: Path) -> None:
    out = tmp_path / "out.shp"
    write_output(_frame(), out, Config())
    qml = out.with_suffix(".qml").read_text()
    _check_qml(ET.fromstring(qml.split("\n", 1)[1]), {"building": 0, "tree": 1})
