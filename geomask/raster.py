"""Open, inspect and read rasters: windowed reads only, never the whole image in memory.

Three grids matter here. The *source* grid is the file's own pixels. The *working* grid is the one
tiles are planned on: the source grid resampled to a target ground sample distance (or identical to
it). Map coordinates come from the working grid's affine transform, which covers exactly the same
extent as the source, so polygons land where the source pixels are.
"""

from __future__ import annotations

import logging
import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
import numpy.typing as npt
import rasterio
from affine import Affine
from pyproj import CRS, Geod, Transformer
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError, RasterioIOError
from rasterio.windows import Window

from geomask.errors import RasterContentError, RasterReadError, first_line
from geomask.remote import explain_open_error, gdal_path, is_remote, quiet_gdal

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]

_GEOD = Geod(ellps="WGS84")
# GDAL's block cache defaults to 5 % of RAM and fills up on large rasters; a fixed cap keeps memory
# flat whatever the image size (tiles are read once, so a large cache buys little).
GDAL_CACHE_BYTES = 64 * 1024 * 1024
SUPPORTED_DTYPES = ("uint8", "uint16", "int16", "uint32", "int32", "float32", "float64")
# A working grid wider or taller than this is a units slip (raster.gsd_m: 0.0001), not imagery: refused
# before any allocation, whatever raster.max_resample_factor allows.
MAX_WORKING_SIDE_PX = 1_000_000


@dataclass(frozen=True)
class RasterInfo:
    """What geomask needs to know about an input raster (source grid)."""

    path: str
    width: int
    height: int
    count: int
    dtype: str
    crs: CRS
    transform: Affine
    nodata: float | None
    gsd_m: float
    # Ground size of one pixel along columns and rows (metres); None: square pixels of gsd_m.
    pixel_size_m: tuple[float, float] | None = None

    @property
    def square_pixels(self) -> bool:
        """Whether a pixel is as wide as it is tall on the ground (within 2 %)."""
        return self.pixel_size_m is None or math.isclose(*self.pixel_size_m, rel_tol=0.02)

    @property
    def crs_wkt(self) -> str:
        return str(self.crs.to_wkt())


@dataclass(frozen=True)
class Grid:
    """The working grid tiles are planned on: a possibly resampled view of the source grid."""

    width: int
    height: int
    transform: Affine
    scale_x: float  # source pixels per working pixel, along columns
    scale_y: float  # source pixels per working pixel, along rows
    gsd_m: float

    @property
    def resampled(self) -> bool:
        return self.scale_x != 1.0 or self.scale_y != 1.0

    def source_window(self, window: Window) -> Window:
        """Return the source-grid window covering a working-grid window (fractional when resampled)."""
        if not self.resampled:
            return window
        return Window(
            window.col_off * self.scale_x,
            window.row_off * self.scale_y,
            window.width * self.scale_x,
            window.height * self.scale_y,
        )


@dataclass(frozen=True)
class NormStats:
    """Per-band linear normalisation ``(x - low) / (high - low)`` clipped to ``[0, 1]``, fixed per raster."""

    low: tuple[float, ...]
    high: tuple[float, ...]
    mode: str

    def apply(self, pixels: npt.NDArray[np.generic]) -> FloatArray:
        out = pixels.astype(np.float32, copy=True)
        if self.mode == "none":
            return out
        low = np.asarray(self.low, dtype=np.float32)[:, None, None]
        span = np.asarray(self.high, dtype=np.float32)[:, None, None] - low
        span[span <= 0] = 1.0
        out -= low
        out /= span
        np.clip(out, 0.0, 1.0, out=out)
        return out


def pixel_size_m(crs: CRS, transform: Affine, width: int, height: int) -> tuple[float, float]:
    """Return the ground size of one pixel along its columns and its rows in metres, measured geodesically at the raster centre.

    Geodesic measurement makes this right for geographic CRSs and for Web Mercator (whose nominal
    metres are 1/cos(latitude) too large) alike.
    """
    cx, cy = width / 2.0, height / 2.0
    pts = [transform @ (cx, cy), transform @ (cx + 1, cy), transform @ (cx, cy + 1)]
    to_lonlat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    (lon0, lat0), (lon1, lat1), (lon2, lat2) = (to_lonlat.transform(x, y) for x, y in pts)
    _, _, dx = _GEOD.inv(lon0, lat0, lon1, lat1)
    _, _, dy = _GEOD.inv(lon0, lat0, lon2, lat2)
    return abs(float(dx)), abs(float(dy))


def inspect_raster(path: str | Path) -> RasterInfo:
    """Open ``path`` and check it can be processed; raise a one-line error naming the fix if not.

    ``path`` may be remote (``s3://``, ``https://``, ``/vsi*``): :attr:`RasterInfo.path` is then the GDAL
    path every later read opens (:func:`geomask.remote.gdal_path`).
    """
    p = gdal_path(path)
    remote = is_remote(p)
    if not remote and not Path(p).exists():
        raise RasterReadError(f"input {p!r} does not exist; check the path")
    if not remote and Path(p).is_dir():
        raise RasterReadError(f"input {p!r} is a folder, not a raster; give its files, e.g. '{Path(p) / '*.tif'}' (quoted)")
    try:
        with warnings.catch_warnings(), quiet_gdal() if remote else nullcontext():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            src = rasterio.open(p)
    except RasterioIOError as err:
        if remote:
            raise RasterReadError(explain_open_error(p, first_line(err))) from None
        raise RasterReadError(f"{p} is not a readable raster ({first_line(err)}); give a GeoTIFF or another GDAL raster") from None
    with src:
        if src.crs is None:
            raise RasterContentError(
                f"{p} has no CRS, so polygons cannot be placed on the map; assign one, e.g. `gdal_edit.py -a_srs EPSG:32633 {p}`"
            )
        if src.dtypes[0] not in SUPPORTED_DTYPES:
            raise RasterContentError(f"{p} has pixel type {src.dtypes[0]}; convert it to one of {SUPPORTED_DTYPES}")
        if src.transform.is_identity:
            raise RasterContentError(f"{p} has no geotransform; georeference it before running geomask")
        _probe_blocks(src, p)
        crs = CRS.from_user_input(src.crs.to_wkt())
        size = pixel_size_m(crs, src.transform, src.width, src.height)
        return RasterInfo(
            path=p,
            width=src.width,
            height=src.height,
            count=src.count,
            dtype=src.dtypes[0],
            crs=crs,
            transform=src.transform,
            nodata=src.nodata,
            gsd_m=math.sqrt(size[0] * size[1]),
            pixel_size_m=size,
        )


def _probe_blocks(src: rasterio.DatasetReader, path: str) -> None:
    """Read the first and last pixel blocks so a truncated file fails now, before any work is done."""
    try:
        for row, col in ((0, 0), (src.height - 1, src.width - 1)):
            src.read(1, window=Window(col, row, 1, 1))
    except RasterioError as err:
        if is_remote(path):
            raise RasterReadError(explain_open_error(path, first_line(err))) from None
        raise RasterReadError(f"{path} is corrupt or truncated ({first_line(err)}); re-export or re-download it") from None


#: A working grid coarser than the source may be this many times further off than ``max_resample_factor``.
COARSER_SLACK = 4.0


def working_grid(info: RasterInfo, gsd_m: float | None, max_resample_factor: float | None = None) -> Grid:
    """Return the working grid at ``gsd_m`` metres per pixel (``None``: the native grid).

    The grid is square at ``gsd_m`` even when the source pixels are not (a 2:1 pixel would otherwise
    reach the model squashed, and it finds a quarter of the objects).

    Raises:
        RasterContentError: The grid would be more than ``max_resample_factor`` times finer (or
            :data:`COARSER_SLACK` times that, coarser) than the source along an axis, or wider or taller than :data:`MAX_WORKING_SIDE_PX`.
    """
    if gsd_m is None or (info.square_pixels and math.isclose(gsd_m, info.gsd_m, rel_tol=0.02)):
        return Grid(info.width, info.height, info.transform, 1.0, 1.0, info.gsd_m)
    px, py = info.pixel_size_m if info.pixel_size_m is not None and not info.square_pixels else (info.gsd_m, info.gsd_m)
    width = max(1, round(info.width * px / gsd_m))
    height = max(1, round(info.height * py / gsd_m))
    check_resampling(info, gsd_m, (width, height), max_resample_factor)
    sx, sy = info.width / width, info.height / height
    return Grid(width, height, info.transform @ Affine.scale(sx, sy), sx, sy, info.gsd_m * math.sqrt(sx * sy))


def resample_factor(info: RasterInfo, gsd_m: float) -> float:
    """Return how far the working grid at ``gsd_m`` is from the source: > 1 finer (upsampled), < 1 coarser, the worse axis."""
    px, py = info.pixel_size_m or (info.gsd_m, info.gsd_m)
    up, down = max(px, py) / gsd_m, min(px, py) / gsd_m
    return up if up >= 1.0 / down else down


def describe_resampling(info: RasterInfo, gsd_m: float) -> str:
    """Say how the source is resampled, naming both GSDs: ``"0.25 m/px source resampled to 0.3 m/px (1.2x coarser)"``."""
    f = resample_factor(info, gsd_m)
    times = max(f, 1.0 / f)
    how = f"{times:.1f}x" if times < 10 else f"{times:.0f}x"
    return f"{info.gsd_m:.3g} m/px source resampled to {gsd_m:.3g} m/px ({how} {'finer' if f >= 1.0 else 'coarser'})"


def check_resampling(info: RasterInfo, gsd_m: float, size: tuple[int, int], max_factor: float | None) -> None:
    """Refuse a working grid far from the source (a units slip, or imagery the model was not made for) before it is allocated."""
    f = resample_factor(info, gsd_m)
    # Finer costs memory with the square of the factor; coarser costs nothing but detail, and drone
    # imagery at 5-8 cm is routinely read at a 0.3 m model's GSD: coarser is allowed COARSER_SLACK times more.
    limit = None if max_factor is None else (max_factor if f >= 1.0 else max_factor * COARSER_SLACK)
    if limit is not None and max(f, 1.0 / f) > limit:
        raise RasterContentError(
            f"{info.path}: {describe_resampling(info, gsd_m)}, beyond raster.max_resample_factor {max_factor:g}"
            f"{'' if f >= 1.0 else f' (x{COARSER_SLACK:g} when coarser)'}; "
            f"check raster.gsd_m (a units slip?) or use a model made for {info.gsd_m:.3g} m imagery, "
            f"or set raster.max_resample_factor: {math.ceil(max(f, 1.0 / f) / (1.0 if f >= 1.0 else COARSER_SLACK))} to allow it"
        )
    if max(size) > MAX_WORKING_SIDE_PX:
        raise RasterContentError(
            f"{info.path}: {describe_resampling(info, gsd_m)} makes a {size[0]}x{size[1]} px working grid, "
            f"over {MAX_WORKING_SIDE_PX} px a side; check raster.gsd_m (metres per pixel)"
        )


def resolve_bands(info: RasterInfo, bands: list[int] | None) -> list[int]:
    """Return 1-based band indexes to read; default: the first three (or the only one)."""
    if bands is None:
        return list(range(1, min(info.count, 3) + 1))
    bad = [b for b in bands if not 1 <= b <= info.count]
    if bad:
        if info.count == 1:  # gray or single-band 16-bit imagery: its band is repeated for an RGB model (raster.expand_gray)
            fix = "set raster.bands: [1] (a single band is repeated to 3 for an RGB model)"
        else:
            fix = f"set raster.bands to bands 1..{info.count}, e.g. {list(range(1, min(info.count, len(bands)) + 1))}"
        raise RasterContentError(f"{info.path} has {info.count} band(s) but raster.bands (or the model) asks for {bands}; {fix}")
    return list(bands)


class RasterReader:
    """Windowed reader for one raster on one grid: normalised pixels plus a validity mask.

    Keep one per worker and per raster; it holds the dataset open between reads.
    """

    def __init__(self, info: RasterInfo, grid: Grid, bands: list[int], stats: NormStats, expand_gray: bool = True):
        self.info, self.grid, self.bands, self.stats = info, grid, bands, stats
        self.expand_gray = expand_gray
        self._src: rasterio.DatasetReader | None = None
        self._env: rasterio.Env | None = None

    def __enter__(self) -> RasterReader:
        self._env = rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES)
        self._env.__enter__()
        self._src = rasterio.open(self.info.path)
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self._src is not None:
            self._src.close()
            self._src = None
        if self._env is not None:
            self._env.__exit__()
            self._env = None

    def read_raw(self, window: Window) -> tuple[npt.NDArray[np.generic], BoolArray]:
        """Read raw band values ``(bands, h, w)`` and validity ``(h, w)`` for a working-grid window."""
        if self._src is None:
            raise RuntimeError("RasterReader used outside its `with` block")
        shape = (int(window.height), int(window.width))
        src_window = self.grid.source_window(window)
        try:
            if self.grid.resampled:
                raw = self._src.read(self.bands, window=src_window, out_shape=(len(self.bands), *shape), resampling=Resampling.bilinear)
                mask = self._src.dataset_mask(window=src_window, out_shape=shape, resampling=Resampling.nearest)
            else:
                raw = self._src.read(self.bands, window=src_window)
                mask = self._src.dataset_mask(window=src_window)
        except RasterioError as err:
            cause = "the server failed past GDAL_HTTP_MAX_RETRY retries" if is_remote(self.info.path) else "the file may be corrupt"
            raise RasterReadError(f"{self.info.path}: cannot read window {window} ({first_line(err)}); {cause}") from None
        valid = mask > 0
        if np.issubdtype(raw.dtype, np.floating):
            valid &= np.isfinite(raw).all(axis=0)
        return raw, valid

    def read(self, window: Window) -> tuple[FloatArray, BoolArray]:
        """Read normalised float32 pixels ``(bands, h, w)`` in ``[0, 1]`` and validity for a window."""
        raw, valid = self.read_raw(window)
        pixels = self.stats.apply(raw)
        pixels[:, ~valid] = 0.0
        if self.expand_gray and pixels.shape[0] == 1:
            pixels = np.repeat(pixels, 3, axis=0)
        return pixels, valid
