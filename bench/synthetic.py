"""Write large synthetic scenes block by block (never the whole raster in memory)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

BLOCK = 1024


def write_large_scene(directory: Path, side_px: int, objects_per_block: int = 12, seed: int = 0) -> tuple[Path, Path, int]:
    """Write a ``side_px``² RGB image and its instance label raster; return (image, labels, n_objects).

    Objects are rectangles placed inside each 1024-px block, so tile borders (not aligned to blocks)
    still cut many of them. Both files are tiled, deflate-compressed GeoTIFFs written block by block.
    """
    rng = np.random.default_rng(seed)
    image, labels = directory / f"scene{side_px}.tif", directory / f"scene{side_px}_labels.tif"
    profile = {
        "driver": "GTiff",
        "width": side_px,
        "height": side_px,
        "crs": "EPSG:32633",
        "transform": Affine(0.3, 0, 500_000.0, 0, -0.3, 5_000_000.0),
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "BIGTIFF": "IF_SAFER",
    }
    next_id = 1
    with (
        rasterio.open(image, "w", count=3, dtype="uint8", **profile) as img,
        rasterio.open(labels, "w", count=1, dtype="int32", **profile) as lab,
    ):
        for r in range(0, side_px, BLOCK):
            for c in range(0, side_px, BLOCK):
                h, w = min(BLOCK, side_px - r), min(BLOCK, side_px - c)
                block = np.zeros((h, w), np.int32)
                for _ in range(objects_per_block):
                    oh, ow = (int(v) for v in rng.integers(10, 120, size=2))
                    if oh >= h or ow >= w:
                        continue
                    rr, cc = int(rng.integers(0, h - oh)), int(rng.integers(0, w - ow))
                    if not block[rr : rr + oh, cc : cc + ow].any():
                        block[rr : rr + oh, cc : cc + ow] = next_id
                        next_id += 1
                pixels = np.where(block > 0, 210, 60).astype(np.uint8)
                win = Window(c, r, w, h)
                img.write(np.stack([pixels] * 3), window=win)
                lab.write(block, 1, window=win)
    return image, labels, next_id - 1
