"""Writers with one schema for every format, chosen by file extension, written atomically.

Every format gets the same fields (all names ≤ 10 characters so Shapefile keeps them):
``class_id``, ``class``, ``score``, ``area_m2``, ``perim_m``, ``shape``, ``source``, ``model``, ``run_id``
(``shape`` says what the shape stage did to the outline: ``pixel``, ``orthogonal``, ``fallback``, ...).
A file appears at its final path only once complete (temporary name, then rename), so a crash or a
bad input never leaves a partial output behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import geopandas as gpd
from pyproj import CRS

from geomask.errors import ExportError
from geomask.vectorize import Feature

DRIVERS: dict[str, str] = {
    ".gpkg": "GPKG",
    ".geojson": "GeoJSON",
    ".json": "GeoJSON",
    ".shp": "ESRI Shapefile",
    ".fgb": "FlatGeobuf",
    ".parquet": "Parquet",
    ".geoparquet": "Parquet",
}
FIELDS = ("class_id", "class", "score", "area_m2", "perim_m", "shape", "source", "model", "run_id")
# Shapefile is several files; all of them move into place together.
SHAPEFILE_SIDECARS = (".shp", ".shx", ".dbf", ".prj", ".cpg")


def driver_for(path: str | Path) -> str:
    """Return the OGR driver (or ``Parquet``) for an output path, or raise naming the choices."""
    suffix = Path(path).suffix.lower()
    if suffix not in DRIVERS:
        raise ExportError(f"cannot infer an output format from {suffix or 'no extension'!r} in {path}; use one of {sorted(DRIVERS)}")
    return DRIVERS[suffix]


def check_writable(path: str | Path) -> None:
    """Fail before any work is done if ``path`` cannot be written."""
    p = Path(path)
    driver_for(p)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"output folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"output folder {parent} is not writable; choose another output path")
    if p.is_dir():
        raise ExportError(f"output {p} is a folder; give a file name such as {p / 'out.gpkg'}")


def to_frame(
    feats: Sequence[Feature],
    classes: Sequence[str],
    crs: CRS,
    source: str,
    model: str,
    run_id: str,
) -> gpd.GeoDataFrame:
    """Build the output table in the raster's CRS."""

    def name(class_id: int) -> str:
        return classes[class_id] if 0 <= class_id < len(classes) else str(class_id)

    data = {
        "class_id": [f.class_id for f in feats],
        "class": [name(f.class_id) for f in feats],
        "score": [round(f.score, 4) for f in feats],
        "area_m2": [round(f.area_m2, 3) for f in feats],
        "perim_m": [round(f.perim_m, 3) for f in feats],
        "shape": [f.shape for f in feats],
        "source": [source] * len(feats),
        "model": [model] * len(feats),
        "run_id": [run_id] * len(feats),
    }
    frame = gpd.GeoDataFrame(data, geometry=[f.geometry for f in feats], crs=crs)
    return frame.astype({"class_id": "int32", "score": "float64", "area_m2": "float64", "perim_m": "float64"})


def _write(frame: gpd.GeoDataFrame, path: Path, driver: str, layer: str) -> None:
    if driver == "Parquet":
        frame.to_parquet(path, index=False)
        return
    kwargs: dict[str, object] = {"driver": driver, "engine": "pyogrio", "geometry_type": "MultiPolygon", "index": False}
    if driver in ("GPKG", "FlatGeobuf"):
        kwargs["layer"] = layer
    frame.to_file(path, **kwargs)


def write_frame(frame: gpd.GeoDataFrame, path: str | Path, layer: str = "instances", geojson_crs: str | None = "EPSG:4326") -> Path:
    """Write ``frame`` atomically to ``path`` in the format its extension names.

    GeoJSON is reprojected to ``geojson_crs`` (EPSG:4326 by RFC 7946; ``None`` keeps the CRS).
    """
    out = Path(path)
    driver = driver_for(out)
    check_writable(out)
    if driver == "GeoJSON" and geojson_crs is not None:
        frame = frame.to_crs(geojson_crs)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        _write(frame, tmpdir / out.name, driver, layer)
        for produced in sorted(tmpdir.iterdir()):
            os.replace(produced, out.with_name(produced.name))
    except ExportError:
        raise
    except Exception as err:  # noqa: BLE001 - any writer failure becomes one line for the user
        raise ExportError(f"cannot write {out} with {driver}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return out


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a small text file atomically (used for the resolved config beside each output)."""
    out = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
