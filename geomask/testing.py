"""Public test helpers: deterministic detectors that return the truth, for tests and benchmarks.

``truth_detector`` reads an *instance label raster* (0 = background, other values = object ids) on
the same grid as the image and returns, for each tile, every object clipped to the tile. Plugged in
through the normal ``detector.factory`` mechanism, it lets the whole pipeline (reading, tiling,
merge, vectorize, export) be checked for exact counts and coordinates.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import rasterio
from rasterio.enums import Resampling

from geomask.detect.base import ModelHints, TileImage
from geomask.instances import Instance, from_mask


def instances_from_labels(
    labels: npt.NDArray[np.integer], row_off: int, col_off: int, class_of: dict[int, int] | None = None
) -> list[Instance]:
    """Return one instance per non-zero label id in ``labels`` (placed at global ``row_off, col_off``).

    Sorting pixels by id makes this O(n log n) in the window size, whatever the number of objects.
    """
    flat = labels.ravel()
    nz = np.flatnonzero(flat)
    if nz.size == 0:
        return []
    order = nz[np.argsort(flat[nz], kind="stable")]
    ids, starts = np.unique(flat[order], return_index=True)
    width = labels.shape[1]
    out = []
    for k, obj in enumerate(ids.tolist()):
        idx = order[starts[k] : starts[k + 1] if k + 1 < len(starts) else None]
        rows, cols = idx // width, idx % width
        r0, c0 = int(rows.min()), int(cols.min())
        mask = np.zeros((int(rows.max()) - r0 + 1, int(cols.max()) - c0 + 1), dtype=bool)
        mask[rows - r0, cols - c0] = True
        inst = from_mask(mask, row_off=row_off + r0, col_off=col_off + c0, score=1.0, class_id=(class_of or {}).get(obj, 0))
        if inst is not None:
            out.append(inst)
    return out


class TruthDetector:
    """Detector returning the objects of a label raster, clipped to each tile."""

    def __init__(self, labels: str | Path, classes: Sequence[str] = ("object",), tile_size_px: int | None = None):
        self.labels = str(labels)
        self.classes = tuple(classes)
        self.name = f"truth:{Path(self.labels).name}"
        self.hints = ModelHints(tile_size_px=tile_size_px)
        self._src: rasterio.DatasetReader | None = None

    def detect(self, batch: Sequence[TileImage]) -> list[list[Instance]]:
        if self._src is None:
            self._src = rasterio.open(self.labels)
        out = []
        for image in batch:
            win = image.tile.read
            labels = self._src.read(1, window=win)
            out.append(instances_from_labels(labels, int(win.row_off), int(win.col_off)))
        return out

    def __getstate__(self) -> dict[str, object]:  # an open dataset does not pickle; reopen on the worker
        state = dict(self.__dict__)
        state["_src"] = None
        return state


def truth_detector(labels: str, classes: Sequence[str] = ("object",), tile_size_px: int | None = None) -> TruthDetector:
    """Factory for ``detector.factory: geomask.testing:truth_detector`` (options: ``labels``)."""
    return TruthDetector(labels, classes, tile_size_px)


def make_scene(height: int, width: int, n_objects: int, seed: int = 0, max_size_px: int = 1500, n_big: int = 2) -> npt.NDArray[np.int32]:
    """Return an instance label array with buildings- and tree-like objects at known places.

    Mixes rectangles, L-shapes, courtyards with holes, rows of buildings touching along shared walls,
    ellipses (crowns), a few very large objects (``n_big``, up to ``max_size_px``) and tiny ones (8 px).
    Objects never overlap but may touch. Ids start at 1; 0 is background.
    """
    rng = np.random.default_rng(seed)
    labels = np.zeros((height, width), dtype=np.int32)
    next_id = 1

    def free(r: int, c: int, h: int, w: int) -> bool:
        return r >= 0 and c >= 0 and r + h <= height and c + w <= width and not labels[r : r + h, c : c + w].any()

    def put(r: int, c: int, shape: npt.NDArray[np.bool_]) -> None:
        nonlocal next_id
        view = labels[r : r + shape.shape[0], c : c + shape.shape[1]]
        view[shape] = next_id
        next_id += 1

    def shape_of(kind: str, h: int, w: int) -> npt.NDArray[np.bool_]:
        m = np.ones((h, w), dtype=bool)
        if kind == "L":
            m[: h // 2, : w // 2] = False
        elif kind == "courtyard" and h >= 12 and w >= 12:
            m[h // 4 : h - h // 4, w // 4 : w - w // 4] = False
        elif kind == "ellipse":
            yy, xx = np.mgrid[:h, :w]
            m = ((yy + 0.5 - h / 2) / (h / 2)) ** 2 + ((xx + 0.5 - w / 2) / (w / 2)) ** 2 <= 1.0
        return m

    for _ in range(n_big):
        h, w = (int(v) for v in rng.integers(max_size_px // 2, max_size_px + 1, size=2))
        for _try in range(50):
            r, c = int(rng.integers(0, max(1, height - h))), int(rng.integers(0, max(1, width - w)))
            if free(r, c, h, w):
                put(r, c, shape_of(str(rng.choice(["rect", "L", "courtyard"])), h, w))
                break
    attempts = 0
    placed = next_id - 1
    while placed < n_objects and attempts < n_objects * 50:
        attempts += 1
        kind = str(rng.choice(["rect", "rect", "L", "courtyard", "ellipse", "row", "tiny"]))
        if kind == "tiny":
            h, w = int(rng.integers(3, 6)), int(rng.integers(2, 4))  # 6..24 px in area, at least 8 px big or so
            h, w = max(h, 2), max(w, 4)
        else:
            h, w = (int(v) for v in rng.integers(12, 160, size=2))
        if kind == "row":
            n = int(rng.integers(3, 7))
            total = w * n
            r, c = int(rng.integers(0, max(1, height - h))), int(rng.integers(0, max(1, width - total)))
            if free(r, c, h, total):
                for k in range(n):
                    put(r, c + k * w, np.ones((h, w), dtype=bool))  # shared walls: neighbours touch
                placed += n
            continue
        r, c = int(rng.integers(0, max(1, height - h))), int(rng.integers(0, max(1, width - w)))
        if free(max(0, r - 1), max(0, c - 1), min(h + 2, height - max(0, r - 1)), min(w + 2, width - max(0, c - 1))):
            put(r, c, shape_of("rect" if kind == "tiny" else kind, h, w))
            placed += 1
    return labels


def write_scene(
    directory: str | Path,
    labels: npt.NDArray[np.integer],
    transform: object,
    crs: str,
    name: str = "scene",
    dtype: str = "uint8",
    nodata: float | None = None,
) -> tuple[Path, Path]:
    """Write an RGB image drawn from ``labels`` and the label raster itself as tiled GeoTIFFs.

    Returns ``(image_path, labels_path)``. Objects are bright on a darker textured background.
    """
    d = Path(directory)
    image_path, labels_path = d / f"{name}.tif", d / f"{name}_labels.tif"
    h, w = labels.shape
    profile = {
        "driver": "GTiff",
        "width": w,
        "height": h,
        "crs": crs,
        "transform": transform,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
    }
    rng = np.random.default_rng(1)
    scale = {"uint8": 1.0, "uint16": 40.0, "float32": 1 / 255}.get(dtype, 1.0)
    with rasterio.open(image_path, "w", count=3, dtype=dtype, nodata=nodata, **profile) as dst:
        for r in range(0, h, 1024):
            block = labels[r : r + 1024]
            base = rng.integers(40, 90, size=(3, *block.shape)).astype(np.float64)
            base[:, block > 0] = 200 + (block[block > 0] % 40)
            dst.write((base * scale).astype(dtype), window=rasterio.windows.Window(0, r, w, block.shape[0]))
    with rasterio.open(labels_path, "w", count=1, dtype="int32", **profile) as dst:
        dst.write(labels.astype(np.int32), 1)
    return image_path, labels_path


def write_sparse_scene(
    directory: str | Path,
    height: int,
    width: int,
    transform: object,
    crs: str,
    parts: Iterable[tuple[int, int, npt.NDArray[np.integer], npt.NDArray[np.bool_]]],
    block_px: int = 512,
    name: str = "sparse",
    overviews: Sequence[int] = (),
    resampling: str = "average",
) -> tuple[Path, Path]:
    """Write a mostly-nodata RGB image and its label raster block by block, leaving empty blocks unwritten.

    Each part is ``(row_off, col_off, labels, valid)`` at a block-aligned offset: its blocks holding a
    valid pixel are written (image nodata 0 where ``valid`` is false, labels 0 there), the others are not,
    so a 100 000² raster with a few written areas stays a few MB on disk (``SPARSE_OK``). ``overviews``
    are built with ``resampling`` afterwards. Returns ``(image_path, labels_path)``.
    """
    d = Path(directory)
    image_path, labels_path = d / f"{name}.tif", d / f"{name}_labels.tif"
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "crs": crs,
        "transform": transform,
        "tiled": True,
        "blockxsize": block_px,
        "blockysize": block_px,
        "compress": "deflate",
        "SPARSE_OK": True,
    }
    rng = np.random.default_rng(1)
    with (
        rasterio.open(image_path, "w", count=3, dtype="uint8", nodata=0, **profile) as img,
        rasterio.open(labels_path, "w", count=1, dtype="int32", **profile) as lab,
    ):
        for row_off, col_off, labels, valid in parts:
            if row_off % block_px or col_off % block_px:
                raise ValueError(f"part at ({row_off}, {col_off}) is not aligned to {block_px} px blocks")
            for r in range(0, labels.shape[0], block_px):
                for c in range(0, labels.shape[1], block_px):
                    bh, bw = min(block_px, height - row_off - r), min(block_px, width - col_off - c)  # clipped to the raster
                    if bh <= 0 or bw <= 0:
                        continue
                    ok = valid[r : r + bh, c : c + bw]
                    if not ok.any():
                        continue  # never written: reads as nodata, costs nothing on disk
                    ids = np.where(ok, labels[r : r + bh, c : c + bw], 0)
                    base = rng.integers(40, 90, size=(3, *ids.shape)).astype(np.uint8)
                    base[:, ids > 0] = (200 + ids[ids > 0] % 40).astype(np.uint8)
                    base[:, ~ok] = 0
                    win = rasterio.windows.Window(col_off + c, row_off + r, ids.shape[1], ids.shape[0])
                    img.write(base, window=win)
                    lab.write(ids.astype(np.int32), 1, window=win)
    if overviews:
        with rasterio.open(image_path, "r+") as img:
            img.build_overviews(list(overviews), Resampling[resampling])
    return image_path, labels_path
