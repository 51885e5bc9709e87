"""Every format: same features, CRS and fields when read back; GDAL's ogrinfo opens each."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import yaml
from pyproj import CRS

from geomask.errors import ExportError
from geomask.export import DRIVERS, FIELDS, driver_for
from geomask.pipeline import config_sidecar, run_serial
from tests.helpers import truth_config

FORMATS = [".gpkg", ".geojson", ".shp", ".fgb", ".parquet"]


def read_back(path: Path) -> gpd.GeoDataFrame:
    if path.suffix == ".parquet":
        return gpd.read_parquet(path)
    return pyogrio.read_dataframe(path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, gpd.GeoDataFrame]:
    from geomask.testing import make_scene, write_scene
    from tests.helpers import UTM, UTM_TRANSFORM

    d = tmp_path_factory.mktemp("export")
    labels = make_scene(500, 600, 40, seed=5, max_size_px=300, n_big=1)
    image, label_path = write_scene(d, labels, UTM_TRANSFORM, UTM)
    out = d / "ref.gpkg"
    run_serial(image, out, truth_config(label_path, size=128, overlap=16))
    return image, label_path, pyogrio.read_dataframe(out)


@pytest.mark.parametrize("suffix", FORMATS)
def test_round_trip(tmp_path: Path, reference: tuple[Path, Path, gpd.GeoDataFrame], suffix: str) -> None:
    image, label_path, ref = reference
    out = tmp_path / f"out{suffix}"
    summary = run_serial(image, out, truth_config(label_path, size=128, overlap=16))
    frame = read_back(out)
    assert len(frame) == len(ref) == summary.n_features > 30
    assert [c for c in frame.columns if c != "geometry"] == list(FIELDS)
    expected_crs = CRS.from_epsg(4326) if suffix == ".geojson" else CRS.from_epsg(32633)
    assert CRS.from_user_input(frame.crs).equals(expected_crs)
    # Shapefile has no single/multi distinction: one-part MultiPolygons read back as Polygons.
    allowed = {"MultiPolygon", "Polygon"} if suffix == ".shp" else {"MultiPolygon"}
    assert set(frame.geom_type) <= allowed and frame.geometry.is_valid.all()
    back = frame.to_crs(32633) if suffix == ".geojson" else frame
    tol = 1e-7 if suffix == ".geojson" else 1e-9
    assert sorted(round(a, 3) for a in frame.area_m2) == sorted(round(a, 3) for a in ref.area_m2)
    assert np.allclose(sorted(back.geometry.area), sorted(ref.geometry.area), rtol=tol)
    assert set(frame["class"]) == {"object"} and set(frame["source"]) == {image.name}
    assert frame["run_id"].nunique() == 1 and frame["model"].iloc[0].startswith("truth:")
    sidecar = yaml.safe_load(config_sidecar(out).read_text())
    assert sidecar["tiling"] == {"size_px": 128, "overlap_px": 16, "overlap_m": None}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files left


# GeoParquet is left out: Debian's GDAL (gdal-bin, what CI installs) is built without the Parquet driver;
# test_round_trip and test_geoparquet_metadata_names_the_crs read it back with pyogrio/pyarrow.
@pytest.mark.parametrize("suffix", [s for s in FORMATS if s != ".parquet"])
def test_gdal_ogrinfo_opens_each(tmp_path: Path, reference: tuple[Path, Path, gpd.GeoDataFrame], suffix: str) -> None:
    ogrinfo = shutil.which("ogrinfo")
    assert ogrinfo, "GDAL's ogrinfo is required (apt-get install gdal-bin; .ci/run installs it)"
    image, label_path, ref = reference
    out = tmp_path / f"out{suffix}"
    run_serial(image, out, truth_config(label_path, size=128, overlap=16))
    proc = subprocess.run([ogrinfo, "-ro", "-so", "-al", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"Feature Count: {len(ref)}" in proc.stdout


def test_geoparquet_metadata_names_the_crs(tmp_path: Path, reference: tuple[Path, Path, gpd.GeoDataFrame]) -> None:
    import json

    import pyarrow.parquet as pq

    image, label_path, _ = reference
    out = tmp_path / "out.parquet"
    run_serial(image, out, truth_config(label_path, size=128, overlap=16))
    geo = json.loads(pq.read_schema(out).metadata[b"geo"])
    assert geo["primary_column"] == "geometry"
    assert CRS.from_json_dict(geo["columns"]["geometry"]["crs"]).equals(CRS.from_epsg(32633))


def test_shapefile_sidecars_move_into_place_together(tmp_path: Path, reference: tuple[Path, Path, gpd.GeoDataFrame]) -> None:
    image, label_path, _ = reference
    run_serial(image, tmp_path / "out.shp", truth_config(label_path, size=128, overlap=16))
    assert {p.suffix for p in tmp_path.glob("out.*")} >= {".shp", ".shx", ".dbf", ".prj"}


def test_unknown_extension_names_the_choices() -> None:
    with pytest.raises(ExportError, match=r"use one of \['.fgb', '.geojson'"):
        driver_for("x.kml")
    assert driver_for("X.GPKG") == DRIVERS[".gpkg"]
