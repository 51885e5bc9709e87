"""Instance masks → valid MultiPolygons in map coordinates.

Polygons are traced on pixel *edges* in global pixel space (``rasterio.features.shapes``), optionally
simplified there, and only then mapped through the working grid's affine transform. A pixel edge at
column ``c`` lands exactly at ``transform @ (c, r)``: no half-pixel shift, and rotated, south-up and
non-square-pixel transforms are handled by the same affine map.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import shapely
from affine import Affine
from pyproj import CRS, Geod, Transformer
from rasterio import features
from shapely.geometry import MultiPolygon, Polygon, shape

from geomask.instances import Instance

_GEOD = Geod(ellps="WGS84")


@dataclass(frozen=True)
class Feature:
    """One output object in map coordinates (the raster's CRS)."""

    geometry: MultiPolygon
    class_id: int
    score: float
    area_m2: float
    perim_m: float
    shape: str = "pixel"  # what the shape stage did (``geomask.shape``): pixel, simplify, orthogonal, ..., fallback
    partial: bool = False  # touches a tile that failed: the object may be cut off there (``pipeline.mark_partial``)


def mask_to_pixel_polygons(instance: Instance) -> MultiPolygon:
    """Trace an instance's mask on pixel edges, in global pixel coordinates (x = column, y = row)."""
    offset = Affine.translation(instance.col_off, instance.row_off)
    polys = [
        shape(geom)
        for geom, value in features.shapes(instance.mask.view(np.uint8), mask=instance.mask, connectivity=4, transform=offset)
        if value == 1
    ]
    return as_multipolygon(shapely.union_all(polys) if len(polys) > 1 else polys[0]) if polys else MultiPolygon()


def as_multipolygon(geom: shapely.Geometry) -> MultiPolygon:
    """Return the polygonal part of ``geom`` as a valid MultiPolygon (possibly empty)."""
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    parts: list[Polygon] = []
    for g in getattr(geom, "geoms", [geom]):
        if isinstance(g, Polygon) and not g.is_empty:
            parts.append(g)
        elif isinstance(g, MultiPolygon):
            parts.extend(p for p in g.geoms if not p.is_empty)
        elif hasattr(g, "geoms"):
            parts.extend(as_multipolygon(g).geoms)
    return MultiPolygon(parts)


def pixel_to_map(geom: MultiPolygon, transform: Affine) -> MultiPolygon:
    """Map a geometry from global pixel coordinates to map coordinates through ``transform``."""
    matrix = [transform.a, transform.b, transform.d, transform.e, transform.c, transform.f]
    mapped = shapely.affinity.affine_transform(geom, matrix)
    # A reflecting transform (north-up has e < 0) reverses ring orientation; normalise to the OGC order.
    return as_multipolygon(shapely.orient_polygons(mapped)) if hasattr(shapely, "orient_polygons") else as_multipolygon(mapped)


class AreaMeter:
    """Measure geodesic area (m²) and perimeter (m) of map-coordinate geometries in any CRS."""

    def __init__(self, crs: CRS):
        self._to_lonlat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)

    def _lonlat(self, xy: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        lon, lat = self._to_lonlat.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([lon, lat])

    def measure(self, geom: MultiPolygon) -> tuple[float, float]:
        lonlat = shapely.transform(geom, self._lonlat)
        area, perim = _GEOD.geometry_area_perimeter(lonlat)
        return abs(float(area)), float(perim)


def vectorize_instances(
    instances: Iterable[Instance],
    transform: Affine,
    crs: CRS,
    gsd_m: float,
    simplify_tolerance_m: float = 0.0,
    min_area_m2: float = 0.0,
) -> list[Feature]:
    """Turn instances into map-coordinate features.

    Args:
        instances: Merged instances in global pixels of the working grid.
        transform: The working grid's affine transform (pixel edges → map coordinates).
        crs: The raster's CRS (areas and perimeters are measured geodesically in it).
        gsd_m: Working-grid ground sample distance, to express the tolerance in pixels.
        simplify_tolerance_m: Douglas–Peucker tolerance in metres (0: exact pixel outlines).
        min_area_m2: Drop features smaller than this ground area.
    """
    meter = AreaMeter(crs)
    tol_px = simplify_tolerance_m / gsd_m if simplify_tolerance_m > 0 else 0.0
    out: list[Feature] = []
    for inst in instances:
        pix = mask_to_pixel_polygons(inst)
        if tol_px > 0:
            pix = as_multipolygon(shapely.simplify(pix, tol_px, preserve_topology=True))
        if pix.is_empty:
            continue
        geom = pixel_to_map(pix, transform)
        area, perim = meter.measure(geom)
        if area < min_area_m2:
            continue
        out.append(Feature(geom, inst.class_id, inst.score, area, perim))
    return out


def sort_features(feats: Sequence[Feature]) -> list[Feature]:
    """Order features deterministically (top-left first) so outputs are comparable between runs."""
    return sorted(feats, key=lambda f: (f.geometry.bounds, f.class_id, -f.score))
