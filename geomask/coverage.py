"""Where valid pixels may be, found before any tile is planned: empty regions cost nothing.

A *coverage* is a coarse boolean grid over the source raster: a cell is ``False`` only when it provably
holds no valid pixel. Tiles whose read window touches no ``True`` cell are never planned, read or
scheduled. The evidence, cheapest first, and each conservative on its own (so their AND is too):

* **Sparse blocks** (GeoTIFF): a block that was never written has offset 0 in the file and reads as
  nodata (or 0 for an alpha band) without being decompressed. GDAL reports each block's offset in
  the ``TIFF`` metadata domain (``BLOCK_OFFSET_<col>_<row>``; absent or 0 when unwritten). A written
  block counts as valid, whatever it holds.
* **Overviews** whose resampling keeps a partly valid footprint valid (GDAL records it as the
  overview band's ``RESAMPLING`` item; ``AVERAGE`` and ``RMS`` ignore nodata and give nodata only when
  every pixel below is nodata). The dataset mask of the finest overview that fits in
  :data:`MAX_OVERVIEW_PIXELS` is read and grown by one overview pixel (footprints need not align with
  the cells). ``NEAREST`` overviews are not used: a small valid island can vanish from them.
* Otherwise, when asked (``tiling.scan_mask``), a **mask scan**: the dataset mask at full resolution,
  one band of rows at a time, each band max-pooled into cells (a cell is valid when any pixel in it is).
  Exact and bounded (:data:`SCAN_BAND_BYTES` of pixels in flight), but it decodes the whole raster
  once. A decimated read is no proof: nearest resampling samples one pixel per cell, and reading the
  mask with ``out_shape`` is such a sample too, so a small valid area between samples would be lost.
* Else the whole raster may hold valid pixels (tiles are still skipped when read, as before).

The area of interest (``tiling.aoi``) uses the same planning step: tiles whose read window misses the
AOI grown by the tile overlap are not planned, and only objects intersecting the AOI are written.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import numpy.typing as npt
import rasterio
import shapely
from affine import Affine
from pyproj import CRS
from rasterio.enums import MaskFlags
from rasterio.windows import Window
from scipy import ndimage
from shapely.affinity import affine_transform
from shapely.geometry.base import BaseGeometry

from geomask import remote
from geomask.errors import ConfigError, first_line
from geomask.raster import GDAL_CACHE_BYTES, Grid, RasterInfo
from geomask.tiling import Tile

log = logging.getLogger(__name__)

BoolArray = npt.NDArray[np.bool_]
# The overview mask read at most: 4 M pixels (cells of ~50 px on a 100 000² raster, far finer than a tile),
# so memory stays flat on any raster size. A 6250² overview cost 66 s and 3.3 GB on the sparse benchmark.
MAX_OVERVIEW_PIXELS = 4 * 1024 * 1024
# The mask scan reads bands of rows holding at most this many bytes of pixels (GDAL decodes every band to
# find a nodata mask), so its memory is flat whatever the raster's width; its cells are as many as an
# overview's at most, and never finer than 32 px.
SCAN_BAND_BYTES = 32 * 1024 * 1024
MIN_SCAN_CELL_PX = 32
# Overview resamplings after which a footprint with any valid pixel is valid (GDAL skips nodata in them).
CONSERVATIVE_RESAMPLING = frozenset({"AVERAGE", "RMS"})


@dataclass(frozen=True)
class Coverage:
    """A coarse grid over the *source* raster: ``cells[i, j]`` is ``False`` only if it holds no valid pixel.

    Attributes:
        cell_width_px: Width of one cell in source pixels (fractional for overviews).
        cell_height_px: Height of one cell in source pixels.
        cells: ``(rows, cols)`` booleans; cell ``(i, j)`` covers source columns
            ``[j * cell_width_px, (j + 1) * cell_width_px)`` and the same along rows.
        method: What the evidence was: ``everywhere``, ``sparse-blocks``, ``overview`` or both joined by ``+``.
    """

    cell_width_px: float
    cell_height_px: float
    cells: BoolArray
    method: str

    @classmethod
    def everywhere(cls, width_px: int, height_px: int) -> Coverage:
        """Return the coverage that claims nothing: one cell, possibly valid."""
        return cls(float(width_px), float(height_px), np.ones((1, 1), dtype=bool), "everywhere")

    @property
    def fraction(self) -> float:
        """Share of cells that may hold valid pixels (1.0 when nothing is known)."""
        return float(self.cells.mean())

    @cached_property
    def _summed_area(self) -> npt.NDArray[np.int64]:
        n_r, n_c = self.cells.shape
        sat = np.zeros((n_r + 1, n_c + 1), dtype=np.int64)
        sat[1:, 1:] = self.cells.astype(np.int64).cumsum(axis=0).cumsum(axis=1)
        return sat

    def windows_may_hold(self, col0: npt.ArrayLike, row0: npt.ArrayLike, col1: npt.ArrayLike, row1: npt.ArrayLike) -> BoolArray:
        """Return, per source-pixel box ``[col0, col1) × [row0, row1)``, whether any of its cells may hold data.

        Vectorised over boxes through a summed-area table: O(1) per box whatever its size.
        """
        n_r, n_c = self.cells.shape
        sat = self._summed_area
        c0 = np.clip(np.floor(np.asarray(col0, dtype=np.float64) / self.cell_width_px), 0, n_c).astype(np.int64)
        r0 = np.clip(np.floor(np.asarray(row0, dtype=np.float64) / self.cell_height_px), 0, n_r).astype(np.int64)
        c1 = np.clip(np.ceil(np.asarray(col1, dtype=np.float64) / self.cell_width_px), 0, n_c).astype(np.int64)
        r1 = np.clip(np.ceil(np.asarray(row1, dtype=np.float64) / self.cell_height_px), 0, n_r).astype(np.int64)
        total = sat[r1, c1] - sat[r0, c1] - sat[r1, c0] + sat[r0, c0]
        return np.asarray((total > 0) & (c1 > c0) & (r1 > r0), dtype=bool)

    def window_may_hold(self, grid: Grid, window: Window) -> bool:
        """Return whether a working-grid window may hold a valid pixel."""
        return bool(self.tiles_may_hold(grid, [window])[0])

    def tiles_may_hold(self, grid: Grid, windows: Sequence[Window]) -> BoolArray:
        """Return, per working-grid window, whether it may hold a valid pixel.

        Each window is mapped to the source pixels it is read from and grown by one source pixel
        (more when resampling), so rounding in GDAL's fractional windows cannot reach an uncounted cell.
        """
        if not windows:
            return np.zeros(0, dtype=bool)
        b = np.array([(w.col_off, w.row_off, w.col_off + w.width, w.row_off + w.height) for w in windows], dtype=np.float64)
        pad_x, pad_y = max(1.0, math.ceil(grid.scale_x)), max(1.0, math.ceil(grid.scale_y))
        return self.windows_may_hold(
            b[:, 0] * grid.scale_x - pad_x, b[:, 1] * grid.scale_y - pad_y, b[:, 2] * grid.scale_x + pad_x, b[:, 3] * grid.scale_y + pad_y
        )


def _and(a: Coverage, b: Coverage) -> Coverage:
    """Join two conservative coverages on the finer one's cells (a cell stays only if both allow it)."""
    fine, coarse = (a, b) if a.cells.size >= b.cells.size else (b, a)
    n_r, n_c = fine.cells.shape
    cols = np.arange(n_c, dtype=np.float64) * fine.cell_width_px
    rows = np.arange(n_r, dtype=np.float64) * fine.cell_height_px
    cc0, rr0 = np.meshgrid(cols, rows)
    allowed = coarse.windows_may_hold(cc0, rr0, cc0 + fine.cell_width_px, rr0 + fine.cell_height_px).reshape(n_r, n_c)
    return Coverage(fine.cell_width_px, fine.cell_height_px, fine.cells & allowed, f"{a.method}+{b.method}")


def _sparse_blocks(src: rasterio.DatasetReader) -> Coverage | None:
    """Return which blocks were ever written, from GDAL's per-block offsets (GeoTIFF only), or ``None``."""
    if src.driver != "GTiff":
        return None
    bh, bw = src.block_shapes[0]
    if any(shape != (bh, bw) for shape in src.block_shapes):
        return None
    n_r, n_c = math.ceil(src.height / bh), math.ceil(src.width / bw)
    interleaved = src.interleaving is not None and src.interleaving.name == "pixel"
    bands = [1] if interleaved else list(src.indexes)
    written = np.zeros((n_r, n_c), dtype=bool)
    for bidx in bands:
        for i in range(n_r):
            for j in range(n_c):
                if not written[i, j]:  # GDAL gives no offset for a block never written
                    written[i, j] = src.get_tag_item(f"BLOCK_OFFSET_{j}_{i}", "TIFF", bidx=bidx) not in (None, "", "0")
    if not written.any():
        return None  # no offsets at all: this GDAL does not report them (an empty raster fails later anyway)
    if written.all():
        return Coverage(float(bw), float(bh), written, "sparse-blocks")
    # Check the rule on the file itself: an unwritten block must read as invalid (cheap: nothing to decode).
    i, j = (int(v) for v in np.argwhere(~written)[0])
    probe = Window(j * bw, i * bh, min(bw, src.width - j * bw), min(bh, src.height - i * bh))
    if src.dataset_mask(window=probe).any():
        return None
    return Coverage(float(bw), float(bh), written, "sparse-blocks")


def _overview_coverage(src: rasterio.DatasetReader, info: RasterInfo) -> Coverage | None:
    """Return the (grown) dataset mask of a conservative overview, or ``None`` when none can be trusted."""
    factors = src.overviews(1)
    if not factors or not _nodata_at_extreme(info):
        return None
    for level in range(len(factors)):  # the finest that fits
        with rasterio.open(info.path, overview_level=level) as ov:
            if ov.width * ov.height > MAX_OVERVIEW_PIXELS and level + 1 < len(factors):
                continue
            # GDAL records the method on the bands it built (often only the first); an overview without it is not trusted.
            methods = {str(ov.tags(b)["RESAMPLING"]).upper() for b in ov.indexes if "RESAMPLING" in ov.tags(b)}
            if not methods or not methods <= CONSERVATIVE_RESAMPLING:
                return None
            valid = ov.dataset_mask() > 0
            cells = ndimage.binary_dilation(valid, structure=np.ones((3, 3), dtype=bool))
            return Coverage(info.width / ov.width, info.height / ov.height, np.asarray(cells, dtype=bool), "overview")
    return None


def _scan_mask(src: rasterio.DatasetReader) -> Coverage:
    """Return the dataset mask max-pooled into cells, scanned at full resolution one band of rows at a time (exact)."""
    width, height = src.width, src.height
    cell = max(MIN_SCAN_CELL_PX, math.ceil(math.sqrt(width * height / MAX_OVERVIEW_PIXELS)))
    n_r, n_c = math.ceil(height / cell), math.ceil(width / cell)
    row_bytes = width * sum(np.dtype(d).itemsize for d in src.dtypes)
    band_cells = max(1, SCAN_BAND_BYTES // (row_bytes * cell))  # rows of cells per read
    cells = np.zeros((n_r, n_c), dtype=bool)
    for i in range(0, n_r, band_cells):
        r0 = i * cell
        rows = min(band_cells * cell, height - r0)
        valid = src.dataset_mask(window=Window(0, r0, width, rows)) > 0
        k = math.ceil(rows / cell)
        padded = np.zeros((k * cell, n_c * cell), dtype=bool)  # the last cells of a row/column may be partial
        padded[:rows, :width] = valid
        cells[i : i + k] = padded.reshape(k, cell, n_c, cell).any(axis=(1, 3))
    return Coverage(float(cell), float(cell), cells, "mask-scan")


def _nodata_at_extreme(info: RasterInfo) -> bool:
    """Return whether an average of valid values can never equal the nodata value (it lies outside their range)."""
    if info.nodata is None:
        return False
    if math.isnan(info.nodata):
        return True
    if np.issubdtype(np.dtype(info.dtype), np.integer):
        limits = np.iinfo(np.dtype(info.dtype))
        return info.nodata in (float(limits.min), float(limits.max))
    return math.isinf(info.nodata)


def raster_coverage(info: RasterInfo, scan: bool = False) -> Coverage:
    """Find where ``info``'s valid pixels may be, from block offsets and trusted overviews (see the module doc).

    Reads no full-resolution pixel except one unwritten block (to check that it reads as nodata), unless
    neither gives evidence and ``scan`` asks for the exact full-resolution mask scan.
    """
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), rasterio.open(info.path) as src:
        flags = {f for band in src.mask_flag_enums for f in band}
        if flags == {MaskFlags.all_valid}:
            return Coverage.everywhere(info.width, info.height)  # no nodata, no mask: every pixel is valid
        found: list[Coverage] = []
        if MaskFlags.per_dataset not in flags or MaskFlags.alpha in flags:  # an internal mask band's blocks are not reported
            sparse = _sparse_blocks(src)
            if sparse is not None and not sparse.cells.all():  # every block written: it says nothing
                found.append(sparse)
        if MaskFlags.nodata in flags and MaskFlags.per_dataset not in flags:
            overview = _overview_coverage(src, info)
            if overview is not None:
                found.append(overview)
        if not found and scan:
            found.append(_scan_mask(src))
    if not found:
        return Coverage.everywhere(info.width, info.height)
    cov = found[0]
    for other in found[1:]:
        cov = _and(cov, other)
    return cov


# -- area of interest ---------------------------------------------------------------------------


def load_aoi(path: str | Path, crs: CRS) -> BaseGeometry:
    """Read every geometry of an OGR vector file and return their union in ``crs`` (map coordinates).

    Raises:
        ConfigError: The file cannot be read, holds no geometry, or has no CRS.
    """
    import pyogrio

    p = remote.gdal_path(path)
    if not remote.is_remote(p) and not Path(p).exists():
        raise ConfigError(f"tiling.aoi {p!r} does not exist; give a vector file (GeoPackage, GeoJSON, Shapefile, ...)")
    try:
        frame = pyogrio.read_dataframe(p)
    except Exception as err:  # noqa: BLE001 - any reader error is the same one line for the user
        if remote.is_remote(p):
            why = remote.explain_open_error(p, first_line(err), expected="an OGR vector file (GeoPackage, GeoJSON, ...)")
            raise ConfigError(f"tiling.aoi: {why}") from None
        raise ConfigError(f"tiling.aoi {p}: cannot read it as a vector file ({first_line(err)}); give an OGR vector") from None
    geoms = frame.geometry[frame.geometry.notna() & ~frame.geometry.is_empty]
    if geoms.empty:
        raise ConfigError(f"tiling.aoi {p} holds no geometry; draw the area of interest as a polygon")
    if frame.crs is None:
        raise ConfigError(f"tiling.aoi {p} has no CRS; assign one (e.g. `ogr2ogr -a_srs EPSG:4326 out.gpkg {p}`)")
    aoi = shapely.union_all(geoms.to_crs(crs).make_valid().to_numpy())
    return aoi


def aoi_in_pixels(aoi: BaseGeometry, transform: Affine) -> BaseGeometry:
    """Map an AOI from map coordinates into working-grid pixel space (x = column, y = row)."""
    inv = ~transform
    return affine_transform(aoi, [inv.a, inv.b, inv.d, inv.e, inv.xoff, inv.yoff])


def tiles_touching_aoi(aoi_px: BaseGeometry, windows: Sequence[Window], margin_px: float) -> BoolArray:
    """Return, per working-grid window, whether it intersects the AOI grown by ``margin_px`` pixels.

    The margin (the tile overlap) makes every pixel up to ``margin_px`` outside the AOI lie in the core
    of a planned tile, so an object crossing the AOI's edge by up to that much is seen whole.
    """
    if not windows:
        return np.zeros(0, dtype=bool)
    grown = aoi_px.buffer(margin_px) if margin_px > 0 else aoi_px
    shapely.prepare(grown)
    b = np.array([(w.col_off, w.row_off, w.col_off + w.width, w.row_off + w.height) for w in windows], dtype=np.float64)
    boxes = shapely.box(b[:, 0], b[:, 1], b[:, 2], b[:, 3])
    return np.asarray(shapely.intersects(grown, boxes), dtype=bool)


def select_tiles(
    tiles: Sequence[Tile], grid: Grid, coverage: Coverage, aoi_px: BaseGeometry | None, margin_px: float
) -> tuple[list[Tile], int, int]:
    """Keep the tiles that may hold valid pixels and touch the AOI.

    Returns:
        ``(kept, n_empty, n_outside_aoi)``: kept tiles (indexes, rows and columns unchanged), tiles
        skipped because they provably hold no valid pixel, and the others skipped because they miss the AOI.
    """
    windows = [t.read for t in tiles]
    may_hold = coverage.tiles_may_hold(grid, windows)
    in_aoi = tiles_touching_aoi(aoi_px, windows, margin_px) if aoi_px is not None else np.ones(len(tiles), dtype=bool)
    kept = [t for t, keep in zip(tiles, may_hold & in_aoi, strict=True) if keep]
    n_empty = int((~may_hold).sum())
    return kept, n_empty, len(tiles) - len(kept) - n_empty
