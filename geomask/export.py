"""The one output writer: one schema for every format, the format chosen by extension, written atomically.

Every format gets the same fields (all names ≤ 10 characters so Shapefile keeps them):
``class_id``, ``class``, ``score``, ``area_m2``, ``perim_m``, ``shape``, ``source``, ``model``, ``run_id``
(``shape`` says what the shape stage did to the outline: ``pixel``, ``orthogonal``, ``fallback``, ...).
What differs between formats is in one table, :data:`FORMATS`, instead of string ``if``\\ s.

A file appears at its final path only once complete (written beside it under a temporary name, then
renamed), so a crash or a bad input never leaves a partial output behind and never damages the old
one. An existing output is replaced only when the caller says so (``overwrite``, the CLI's
``--overwrite``, as ``rio`` and ``ogr2ogr`` do). A layered format (GeoPackage) is a container users
share between layers: there geomask writes or replaces only its own layer (``export.layer``) and keeps
the others. Read-only outputs are never replaced.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import pyogrio
from pyproj import CRS

from geomask.atomic import replacing, write_text_atomic
from geomask.config import Config, dump_config
from geomask.errors import ExportError, first_line
from geomask.qgis_style import classes_of, style_qml, write_gpkg_style, write_qml
from geomask.vectorize import Feature

FIELDS = ("class_id", "class", "score", "area_m2", "perim_m", "shape", "partial", "source", "model", "run_id")
PARQUET = "Parquet"  # written by pyarrow (geopandas), not by an OGR driver: Debian's GDAL has none


@dataclass(frozen=True)
class Format:
    """How one output format is written: its driver and the quirks that set it apart.

    Attributes:
        driver: OGR driver name, or :data:`PARQUET`.
        layered: A container of named layers (GeoPackage): geomask writes only ``export.layer`` and
            keeps the file's other layers; "overwrite" means that layer.
        layer_name: The format stores a layer name (GeoPackage, FlatGeobuf), so ``export.layer`` is passed.
        sidecars: Other files the format writes beside the main one (Shapefile), moved into place with it.
        field_chars: Longest field name the format keeps (Shapefile: 10); longer names are refused
            instead of being cut silently.
        map_crs: Written in ``export.geojson_crs`` rather than the raster's CRS (GeoJSON, RFC 7946).
    """

    driver: str
    layered: bool = False
    layer_name: bool = False
    sidecars: tuple[str, ...] = ()
    field_chars: int | None = None
    map_crs: bool = False


GEOPACKAGE = Format("GPKG", layered=True, layer_name=True)
GEOJSON = Format("GeoJSON", map_crs=True)
# The .qml is geomask's QGIS style (geomask.qgis_style), loaded by QGIS with the .shp.
SHAPEFILE = Format("ESRI Shapefile", sidecars=(".shx", ".dbf", ".prj", ".cpg", ".qml"), field_chars=10)
FLATGEOBUF = Format("FlatGeobuf", layer_name=True)
GEOPARQUET = Format(PARQUET)

FORMATS: dict[str, Format] = {
    ".gpkg": GEOPACKAGE,
    ".geojson": GEOJSON,
    ".json": GEOJSON,
    ".shp": SHAPEFILE,
    ".fgb": FLATGEOBUF,
    ".parquet": GEOPARQUET,
    ".geoparquet": GEOPARQUET,
}
DRIVERS: dict[str, str] = {suffix: fmt.driver for suffix, fmt in FORMATS.items()}


def format_for(path: str | Path) -> Format:
    """Return the :class:`Format` for an output path, or raise naming the choices."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ExportError(f"cannot infer an output format from {suffix or 'no extension'!r} in {path}; use one of {sorted(FORMATS)}")
    return FORMATS[suffix]


def driver_for(path: str | Path) -> str:
    """Return the OGR driver (or ``Parquet``) for an output path, or raise naming the choices."""
    return format_for(path).driver


def config_sidecar(output: str | Path) -> Path:
    """Return where the resolved config of an output is written (beside it: ``<output>.config.yaml``)."""
    out = Path(output)
    return out.with_name(out.name + ".config.yaml")


def _files_of(path: Path, fmt: Format) -> list[Path]:
    """Every file writing ``path`` creates or replaces, the config sidecar included."""
    return [path, *(path.with_suffix(s) for s in fmt.sidecars), config_sidecar(path)]


def _read_only(path: Path) -> bool:
    # The mode bits as well as access(2): root may write a 0444 file, but its owner marked it read-only.
    return not os.access(path, os.W_OK) or not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)


def _can_create_in(folder: Path) -> bool:
    # Creating a file is the true test: access(2) can say yes where creating fails (pseudo and some network file systems).
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _layers(path: Path) -> list[str]:
    try:
        return [str(name) for name, _ in pyogrio.list_layers(path)]
    except Exception as err:  # noqa: BLE001 - any reader failure: not a container we may write into
        raise ExportError(f"existing {path} is not a readable GeoPackage ({first_line(err)}); remove it or choose another output") from None


def check_file_writable(path: str | Path, overwrite: bool = False, also: Sequence[Path] = ()) -> None:
    """Fail before any work is done if ``path`` (any file a command writes) cannot or may not be written.

    Args:
        path: The file.
        overwrite: Replace it when it exists (``--overwrite``).
        also: Files written beside it (sidecars), refused as well when read-only.

    Raises:
        ExportError: Missing or unwritable folder, a folder given as the file, a read-only file, or an
            existing file without ``overwrite``.
    """
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"output folder {parent} does not exist; create it first")
    if not _can_create_in(parent):
        raise ExportError(f"output folder {parent} is not writable; choose another output path")
    if p.is_dir():
        raise ExportError(f"output {p} is a folder; give a file name such as {p / ('out' + (p.suffix or '.gpkg'))}")
    for existing in (f for f in (p, *also) if f.exists()):
        if _read_only(existing):
            raise ExportError(f"output {existing} is read-only; make it writable (chmod u+w) or choose another output")
    if p.exists() and not overwrite:
        raise ExportError(f"output {p} exists; add --overwrite to replace it, or choose another output")


def check_writable(path: str | Path, layer: str = "instances", overwrite: bool = False) -> None:
    """Fail before any work is done if writing the output ``path`` would fail or replace something unasked.

    Args:
        path: The output file; its extension names the format.
        layer: geomask's layer in a layered format (``export.layer``).
        overwrite: Replace an existing output; in a layered format, geomask's layer in it (a file that
            holds other layers but not that one is written into without ``overwrite``).

    Raises:
        ExportError: Unknown extension, or as :func:`check_file_writable`; an existing GeoPackage that
            cannot be read, or holds ``layer``, without ``overwrite``.
    """
    p = Path(path)
    fmt = format_for(p)
    into_container = fmt.layered and p.is_file() and p.stat().st_size > 0
    sidecars = _files_of(p, fmt)[1:]
    check_file_writable(p, overwrite or into_container, sidecars)
    # The layers are read with overwrite too, so a damaged file fails now rather than after the run.
    if into_container and layer in _layers(p) and not overwrite:
        raise ExportError(
            f"{p} already holds layer {layer!r}; add --overwrite to replace that layer (the file's other layers are kept), "
            "or set export.layer to another name"
        )


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
        "partial": [f.partial for f in feats],
        "source": [source] * len(feats),
        "model": [model] * len(feats),
        "run_id": [run_id] * len(feats),
    }
    frame = gpd.GeoDataFrame(data, geometry=[f.geometry for f in feats], crs=crs)
    return frame.astype({"class_id": "int32", "score": "float64", "area_m2": "float64", "perim_m": "float64"})


def _write(frame: gpd.GeoDataFrame, path: Path, fmt: Format, layer: str) -> None:
    if fmt.driver == PARQUET:
        frame.to_parquet(path, index=False)
        return
    kwargs: dict[str, object] = {"driver": fmt.driver, "engine": "pyogrio", "geometry_type": "MultiPolygon", "index": False}
    if fmt.layer_name:
        kwargs["layer"] = layer  # into an existing GeoPackage: replaces this layer only, keeps the others
    frame.to_file(path, **kwargs)
    _write_style(frame, path, fmt, layer)


def _write_style(frame: gpd.GeoDataFrame, path: Path, fmt: Format, layer: str) -> None:
    """Give the output geomask's default QGIS style: in the GeoPackage's ``layer_styles``, or a ``.qml`` beside a Shapefile."""
    if fmt is GEOPACKAGE:
        write_gpkg_style(path, layer, style_qml(classes_of(frame)))
    elif fmt is SHAPEFILE:
        write_qml(path.with_suffix(".qml"), style_qml(classes_of(frame)))


def write_output(frame: gpd.GeoDataFrame, path: str | Path, config: Config, overwrite: bool = False) -> Path:
    """Write ``frame`` and the resolved config beside it (``<path>.config.yaml``), both atomically.

    The format follows the extension (:data:`FORMATS`). GeoJSON is reprojected to
    ``config.export.geojson_crs`` (EPSG:4326 by RFC 7946; ``None`` keeps the CRS). Into an existing
    GeoPackage only ``config.export.layer`` is written: the file is copied beside itself, the layer
    written into the copy and the copy renamed over the original, so the other layers are kept and a
    failure leaves the old file as it was. A GeoPackage gets a default QGIS style for its layer (in
    ``layer_styles``), a Shapefile a ``.qml`` (:mod:`geomask.qgis_style`).

    Args:
        frame: The output table (:func:`to_frame`), in the raster's CRS.
        path: The output file.
        config: The resolved config: ``export`` decides layer and GeoJSON CRS; all of it goes into the sidecar.
        overwrite: Replace an existing output (or geomask's layer in a GeoPackage); see :func:`check_writable`.

    Returns:
        The path written.
    """
    out = Path(path)
    fmt = format_for(out)
    layer = config.export.layer
    check_writable(out, layer, overwrite)
    if fmt.field_chars is not None:
        long_names = [str(c) for c in frame.columns if c != frame.geometry.name and len(str(c)) > fmt.field_chars]
        if long_names:
            raise ExportError(
                f"{fmt.driver} keeps field names of at most {fmt.field_chars} characters, {long_names} would be cut; use another format"
            )
    if fmt.map_crs and config.export.geojson_crs is not None:
        frame = frame.to_crs(config.export.geojson_crs)
    try:
        with replacing(out) as tmpdir:
            if fmt.layered and out.exists() and out.stat().st_size > 0:
                shutil.copy2(out, tmpdir / out.name)
            _write(frame, tmpdir / out.name, fmt, layer)
    except Exception as err:  # noqa: BLE001 - any writer failure becomes one line for the user
        raise ExportError(f"cannot write {out} with {fmt.driver}: {first_line(err)}") from None
    write_text_atomic(config_sidecar(out), dump_config(config))
    return out
