"""Vector labels for training and evaluation: read any OGR format and CRS, rasterise per window.

Torch-free. Labels are read once (pyogrio via geopandas), repaired (``make_valid``), reprojected to
the raster's CRS and kept as shapely geometries with an STRtree, so each chip rasterises only the few
polygons it touches (``rasterio.features.rasterize`` with the chip's own affine transform: polygons
are burned on the same pixel grid the image pixels come from, whatever the resampling).

Rules, stated once:

* Several label files may describe the same objects (e.g. an OSM extract and per-block copies of it):
  polygons overlapping an earlier one with IoU ≥ ``dedupe_iou`` are dropped.
* Box-only labels (tree crowns): when ``boxes_as_ellipses`` is set, each polygon is replaced by the
  ellipse inscribed in its bounding box (axis-aligned in the raster CRS). A crown is roughly round,
  and the inscribed ellipse keeps ~79 % of the box area, which is close to a crown's share of its box.
* A label cut by the window edge keeps its visible part, because the detector sees cut objects at
  tile borders too (and the merge fuses their fragments); fragments smaller than ``min_area_px``
  are dropped, as they carry no shape.
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import shapely
from affine import Affine
from pyproj import CRS
from rasterio.features import rasterize
from shapely.geometry.base import BaseGeometry

from geomask import remote
from geomask.errors import LabelError, first_line

log = logging.getLogger(__name__)

BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class LabelSet:
    """Label polygons in one CRS, with class ids and a spatial index.

    Attributes:
        geoms: Polygons/MultiPolygons in ``crs`` (valid, non-empty).
        class_ids: Class index per geometry (into ``classes``).
        classes: Class names.
        crs: CRS of ``geoms``.
    """

    geoms: npt.NDArray[np.object_]
    class_ids: npt.NDArray[np.int64]
    classes: tuple[str, ...]
    crs: CRS

    def __post_init__(self) -> None:
        object.__setattr__(self, "_tree", shapely.STRtree(self.geoms))

    def __len__(self) -> int:
        return len(self.geoms)

    def query(self, bounds: tuple[float, float, float, float]) -> npt.NDArray[np.intp]:
        """Return indexes of geometries intersecting the box ``(minx, miny, maxx, maxy)`` (CRS units)."""
        tree: shapely.STRtree = object.__getattribute__(self, "_tree")
        idx = tree.query(shapely.box(*bounds), predicate="intersects")
        return np.sort(np.asarray(idx, dtype=np.intp))

    def to_crs(self, crs: CRS) -> LabelSet:
        """Return these labels reprojected to ``crs`` (repaired again: reprojection can break validity)."""
        if CRS.from_user_input(crs) == self.crs:
            return self
        import geopandas as gpd

        frame = gpd.GeoSeries(self.geoms, crs=self.crs).to_crs(crs)
        geoms = shapely.make_valid(np.asarray(frame.values, dtype=object))
        return LabelSet(geoms, self.class_ids, self.classes, CRS.from_user_input(crs))


def expand_paths(patterns: Sequence[str]) -> list[str]:
    """Expand glob patterns (sorted, de-duplicated); a pattern matching nothing is an error.

    Remote patterns (``s3://``, ``https://``, ``/vsi*``) come back as GDAL paths; an ``s3://`` glob is
    listed (:func:`geomask.remote.glob_s3`). Whether a remote file exists is found when it is opened.
    """
    out: list[str] = []
    for pattern in patterns:
        globbed = any(ch in remote.url_of(pattern) for ch in "*?[")
        if remote.is_remote(pattern):
            matches = [remote.gdal_path(m) for m in (remote.glob_s3(pattern) if globbed else [pattern])]
        else:
            matches = sorted(glob.glob(pattern, recursive=True)) if globbed else [pattern]
            matches = [m for m in matches if Path(m).exists()]
        if not matches:
            raise LabelError(f"{pattern!r} matches no file; check the path or quote the glob")
        out.extend(m for m in matches if m not in out)
    return out


def read_labels(
    paths: Sequence[str],
    crs: CRS | str,
    class_field: str | None = None,
    classes: Sequence[str] | None = None,
    boxes_as_ellipses: bool = False,
    dedupe_iou: float = 0.9,
    bounds: tuple[float, float, float, float] | None = None,
) -> LabelSet:
    """Read polygon labels from vector files in any OGR format and CRS, reprojected to ``crs``.

    Args:
        paths: Vector files (GeoJSON, GeoPackage, Shapefile, FlatGeobuf, GeoParquet...).
        crs: Target CRS (the raster's).
        class_field: Attribute holding class names; ``None``: every feature is ``classes[0]``.
        classes: Class names in model order; default ``["object"]`` or the sorted values of ``class_field``.
        boxes_as_ellipses: Replace each label by the ellipse inscribed in its box (box-only labels).
        dedupe_iou: Drop a polygon overlapping an earlier one at this IoU or more (same object, two files).
        bounds: Keep only labels intersecting this box (in ``crs``), to read just one raster's share.

    Raises:
        LabelError: A file cannot be read, has no CRS, no polygons, or a class field/value is unknown.
    """
    import geopandas as gpd
    import pandas as pd

    target = CRS.from_user_input(crs)
    frames = []
    for path in paths:
        try:
            frame = gpd.read_file(path, engine="pyogrio")
        except Exception as err:  # noqa: BLE001 - any driver error is a bad label file
            raise LabelError(
                f"cannot read labels {path} ({first_line(err, max_chars=160)}); give a vector file GDAL/OGR can open"
            ) from None
        if frame.empty:
            log.warning("%s holds no features", path)
            continue
        if frame.crs is None:
            raise LabelError(f"labels {path} have no CRS; set one (e.g. `ogr2ogr -a_srs EPSG:4326 out.gpkg {path}`)")
        if class_field is not None and class_field not in frame.columns:
            raise LabelError(
                f"labels {path} have no field {class_field!r}; fields are {sorted(c for c in frame.columns if c != 'geometry')}"
            )
        frame = frame[frame.geometry.notna() & ~frame.geometry.is_empty]
        frames.append(frame.to_crs(target)[[c for c in (class_field, "geometry") if c is not None]])
    if not frames:
        names = tuple(classes) if classes else ("object",)
        return LabelSet(np.empty(0, dtype=object), np.empty(0, dtype=np.int64), names, target)
    merged = pd.concat(frames, ignore_index=True)
    geoms = shapely.make_valid(np.asarray(merged.geometry.values, dtype=object))
    polygonal = np.asarray([_polygonal(g) for g in geoms], dtype=object)
    _check_polygonal(geoms, polygonal, paths)
    geoms = polygonal
    keep = ~shapely.is_empty(geoms)
    if bounds is not None:
        keep &= shapely.intersects(geoms, shapely.box(*bounds))
    if class_field is None:
        names = tuple(classes) if classes else ("object",)
        ids = np.zeros(len(geoms), dtype=np.int64)
    else:
        values = merged[class_field].astype(str).to_numpy()
        names = tuple(classes) if classes else tuple(sorted(set(values[keep].tolist())))
        lookup = {n: i for i, n in enumerate(names)}
        unknown = sorted(set(values[keep].tolist()) - set(lookup))
        if unknown:
            raise LabelError(f"labels have class values {unknown[:5]} not among classes {list(names)}; add them or filter the labels")
        ids = np.asarray([lookup.get(v, -1) for v in values], dtype=np.int64)
    geoms, ids = geoms[keep], ids[keep]
    if boxes_as_ellipses:
        geoms = np.asarray([inscribed_ellipse(g) for g in geoms], dtype=object)
    order = dedupe(geoms, dedupe_iou)
    return LabelSet(geoms[order], ids[order], names, target)


def _check_polygonal(geoms: npt.NDArray[np.object_], polygonal: npt.NDArray[np.object_], paths: Sequence[str | Path]) -> None:
    """Refuse labels with no area at all (points, lines), which would otherwise read as "no label overlaps"."""
    lost = ~shapely.is_empty(geoms) & shapely.is_empty(polygonal)
    if not lost.any():
        return
    kinds = ", ".join(sorted({g.geom_type for g in geoms[lost]}))
    if lost.all():
        raise LabelError(
            f"labels {[str(p) for p in paths][:3]} hold {kinds} geometries; training labels must be polygons or boxes "
            "(buffer points by the object's radius, or draw outlines)"
        )
    log.warning("%d of %d labels are %s, not polygons or boxes; they are ignored", int(lost.sum()), len(geoms), kinds)


def _polygonal(geom: BaseGeometry) -> BaseGeometry:
    """Keep only the polygonal part of a (repaired) geometry; lines and points carry no area."""
    if geom.geom_type in ("Polygon", "MultiPolygon"):
        return geom
    if geom.geom_type == "GeometryCollection":
        parts = [g for g in geom.geoms if g.geom_type in ("Polygon", "MultiPolygon")]
        if parts:
            return shapely.union_all(parts)
    return shapely.Polygon()


def inscribed_ellipse(geom: BaseGeometry, segments: int = 64) -> BaseGeometry:
    """Return the ellipse inscribed in ``geom``'s axis-aligned bounding box (the box-only mask rule)."""
    minx, miny, maxx, maxy = geom.bounds
    t = np.linspace(0.0, 2.0 * np.pi, segments, endpoint=False)
    cx, cy, rx, ry = (minx + maxx) / 2, (miny + maxy) / 2, (maxx - minx) / 2, (maxy - miny) / 2
    return shapely.Polygon(np.column_stack([cx + rx * np.cos(t), cy + ry * np.sin(t)]))


def dedupe(geoms: npt.NDArray[np.object_], iou: float) -> npt.NDArray[np.intp]:
    """Return indexes of ``geoms`` to keep: the first of every group overlapping at IoU ≥ ``iou``."""
    if len(geoms) == 0:
        return np.empty(0, dtype=np.intp)
    tree = shapely.STRtree(geoms)
    left, right = tree.query(geoms, predicate="intersects")
    pairs = left < right
    left, right = left[pairs], right[pairs]
    dropped: set[int] = set()
    if len(left):
        inter = shapely.area(shapely.intersection(geoms[left], geoms[right]))
        union = shapely.area(geoms[left]) + shapely.area(geoms[right]) - inter
        same = inter >= iou * np.maximum(union, 1e-12)
        for a, b in zip(left[same].tolist(), right[same].tolist()):
            if a not in dropped:
                dropped.add(b)
    return np.asarray([i for i in range(len(geoms)) if i not in dropped], dtype=np.intp)


def window_bounds(transform: Affine, height: int, width: int) -> tuple[float, float, float, float]:
    """Return the CRS bounding box ``(minx, miny, maxx, maxy)`` of a ``height × width`` pixel window."""
    xs, ys = zip(*(transform @ (c, r) for r, c in ((0, 0), (0, width), (height, 0), (height, width))))
    return (min(xs), min(ys), max(xs), max(ys))


def rasterize_instances(
    labels: LabelSet,
    transform: Affine,
    height: int,
    width: int,
    min_area_px: int = 4,
) -> tuple[list[BoolArray], list[int]]:
    """Burn each label touching the window into its own full-window boolean mask.

    Args:
        labels: Labels in the CRS of ``transform``.
        transform: Affine of the window's top-left pixel (e.g. a resampled chip's transform).
        height: Window height in pixels.
        width: Window width in pixels.
        min_area_px: Drop masks (e.g. fragments cut by the window edge) smaller than this.

    Returns:
        ``(masks, class_ids)``: one ``(height, width)`` mask per instance, in label order. Where labels
        overlap, the later one wins the shared pixels, so instance masks never overlap.
    """
    idx = labels.query(window_bounds(transform, height, width))
    if idx.size == 0:
        return [], []
    burned = rasterize(
        ((labels.geoms[i], k + 1) for k, i in enumerate(idx.tolist())),
        out_shape=(height, width),
        transform=transform,
        fill=0,
        dtype="int32",
    )
    masks, ids = [], []
    present, counts = np.unique(burned[burned > 0], return_counts=True)
    for value, count in zip(present.tolist(), counts.tolist()):
        if count < min_area_px:
            continue
        masks.append(burned == value)
        ids.append(int(labels.class_ids[idx[value - 1]]))
    return masks, ids


def label_raster(labels: LabelSet, transform: Affine, height: int, width: int) -> npt.NDArray[np.int32]:
    """Return an instance-id raster (0 background, ``k + 1`` for label ``k``) for a window."""
    idx = labels.query(window_bounds(transform, height, width))
    out = np.zeros((height, width), dtype=np.int32)
    if idx.size:
        out = rasterize(
            ((labels.geoms[i], int(i) + 1) for i in idx.tolist()), out_shape=(height, width), transform=transform, fill=0, dtype="int32"
        )
    return out
