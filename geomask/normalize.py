"""Per-raster normalisation statistics: computed once from sampled windows, applied identically to every tile.

``auto``: uint8 → the full dtype range (what models trained on 8-bit imagery expect); any other dtype →
2–98 percentiles of the valid pixels of a lattice of sample windows (never a blind ``/255``). Windows
the coverage says hold no valid pixel are not read (:mod:`geomask.coverage`). The result is a
:class:`geomask.raster.NormStats` that :class:`geomask.raster.RasterReader` applies.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
from rasterio.windows import Window

from geomask.errors import RasterContentError, RasterReadError
from geomask.raster import Grid, NormStats, RasterInfo, RasterReader

log = logging.getLogger(__name__)


def _sample_windows(grid: Grid, n: int, size: int) -> list[Window]:
    """Spread ``n`` windows of ``size`` pixels over the working grid on a regular lattice."""
    side = max(1, math.ceil(math.sqrt(n)))
    w, h = min(size, grid.width), min(size, grid.height)
    wins = []
    for i in range(side):
        for j in range(side):
            r = round((grid.height - h) * (i + 0.5) / side)
            c = round((grid.width - w) * (j + 0.5) / side)
            wins.append(Window(c, r, w, h))
    return list(dict.fromkeys(wins))[:n] if len(wins) > n else wins


def compute_norm_stats(
    info: RasterInfo,
    grid: Grid,
    bands: list[int],
    mode: str,
    percentiles: tuple[float, float],
    sample_windows: int,
    sample_size_px: int,
    may_hold: Callable[[Window], bool] | None = None,
) -> NormStats:
    """Compute the normalisation once per raster from sampled windows, ignoring nodata.

    ``may_hold`` says which working-grid windows may hold valid pixels (``geomask.coverage``); the others
    are not read. They contribute nothing anyway, so the statistics are the same, but a 100 000² raster
    that is 99 % nodata is not scanned block by block to find its first valid pixel.

    Raises :class:`RasterContentError` when the raster has no valid pixel at all.
    """
    if mode == "auto":
        mode = "range" if info.dtype == "uint8" else "percentile"
    identity = NormStats((0.0,) * len(bands), (1.0,) * len(bands), "none")
    values: list[npt.NDArray[np.generic]] = []
    unreadable: list[RasterReadError] = []
    with RasterReader(info, grid, bands, identity, expand_gray=False) as reader:
        windows = [w for w in _sample_windows(grid, sample_windows, sample_size_px) if may_hold is None or may_hold(w)]
        for win in windows:
            try:
                raw, valid = reader.read_raw(win)
            except RasterReadError as err:  # a corrupt block: the tiles over it fail alone, later
                unreadable.append(err)
                continue
            if valid.any():
                values.append(raw[:, valid])
        if unreadable and len(unreadable) == len(windows):
            raise unreadable[0]
        if unreadable:
            log.warning(
                "%s: %d of %d sample windows unreadable (%s); statistics from the rest",
                info.path,
                len(unreadable),
                len(windows),
                unreadable[0],
            )
        if not values and not _any_valid(reader, grid, may_hold):
            raise RasterContentError(f"{info.path} has no valid pixels (all nodata or masked); check the nodata value or the input")
    if mode == "none":
        return identity
    if mode == "range":
        if info.dtype.startswith(("uint", "int")):
            tinfo = np.iinfo(np.dtype(info.dtype))
            return NormStats((float(tinfo.min),) * len(bands), (float(tinfo.max),) * len(bands), "range")
        mode = "percentile"  # float data has no intrinsic range
    if not values:  # valid pixels exist but the lattice missed them: scan until some are found
        values = [_first_valid_values(info, grid, bands, may_hold)]
    data = np.concatenate(values, axis=1).astype(np.float64)
    lo = np.percentile(data, percentiles[0], axis=1)
    hi = np.percentile(data, percentiles[1], axis=1)
    return NormStats(tuple(float(v) for v in lo), tuple(float(v) for v in hi), "percentile")


def _iter_blocks(grid: Grid, may_hold: Callable[[Window], bool] | None = None, size: int = 1024) -> list[Window]:
    blocks = (
        Window(c, r, min(size, grid.width - c), min(size, grid.height - r))
        for r in range(0, grid.height, size)
        for c in range(0, grid.width, size)
    )
    return [w for w in blocks if may_hold is None or may_hold(w)]


def _any_valid(reader: RasterReader, grid: Grid, may_hold: Callable[[Window], bool] | None) -> bool:
    for win in _iter_blocks(grid, may_hold):
        _, valid = reader.read_raw(win)
        if valid.any():
            return True
    return False


def _first_valid_values(
    info: RasterInfo, grid: Grid, bands: list[int], may_hold: Callable[[Window], bool] | None
) -> npt.NDArray[np.generic]:
    identity = NormStats((0.0,) * len(bands), (1.0,) * len(bands), "none")
    with RasterReader(info, grid, bands, identity, expand_gray=False) as reader:
        for win in _iter_blocks(grid, may_hold):
            raw, valid = reader.read_raw(win)
            if valid.any():
                return raw[:, valid]
    raise RasterContentError(f"{info.path} has no valid pixels; check the nodata value or the input")
