"""A default QGIS style for every output: outlines coloured by class, no fill, the score as a label.

A user who opens a geomask GeoPackage in QGIS sees the objects over the imagery at once, without
styling the layer first. QGIS's own convention is followed (its OGR provider, ``saveStyle`` /
``loadStyle``): a non-spatial table ``layer_styles`` in the GeoPackage, created through OGR with the
FID column ``id``, the columns QGIS creates (``f_table_catalog``, ``f_table_schema``, ``f_table_name``,
``f_geometry_column``, ``styleName``, ``styleQML``, ``styleSLD``, ``useAsDefault``, ``description``,
``owner``, ``ui``, ``update_time``), one row per style; QGIS applies the row with ``useAsDefault`` whose
``f_table_schema`` is empty and whose ``f_table_name``/``f_geometry_column`` name the layer. Styles of
other layers are left as they are; an older default of geomask's layer is unset (as QGIS does when it
saves a new default) and geomask's own row replaced. Shapefiles get the same style as a ``.qml``
beside them, which QGIS loads when it opens the ``.shp``.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from xml.sax.saxutils import quoteattr

import pandas as pd
import pyogrio

from geomask.palette import class_colour, rgb

STYLES_TABLE = "layer_styles"  # the table QGIS reads styles from in a GeoPackage
STYLE_NAME = "geomask"  # our row's styleName: replaced on each write, other styles of the layer are kept
LABEL_MAX_SCALE = 2500  # score labels only when zoomed in past 1:2500 (a few hundred objects on screen)
QGIS_COLUMNS = (
    "f_table_catalog",
    "f_table_schema",
    "f_table_name",
    "f_geometry_column",
    "styleName",
    "styleQML",
    "styleSLD",
    "useAsDefault",
    "description",
    "owner",
    "ui",
    "update_time",
)


def _options(values: dict[str, str]) -> str:
    # QGIS >= 3.26 reads <Option> maps, older 3.x <prop> pairs; both are written, as QGIS 3.16-3.24 did.
    opts = "".join(f'<Option name="{k}" type="QString" value="{v}"/>' for k, v in values.items())
    props = "".join(f'<prop k="{k}" v="{v}"/>' for k, v in values.items())
    return f'<Option type="Map">{opts}</Option>{props}'


def _outline_symbol(name: int, colour: str) -> str:
    r, g, b = rgb(colour)
    layer = _options(
        {
            "color": f"{r},{g},{b},0",
            "style": "no",  # no fill: the imagery under each outline stays visible
            "outline_color": f"{r},{g},{b},255",
            "outline_style": "solid",
            "outline_width": "0.5",
            "outline_width_unit": "MM",
            "joinstyle": "miter",
        }
    )
    return (
        f'<symbol type="fill" name="{name}" alpha="1" clip_to_extent="1" force_rhr="0">'
        f'<layer class="SimpleFill" enabled="1" locked="0" pass="0">{layer}</layer></symbol>'
    )


def style_qml(classes: Sequence[tuple[int, str]], class_field: str = "class", score_field: str = "score") -> str:
    """Return the QML of geomask's default style: one outline colour per class, score labels when zoomed in.

    Args:
        classes: ``(class_id, class name)`` of every class to list, in legend order; the colour follows
            the id (:func:`geomask.palette.class_colour`), as in the quick-look picture.
        class_field: The field holding the class name.
        score_field: The field holding the detection score (0-1), shown with two decimals.

    Returns:
        A QGIS 3 ``.qml`` document.
    """
    categories = "".join(
        f'<category value={quoteattr(name)} symbol={quoteattr(str(i))} label={quoteattr(name)} render="true"/>'
        for i, (_, name) in enumerate(classes)
    )
    symbols = "".join(_outline_symbol(i, class_colour(cid)) for i, (cid, _) in enumerate(classes))
    label_expr = quoteattr(f'format_number("{score_field}", 2)')
    return (
        "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
        '<qgis version="3.28.0" styleCategories="Symbology|Labeling" labelsEnabled="1">\n'
        f'<renderer-v2 type="categorizedSymbol" attr={quoteattr(class_field)} symbollevels="0" enableorderby="0" forceraster="0">'
        f"<categories>{categories}</categories><symbols>{symbols}</symbols>"
        f"<source-symbol>{_outline_symbol(0, class_colour(0))}</source-symbol></renderer-v2>\n"
        '<labeling type="simple"><settings calloutType="simple">'
        f'<text-style fieldName={label_expr} isExpression="1" fontFamily="Sans Serif" fontSize="7" fontSizeUnit="Point" '
        'textColor="255,255,255,255" textOpacity="1" namedStyle="Regular">'
        '<text-buffer bufferDraw="1" bufferSize="0.7" bufferSizeUnits="MM" bufferColor="0,0,0,255" bufferOpacity="1"/>'
        "</text-style>"
        '<placement placement="1" offsetType="0" dist="0"/>'
        # QGIS's names are flipped: scaleMax is the most zoomed-out scale denominator the labels show at.
        f'<rendering scaleVisibility="1" scaleMin="0" scaleMax="{LABEL_MAX_SCALE}" drawLabels="1" obstacle="1"/>'
        "</settings></labeling>\n"
        "</qgis>\n"
    )


def classes_of(frame: pd.DataFrame) -> list[tuple[int, str]]:
    """Return the ``(class_id, class)`` pairs present in an output table, by id (empty without those columns)."""
    if "class_id" not in frame.columns or "class" not in frame.columns:
        return []
    pairs = frame[["class_id", "class"]].drop_duplicates().sort_values("class_id")
    return [(int(cid), str(name)) for cid, name in pairs.itertuples(index=False)]


def write_qml(path: str | Path, qml: str) -> Path:
    """Write a ``.qml`` (for a Shapefile: ``out.qml`` beside ``out.shp``, which QGIS loads with it)."""
    out = Path(path)
    out.write_text(qml, encoding="utf-8")
    return out


def _now() -> str:
    # The GeoPackage DATETIME form (ISO 8601, UTC, milliseconds) that OGR writes and QGIS orders by.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + ".000Z"


def _row(layer: str, geometry_column: str, qml: str) -> dict[str, object]:
    return {
        "f_table_catalog": "",
        "f_table_schema": "",  # QGIS looks up styles with f_table_schema='' in a GeoPackage
        "f_table_name": layer,
        "f_geometry_column": geometry_column,
        "styleName": STYLE_NAME,
        "styleQML": qml,
        "styleSLD": "",
        "useAsDefault": True,
        "description": "geomask default: outline by class, score labels when zoomed in",
        "owner": "",
        "ui": "",
        "update_time": _now(),
    }


def write_gpkg_style(path: str | Path, layer: str, qml: str) -> None:
    """Make ``qml`` the default QGIS style of ``layer`` in the GeoPackage ``path``.

    The table is created through OGR (registered in ``gpkg_contents`` as attributes, FID ``id``, as QGIS
    creates it); into an existing one, geomask's row for the layer is replaced and older defaults of the
    layer unset, in one SQLite transaction, so other layers' styles stay as they were.

    Raises:
        ValueError: An existing ``layer_styles`` table lacks a column QGIS needs.
    """
    gpkg = Path(path)
    geometry_column = str(pyogrio.read_info(gpkg, layer=layer).get("geometry_name") or "geom")
    row = _row(layer, geometry_column, qml)
    if STYLES_TABLE not in {str(name) for name, _ in pyogrio.list_layers(gpkg)}:
        table = pd.DataFrame({k: [v] for k, v in row.items()}).astype({"useAsDefault": "bool"})
        table["update_time"] = pd.to_datetime(table["update_time"], utc=True)
        pyogrio.write_dataframe(table, gpkg, layer=STYLES_TABLE, driver="GPKG", layer_options={"FID": "id"})
        return
    with closing(sqlite3.connect(gpkg)) as db, db:
        columns = {str(r[1]) for r in db.execute(f'PRAGMA table_info("{STYLES_TABLE}")')}
        missing = [c for c in QGIS_COLUMNS if c not in columns]
        if missing:
            raise ValueError(f"{gpkg}'s {STYLES_TABLE} table lacks the columns {missing} QGIS uses; rename or drop that table")
        where = "f_table_name = ? AND f_geometry_column = ?"
        db.execute(f"UPDATE {STYLES_TABLE} SET useAsDefault = 0 WHERE {where}", (layer, geometry_column))
        db.execute(f"DELETE FROM {STYLES_TABLE} WHERE {where} AND styleName = ?", (layer, geometry_column, STYLE_NAME))
        names = ", ".join(f'"{c}"' for c in QGIS_COLUMNS)
        db.execute(f"INSERT INTO {STYLES_TABLE} ({names}) VALUES ({', '.join('?' * len(QGIS_COLUMNS))})", [row[c] for c in QGIS_COLUMNS])
