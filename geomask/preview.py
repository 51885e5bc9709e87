"""The quick-look picture of a result: the raster's overview with the polygons, and crops where objects are densest.

A person checks a run by looking at it. The picture is made without loading the raster: the overview is
one decimated read (``out_shape``; GDAL serves it from the file's overviews when it has them, else reads
block by block under the reader's 64 MB block cache; averaged from overviews, nearest from a large
raster without them), each crop one windowed read at the working resolution, so memory is bounded by
the picture's size, not the mosaic's. Drawn with matplotlib's object API on its Agg canvas (no pyplot, no
global backend switched, no display needed); colours per
class as in the QGIS style (:mod:`geomask.palette`). A scale bar and a north arrow make a printout readable.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import numpy.typing as npt
import rasterio
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar
from rasterio.enums import Resampling
from rasterio.windows import from_bounds

from geomask.atomic import write_bytes_atomic
from geomask.palette import class_colour
from geomask.raster import GDAL_CACHE_BYTES, pixel_size_m

log = logging.getLogger(__name__)
OVERVIEW_PX = 1400  # longest side of the overview read: detail enough for a 1200 px wide picture
AVERAGE_MAX_PIXELS = 64 * 1024 * 1024  # without overviews, the overview is averaged only up to 8192² source pixels
CROP_PX = 384  # side of each crop in working pixels
FIGSIZE_IN = (12.0, 7.5)
DPI = 100  # 1200 x 750 px


@dataclass(frozen=True)
class Bounds:
    """A rectangle in map units (the raster's CRS): ``left < right``, ``bottom < top``."""

    left: float
    bottom: float
    right: float
    top: float

    @property
    def width(self) -> float:
        return self.right - self.left


def _stretch(pixels: npt.NDArray[np.generic], valid: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
    """Stretch bands (band, row, col) to 0-1 by their 2nd-98th percentiles, as a viewer does for display."""
    out = np.zeros(pixels.shape, dtype=np.float64)
    for b in range(pixels.shape[0]):
        band = pixels[b].astype(np.float64)
        values = band[valid]
        if values.size:
            lo, hi = np.percentile(values, (2, 98))
            out[b] = np.clip((band - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    return out


def _read(
    src: rasterio.DatasetReader, bounds: Bounds, shape: tuple[int, int], resampling: Resampling = Resampling.average
) -> npt.NDArray[np.float64]:
    """Read ``bounds`` of the raster resampled to ``shape`` (rows, cols) as an RGB(A) image for imshow."""
    bands = [1, 2, 3] if src.count >= 3 else [1]
    window = from_bounds(bounds.left, bounds.bottom, bounds.right, bounds.top, src.transform)
    pixels = src.read(bands, window=window, out_shape=(len(bands), *shape), resampling=resampling)
    mask = src.read_masks(1, window=window, out_shape=shape, resampling=Resampling.nearest) > 0
    rgb = _stretch(pixels, mask)
    if rgb.shape[0] == 1:
        rgb = np.repeat(rgb, 3, axis=0)
    return np.dstack([*rgb, mask.astype(np.float64)])


def overview_resampling(src: rasterio.DatasetReader) -> Resampling:
    """Return how the overview is read: averaged from the file's overviews or a small raster, else nearest.

    Averaging a mosaic without overviews visits every source pixel (a 100 000² one took minutes); nearest
    only decodes the blocks the samples fall in, once each, under the capped block cache.
    """
    if src.overviews(1) or src.width * src.height <= AVERAGE_MAX_PIXELS:
        return Resampling.average
    return Resampling.nearest


def _densest(frame: gpd.GeoDataFrame, side: float, n: int, within: Bounds) -> list[Bounds]:
    """Return up to ``n`` squares of ``side`` map units holding the most object centroids, not overlapping."""
    if frame.empty:
        return []
    pts = frame.geometry.centroid
    nx = max(1, math.ceil(within.width / side))
    ny = max(1, math.ceil((within.top - within.bottom) / side))
    counts, _, _ = np.histogram2d(
        pts.x, pts.y, bins=(nx, ny), range=((within.left, within.left + nx * side), (within.bottom, within.bottom + ny * side))
    )
    picked: list[tuple[int, int]] = []
    for flat in np.argsort(counts, axis=None)[::-1]:
        i, j = np.unravel_index(flat, counts.shape)
        if counts[i, j] == 0 or len(picked) == n:
            break
        if all(abs(i - a) > 1 or abs(j - b) > 1 for a, b in picked):  # not next to a crop already shown
            picked.append((int(i), int(j)))
    return [
        _inside(
            Bounds(within.left + i * side, within.bottom + j * side, within.left + (i + 1) * side, within.bottom + (j + 1) * side), within
        )
        for i, j in picked
    ]


def _inside(square: Bounds, within: Bounds) -> Bounds:
    """Shift ``square`` into ``within`` (clipped where ``within`` is the smaller), so crops read no pixels off the raster."""
    dx = max(0.0, within.left - square.left) - max(0.0, square.right - within.right)
    dy = max(0.0, within.bottom - square.bottom) - max(0.0, square.top - within.top)
    return Bounds(
        max(within.left, square.left + dx),
        max(within.bottom, square.bottom + dy),
        min(within.right, square.right + dx),
        min(within.top, square.top + dy),
    )


def _nice_length(span_m: float) -> float:
    """A round scale-bar length (1, 2 or 5 x 10^k metres) near a fifth of ``span_m``."""
    target = max(span_m / 5, 1e-3)
    base = 10 ** math.floor(math.log10(target))
    return float(max((m * base for m in (1, 2, 5) if m * base <= target), default=base))


def _decorate(ax: Axes, bounds: Bounds, metres_per_unit: float, north: bool) -> None:
    length_m = _nice_length(bounds.width * metres_per_unit)
    label = f"{length_m / 1000:g} km" if length_m >= 1000 else f"{length_m:g} m"
    bar = AnchoredSizeBar(
        ax.transData, length_m / metres_per_unit, label, "lower left", pad=0.4, color="white", frameon=False, size_vertical=0
    )
    ax.add_artist(bar)
    if north:  # rasters are north-up (geomask refuses rotated grids), so north is the top of the picture
        ax.annotate(
            "N",
            xy=(0.95, 0.95),
            xytext=(0.95, 0.82),
            xycoords="axes fraction",
            ha="center",
            va="center",
            color="white",
            fontsize=12,
            fontweight="bold",
            arrowprops={"facecolor": "white", "edgecolor": "black", "width": 4, "headwidth": 12},
        )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal")  # as geopandas sets it when it draws: the same layout with or without objects
    ax.set_xlabel("")  # geopandas names the CRS axes; the scale bar says what matters
    ax.set_ylabel("")
    ax.set_xlim(bounds.left, bounds.right)
    ax.set_ylim(bounds.bottom, bounds.top)


def _draw(ax: Axes, frame: gpd.GeoDataFrame, width: float) -> None:
    if frame.empty:
        return
    ids = frame["class_id"] if "class_id" in frame.columns else np.zeros(len(frame), dtype=int)
    for class_id in sorted(set(int(i) for i in ids)):
        part = frame[np.asarray(ids) == class_id]
        part.boundary.plot(ax=ax, color=class_colour(class_id), linewidth=width)


def render_preview(
    frame: gpd.GeoDataFrame,
    png: str | Path,
    image: str | Path | None = None,
    working_gsd_m: float | None = None,
    n_crops: int = 2,
    title: str = "",
) -> Path:
    """Draw the quick-look of ``frame`` (geomask's output table) to ``png``.

    Args:
        frame: The polygons, in any CRS (reprojected to the raster's).
        png: Where the picture goes (1200 x 750 px).
        image: The raster the polygons came from, drawn beneath them; ``None``: polygons on white.
        working_gsd_m: Metres per pixel of the crops (the working grid predict used); ``None``: the raster's own.
        n_crops: Crops at working resolution where objects are densest (0-2).
        title: Written above the overview.

    Returns:
        The path written.
    """
    out = Path(png)
    # The overview of a mosaic without overviews is a decimated read of every block: under GDAL's default
    # block cache (5 % of the machine's memory) those blocks stay cached, so the reader's cap applies here too.
    opened = rasterio.open(image) if image is not None else contextlib.nullcontext()
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), opened as src:
        if src is not None:
            frame = frame.to_crs(src.crs) if frame.crs is not None and src.crs is not None and frame.crs != src.crs else frame
            b = src.bounds
            bounds = Bounds(b.left, b.bottom, b.right, b.top)
            native_m, _ = pixel_size_m(src.crs, src.transform, src.width, src.height)  # along a row: x units
            metres_per_unit = native_m / abs(src.transform.a)
        else:
            x0, y0, x1, y1 = frame.total_bounds if not frame.empty else (0.0, 0.0, 1.0, 1.0)
            pad = 0.02 * max(x1 - x0, y1 - y0, 1e-9)
            bounds = Bounds(x0 - pad, y0 - pad, x1 + pad, y1 + pad)
            native_m = bounds.width / OVERVIEW_PX
            metres_per_unit = 1.0 if frame.crs is None or frame.crs.is_projected else 111_320.0  # degrees: at the equator
        crop_side = CROP_PX * (working_gsd_m or native_m) / metres_per_unit
        crops = _densest(frame, crop_side, min(n_crops, 2), bounds)
        fig = Figure(figsize=FIGSIZE_IN, dpi=DPI, facecolor="#202020")
        FigureCanvasAgg(fig)
        grid = fig.add_gridspec(2, 3, left=0.01, right=0.99, bottom=0.01, top=0.94, wspace=0.03, hspace=0.04)
        ax = fig.add_subplot(grid[:, :2])
        ax.set_facecolor("black" if src is not None else "white")
        height = bounds.top - bounds.bottom
        scale = OVERVIEW_PX / max(bounds.width, height)
        if src is not None:
            shape = (max(1, round(height * scale)), max(1, round(bounds.width * scale)))
            ax.imshow(
                _read(src, bounds, shape, overview_resampling(src)),
                extent=(bounds.left, bounds.right, bounds.bottom, bounds.top),
                interpolation="none",
            )
        _draw(ax, frame, 1.0)  # bright roofs need a line that stays visible when the picture is scaled down
        for c in crops:
            ax.add_patch(Rectangle((c.left, c.bottom), c.width, c.top - c.bottom, fill=False, edgecolor="cyan", linewidth=1.2))
        _decorate(ax, bounds, metres_per_unit, north=True)
        ax.set_title(title or f"{len(frame)} objects", color="white", fontsize=11)
        for k in range(2):
            cax = fig.add_subplot(grid[k, 2])
            cax.set_facecolor("#202020")
            if k >= len(crops):
                cax.axis("off")
                continue
            c = crops[k]
            if src is not None:
                rows = max(1, round(CROP_PX * (c.top - c.bottom) / crop_side))
                cax.imshow(
                    _read(src, c, (rows, max(1, round(CROP_PX * c.width / crop_side)))),
                    extent=(c.left, c.right, c.bottom, c.top),
                    interpolation="none",
                )
            _draw(cax, frame.cx[c.left : c.right, c.bottom : c.top], 1.2)
            _decorate(cax, c, metres_per_unit, north=False)
            for spine in cax.spines.values():
                spine.set_edgecolor("cyan")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI, facecolor=fig.get_facecolor())
        write_bytes_atomic(out, buf.getvalue())
    log.info("preview: %s", out)
    return out


def preview_path(output: str | Path) -> Path:
    """Return where predict writes the quick-look of an output (``<output>.preview.png``)."""
    o = Path(output)
    return o.with_name(o.name + ".preview.png")
