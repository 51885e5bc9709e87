"""Every format in the table: same features, CRS and fields when read back; GDAL's ogrinfo opens each.

And the rules for existing outputs: refused without ``overwrite``, replaced atomically with it, a
GeoPackage's other layers kept, read-only files never replaced.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import yaml
from pyproj import CRS
from shapely.geometry import LineString, Point

import geomask.export
from geomask.config import Config
from geomask.errors import ExportError
from geomask.export import DRIVERS, FIELDS, FORMATS, PARQUET, config_sidecar, driver_for, write_output
from geomask.pipeline import run_serial
from tests.helpers import truth_config

SUFFIXES = sorted(FORMATS)
# Debian's GDAL (gdal-bin, what CI installs) has no Parquet driver; pyarrow reads GeoParquet back below.
OGR_SUFFIXES = [s for s in SUFFIXES if FORMATS[s].driver != PARQUET]
REQUIRE_OGRINFO = os.environ.get("GEOMASK_REQUIRE_OGRINFO") == "1"  # set by .ci/run, which installs gdal-bin


def read_back(path: Path, layer: str | None = None) -> gpd.GeoDataFrame:
    if FORMATS[path.suffix].driver == PARQUET:
        return gpd.read_parquet(path)
    return pyogrio.read_dataframe(path, layer=layer)


def files_of(path: Path) -> dict[str, bytes]:
    """Every file an output consists of (Shapefile: several; the config sidecar included), by name."""
    return {p.name: p.read_bytes() for p in sorted(path.parent.iterdir()) if p.name.startswith(path.stem + ".")}


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


@pytest.fixture(scope="module")
def frame(reference: tuple[Path, Path, gpd.GeoDataFrame]) -> gpd.GeoDataFrame:
    """geomask's output table, for tests of the writer alone (no detection)."""
    return reference[2]


@pytest.fixture
def umask() -> Iterator[int]:
    """Run with a umask other than the usual 022, so that a file made with a fixed mode is told apart."""
    old = os.umask(0o002)
    try:
        yield 0o002
    finally:
        os.umask(old)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_round_trip(tmp_path: Path, reference: tuple[Path, Path, gpd.GeoDataFrame], suffix: str) -> None:
    image, label_path, ref = reference
    out = tmp_path / f"out{suffix}"
    summary = run_serial(image, out, truth_config(label_path, size=128, overlap=16))
    frame = read_back(out)
    assert len(frame) == len(ref) == summary.n_objects > 30
    assert [c for c in frame.columns if c != "geometry"] == list(FIELDS)
    fmt = FORMATS[suffix]
    expected_crs = CRS.from_epsg(4326) if fmt.map_crs else CRS.from_epsg(32633)
    assert CRS.from_user_input(frame.crs).equals(expected_crs)
    # Shapefile has no single/multi distinction: one-part MultiPolygons read back as Polygons.
    allowed = {"MultiPolygon", "Polygon"} if fmt.driver == "ESRI Shapefile" else {"MultiPolygon"}
    assert set(frame.geom_type) <= allowed and frame.geometry.is_valid.all()
    back = frame.to_crs(32633) if fmt.map_crs else frame
    tol = 1e-7 if fmt.map_crs else 1e-9
    assert sorted(round(a, 3) for a in frame.area_m2) == sorted(round(a, 3) for a in ref.area_m2)
    assert np.allclose(sorted(back.geometry.area), sorted(ref.geometry.area), rtol=tol)
    assert set(frame["class"]) == {"object"} and set(frame["source"]) == {image.name}
    assert frame["run_id"].nunique() == 1 and frame["model"].iloc[0].startswith("truth:")
    sidecar = yaml.safe_load(config_sidecar(out).read_text())
    assert sidecar["tiling"] == {"size_px": 128, "overlap_px": 16, "overlap_m": None, "aoi": None, "skip_empty": True, "scan_mask": False}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files left
    if fmt.layer_name:  # and in a GeoPackage QGIS's style table (tests/test_qgis_style.py)
        assert [str(name) for name, _ in pyogrio.list_layers(out)] == ["instances", *(["layer_styles"] if fmt.layered else [])]


@pytest.mark.parametrize("suffix", OGR_SUFFIXES)
def test_gdal_ogrinfo_opens_each(tmp_path: Path, reference: tuple[Path, Path, gpd.GeoDataFrame], suffix: str) -> None:
    ogrinfo = shutil.which("ogrinfo")
    if ogrinfo is None:
        if REQUIRE_OGRINFO:
            pytest.fail("GEOMASK_REQUIRE_OGRINFO=1 but GDAL's ogrinfo is not on PATH (apt-get install gdal-bin)")
        pytest.skip("GDAL's ogrinfo is not installed (apt-get install gdal-bin); .ci/run installs it and requires this test")
    image, label_path, ref = reference
    out = tmp_path / f"out{suffix}"
    run_serial(image, out, truth_config(label_path, size=128, overlap=16))
    proc = subprocess.run([ogrinfo, "-ro", "-so", "-al", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"Feature Count: {len(ref)}" in proc.stdout


def test_geoparquet_metadata_names_the_crs(tmp_path: Path, frame: gpd.GeoDataFrame) -> None:
    import json

    import pyarrow.parquet as pq

    out = write_output(frame, tmp_path / "out.parquet", Config())
    geo = json.loads(pq.read_schema(out).metadata[b"geo"])
    assert geo["primary_column"] == "geometry"
    assert CRS.from_json_dict(geo["columns"]["geometry"]["crs"]).equals(CRS.from_epsg(32633))


@pytest.mark.parametrize("suffix", [s for s in SUFFIXES if FORMATS[s].sidecars])
def test_multi_file_formats_move_into_place_together(tmp_path: Path, frame: gpd.GeoDataFrame, suffix: str) -> None:
    write_output(frame, tmp_path / f"out{suffix}", Config())
    assert {p.suffix for p in tmp_path.glob("out.*")} >= {suffix, *FORMATS[suffix].sidecars} - {".cpg"}


@pytest.mark.parametrize("suffix", [s for s in SUFFIXES if FORMATS[s].field_chars is not None])
def test_field_names_a_format_would_cut_are_refused(tmp_path: Path, frame: gpd.GeoDataFrame, suffix: str) -> None:
    limit = FORMATS[suffix].field_chars
    assert limit is not None and max(len(f) for f in FIELDS) <= limit  # geomask's own schema always fits
    longer = frame.rename(columns={"class": "classification"})
    with pytest.raises(ExportError, match=rf"at most {limit} characters, \['classification'\] would be cut"):
        write_output(longer, tmp_path / f"out{suffix}", Config())
    assert list(tmp_path.iterdir()) == []


def test_unknown_extension_names_the_choices() -> None:
    with pytest.raises(ExportError, match=r"use one of \['.fgb', '.geojson'"):
        driver_for("x.kml")
    assert driver_for("X.GPKG") == DRIVERS[".gpkg"] == FORMATS[".gpkg"].driver


# -- existing outputs -------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_an_existing_output_is_kept_without_overwrite_and_replaced_with_it(
    tmp_path: Path, frame: gpd.GeoDataFrame, suffix: str, umask: int
) -> None:
    out = tmp_path / f"out{suffix}"
    write_output(frame.iloc[:5], out, Config())
    before = files_of(out)
    refusal = r"already holds layer 'instances'; add --overwrite" if FORMATS[suffix].layered else r"exists; add --overwrite to replace it"
    with pytest.raises(ExportError, match=refusal):
        write_output(frame, out, Config())
    assert files_of(out) == before
    write_output(frame, out, Config(), overwrite=True)
    assert len(read_back(out)) == len(frame) and files_of(out) != before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    # The sidecar is created with the umask's mode, not mkstemp's 0600; the output with its writer's
    # (SQLite makes a GeoPackage 0644 less the umask), readable by others either way.
    assert stat.S_IMODE(config_sidecar(out).stat().st_mode) == 0o666 & ~umask
    mode = stat.S_IMODE(out.stat().st_mode)
    assert mode & ~umask == mode and mode & 0o004


@pytest.mark.parametrize("suffix", [".gpkg", ".geojson", ".shp"])
def test_a_read_only_output_is_never_replaced(tmp_path: Path, frame: gpd.GeoDataFrame, suffix: str) -> None:
    out = tmp_path / f"out{suffix}"
    write_output(frame.iloc[:5], out, Config())
    out.chmod(0o444)
    before = files_of(out)
    for overwrite in (False, True):
        with pytest.raises(ExportError, match=rf"output {out} is read-only; make it writable \(chmod u\+w\)"):
            write_output(frame, out, Config(), overwrite=overwrite)
    assert files_of(out) == before and stat.S_IMODE(out.stat().st_mode) == 0o444


def test_a_failed_overwrite_leaves_the_old_output_as_it_was(
    tmp_path: Path, frame: gpd.GeoDataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out.gpkg"
    write_output(frame.iloc[:5], out, Config())
    before = files_of(out)
    real = geomask.export._write

    def write_then_fail(*args: object) -> None:
        real(*args)  # type: ignore[arg-type]
        raise OSError("No space left on device")

    monkeypatch.setattr(geomask.export, "_write", write_then_fail)
    with pytest.raises(ExportError, match=r"cannot write .*out.gpkg with GPKG: No space left on device"):
        write_output(frame, out, Config(), overwrite=True)
    assert files_of(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gpkg", "out.gpkg.config.yaml"]


def _user_layers(path: Path) -> None:
    """Two layers of a user's own, of other geometry types and fields, in the GeoPackage geomask will write into."""
    roads = gpd.GeoDataFrame(
        {"name": ["A1", "B2"], "lanes": [2, 4]},
        geometry=[LineString([(500000, 5e6), (500050, 5e6 - 60)]), LineString([(500010, 5e6), (500090, 5e6 - 5)])],
        crs=32633,
    )
    old = gpd.GeoDataFrame({"height": [3.5]}, geometry=[Point(500020, 5e6 - 20).buffer(5)], crs=32633)
    pyogrio.write_dataframe(roads, path, layer="my_roads")
    pyogrio.write_dataframe(old, path, layer="my_old_buildings")


def _layer_bytes(path: Path, layer: str) -> tuple[object, ...]:
    """A layer's content as stored: field values, feature ids, the geometry's WKB bytes, the CRS."""
    meta, fids, geometry, fields = pyogrio.raw.read(path, layer=layer, return_fids=True)
    return meta["crs"], meta["fields"].tolist(), fids.tolist(), [bytes(g) for g in geometry], [f.tolist() for f in fields]


def test_writing_into_a_geopackage_keeps_the_users_other_layers(tmp_path: Path, frame: gpd.GeoDataFrame) -> None:
    out = tmp_path / "mine.gpkg"
    _user_layers(out)
    theirs = {layer: _layer_bytes(out, layer) for layer in ("my_roads", "my_old_buildings")}
    mode = stat.S_IMODE(out.stat().st_mode)
    write_output(frame.iloc[:5], out, Config())  # no --overwrite needed: the file holds no geomask layer yet
    assert sorted(str(name) for name, _ in pyogrio.list_layers(out)) == ["instances", "layer_styles", "my_old_buildings", "my_roads"]
    assert len(read_back(out, "instances")) == 5
    with pytest.raises(ExportError, match=r"already holds layer 'instances'; add --overwrite to replace that layer"):
        write_output(frame, out, Config())
    write_output(frame, out, Config(), overwrite=True)
    assert len(read_back(out, "instances")) == len(frame)
    assert {layer: _layer_bytes(out, layer) for layer in theirs} == theirs
    assert stat.S_IMODE(out.stat().st_mode) == mode
    # Another layer name is another layer: geomask's first one is kept too.
    renamed = Config.model_validate({"export": {"layer": "run2"}})
    write_output(frame.iloc[:3], out, renamed)
    assert len(read_back(out, "instances")) == len(frame) and len(read_back(out, "run2")) == 3
    assert {layer: _layer_bytes(out, layer) for layer in theirs} == theirs


def test_an_existing_file_that_is_no_geopackage_is_refused(tmp_path: Path, frame: gpd.GeoDataFrame) -> None:
    out = tmp_path / "notes.gpkg"
    out.write_text("my notes, not a GeoPackage\n")
    for overwrite in (False, True):
        with pytest.raises(ExportError, match=r"existing .*notes.gpkg is not a readable GeoPackage .*; remove it or choose another output"):
            write_output(frame, out, Config(), overwrite=overwrite)
    assert out.read_text() == "my notes, not a GeoPackage\n"
