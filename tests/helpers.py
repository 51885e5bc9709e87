"""Helpers shared by the tests: real GeoTIFFs written with rasterio, truth-detector configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

from geomask.config import Config, merge_overrides

UTM = "EPSG:32633"
UTM_TRANSFORM = Affine(0.25, 0.0, 500_000.0, 0.0, -0.25, 5_000_000.0)


def write_raster(
    path: Path,
    data: np.ndarray,
    transform: Affine = UTM_TRANSFORM,
    crs: str | None = UTM,
    nodata: float | None = None,
    **extra: object,
) -> Path:
    """Write a (bands, h, w) array as a GeoTIFF."""
    if data.ndim == 2:
        data = data[None]
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=data.shape[2],
        height=data.shape[1],
        count=data.shape[0],
        dtype=data.dtype,
        crs=crs,
        transform=transform,
        nodata=nodata,
        **extra,
    ) as dst:
        dst.write(data)
    return path


def truth_config(labels: Path, size: int = 256, overlap: int = 32, **more: object) -> Config:
    """Config running the truth detector on ``labels``."""
    overrides: dict[str, object] = {
        "detector.factory": "geomask.testing:truth_detector",
        "detector.options": {"labels": str(labels)},
        "tiling.size_px": size,
        "tiling.overlap_px": overlap,
    }
    overrides.update(more)
    return merge_overrides(Config(), overrides)
