"""The quick-look: a PNG of the expected size, the objects drawn where they are, crops where they are densest."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import yaml
from affine import Affine
from PIL import Image
from shapely.geometry import box

from geomask.palette import class_colour, rgb
from geomask.preview import CROP_PX, DPI, FIGSIZE_IN, Bounds, _densest, render_preview
from workflows.cli import main

ORIGIN = (500_000.0, 5_000_000.0)
GSD = 0.5


def _raster(path: Path, size: int = 800) -> Path:
    rng = np.random.default_rng(0)
    data = np.repeat(rng.integers(40, 90, (1, size, size), dtype=np.uint8), 3, axis=0)  # gray: no pixel in a class colour
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8", "crs": "EPSG:32633"}
    with rasterio.open(path, "w", transform=Affine(GSD, 0, ORIGIN[0], 0, -GSD, ORIGIN[1]), **profile) as dst:
        dst.write(data)
    return path


def _cluster(n: int = 30) -> gpd.GeoDataFrame:
    """Small buildings packed in the raster's north-east corner (top right), one class."""
    x0, y0 = ORIGIN[0] + 300, ORIGIN[1] - 100
    boxes = [box(x0 + 12 * (i % 6), y0 - 12 * (i // 6), x0 + 12 * (i % 6) + 8, y0 - 12 * (i // 6) + 8) for i in range(n)]
    return gpd.GeoDataFrame({"class_id": [0] * n, "class": ["building"] * n, "score": [0.9] * n}, geometry=boxes, crs=32633)


def _colour_share(pixels: np.ndarray, colour: str) -> float:
    target = np.array(rgb(colour))
    return float((np.abs(pixels[..., :3].astype(int) - target).sum(axis=-1) < 60).mean())


def test_densest_square_is_where_the_cluster_is() -> None:
    frame = _cluster()
    within = Bounds(ORIGIN[0], ORIGIN[1] - 400, ORIGIN[0] + 400, ORIGIN[1])
    (crop,) = _densest(frame, 96.0, 1, within)
    assert crop.width == 96.0 and crop.left <= ORIGIN[0] + 330 <= crop.right
    assert _densest(frame.iloc[:0], 96.0, 2, within) == []


def test_preview_draws_the_objects_over_the_image(tmp_path: Path) -> None:
    image = _raster(tmp_path / "img.tif")
    png = render_preview(_cluster(), tmp_path / "p.png", image, working_gsd_m=GSD)
    pixels = np.asarray(Image.open(png).convert("RGB"))
    assert pixels.shape == (int(FIGSIZE_IN[1] * DPI), int(FIGSIZE_IN[0] * DPI), 3)
    h, w = pixels.shape[:2]
    bare = np.asarray(Image.open(render_preview(_cluster().iloc[:0], tmp_path / "bare.png", image)).convert("RGB"))
    drawn = (np.abs(pixels.astype(int) - bare.astype(int)).max(axis=-1) > 30)[:, : 2 * w // 3]  # the overview only
    # What the objects add to the overview (outlines, the crop's frame) is north-east; nothing south-west of the crop.
    assert drawn[: h // 2, w // 3 :].mean() > 0.002
    assert drawn[int(0.6 * h) :, : int(0.45 * w / 1.5)].mean() == 0.0
    crop = pixels[: h // 2, 2 * w // 3 :]  # the first crop, at working resolution: the cluster's outlines in the class colour
    assert _colour_share(crop, class_colour(0)) > 0.01
    assert crop.std() > 10  # imagery, not an empty panel


def test_preview_without_image_and_an_empty_result(tmp_path: Path) -> None:
    for frame in (_cluster(), _cluster().iloc[:0]):
        png = render_preview(frame, tmp_path / "p.png")
        assert Image.open(png).size == (int(FIGSIZE_IN[0] * DPI), int(FIGSIZE_IN[1] * DPI))
    assert CROP_PX > 0


@pytest.mark.parametrize("serial", [True])
def test_predict_writes_a_preview_and_the_command_redraws_it(tmp_path: Path, serial: bool) -> None:
    from geomask.testing import make_scene, write_scene
    from tests.helpers import UTM, UTM_TRANSFORM

    image, labels = write_scene(tmp_path, make_scene(256, 256, 10, seed=2, max_size_px=60, n_big=0), UTM_TRANSFORM, UTM)
    cfg = tmp_path / "truth.yaml"
    cfg.write_text(yaml.safe_dump({"detector": {"factory": "geomask.testing:truth_detector", "options": {"labels": str(labels)}}}))
    out = tmp_path / "out.gpkg"
    main(["predict", str(image), "-o", str(out), "-c", str(cfg), "--serial"])
    assert Image.open(tmp_path / "out.gpkg.preview.png").size == (1200, 750)
    main(["predict", str(image), "-o", str(tmp_path / "b.gpkg"), "-c", str(cfg), "--serial", "--no-preview"])
    assert not (tmp_path / "b.gpkg.preview.png").exists()
    main(["preview", str(out), "--image", str(image), "-o", str(tmp_path / "again.png")])
    assert Image.open(tmp_path / "again.png").size == (1200, 750)


def test_a_large_raster_without_overviews_is_sampled_not_averaged(tmp_path: Path) -> None:
    """Averaging every pixel of a big mosaic took minutes; nearest decodes each block once. Overviews restore the average."""
    from rasterio.enums import Resampling

    from geomask.preview import overview_resampling
    from geomask.testing import write_sparse_scene

    side = 9216  # just over AVERAGE_MAX_PIXELS; mostly unwritten, so it stays small on disk
    labels = np.zeros((1024, 1024), np.int32)
    labels[100:200, 100:300] = 1
    transform = Affine(GSD, 0, ORIGIN[0], 0, -GSD, ORIGIN[1])
    image, _ = write_sparse_scene(tmp_path, side, side, transform, "EPSG:32633", [(0, 0, labels, np.ones_like(labels, bool))], 512)
    with rasterio.open(image) as src:
        assert overview_resampling(src) == Resampling.nearest
    png = render_preview(_cluster(), tmp_path / "big.png", image)
    assert Image.open(png).size == (round(FIGSIZE_IN[0] * DPI), round(FIGSIZE_IN[1] * DPI))
    with rasterio.open(image, "r+") as dst:
        dst.build_overviews([8, 32], Resampling.average)
    with rasterio.open(image) as src:
        assert overview_resampling(src) == Resampling.average
    with rasterio.open(_raster(tmp_path / "small.tif")) as src:
        assert overview_resampling(src) == Resampling.average  # a small raster is averaged without overviews
