"""ONNX export and the ONNX Runtime detector: same objects as the torch detector, and no torch on its path.

One tiny model (``tiny_fpn``, 128-px tiles) is trained for a few iterations on bright squares so that
scores are not tied (random weights tie them, which makes any order comparison meaningless), exported
once, and compared with the torch detector on real tiles of an unseen scene.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from geomask.detect.base import TileImage, load_detector
from geomask.detect.maskrcnn import build
from geomask.detect.masks import instances_from_masks
from geomask.detect.onnx_export import export_onnx
from geomask.detect.onnxrt import OnnxDetector, read_metadata
from geomask.detect.training import train
from geomask.errors import DetectorError, WeightsError
from geomask.instances import Instance
from geomask.tiling import Tile
from tests.test_train import SETTINGS, square_scene
from workflows.cli import main

pytestmark = pytest.mark.slow  # one training and two exports: about a minute on two free cores

#: Tolerances of the ONNX graph against torch (its mask paste is torchvision's ONNX loop, float sums reorder).
BOX_IOU, MASK_IOU, SCORE_ATOL = 0.99, 0.98, 1e-3


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Train, export once; return (checkpoint, onnx file, unseen image)."""
    d = tmp_path_factory.mktemp("onnx")
    img_a, lab_a, _ = square_scene(d, "a", 1)
    img_b, _, _ = square_scene(d, "b", 2)
    ckpt = d / "model.pt"
    train([str(img_a)], [str(lab_a)], ckpt, SETTINGS.replace(iterations=30, val_every=30, log_every=30))
    onnx_path = export_onnx(str(ckpt), d / "model.onnx", score_threshold=0.05)
    return ckpt, onnx_path, img_b


def tiles(image: Path, size: int = 128) -> list[TileImage]:
    with rasterio.open(image) as src:
        data = src.read().astype(np.float32) / 255
    out = []
    for r, c, h, w in [(0, 0, size, size), (128, 256, size, size), (250, 10, 100, 120)]:  # the last one smaller than a tile
        win = Window(c, r, w, h)
        out.append(TileImage(Tile(0, 0, 0, win, win, None), np.ascontiguousarray(data[:, r : r + h, c : c + w]), np.ones((h, w), bool)))
    return out


def box(i: Instance) -> tuple[int, int, int, int]:
    return i.row_off, i.col_off, i.row_off + i.height, i.col_off + i.width


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area


def mask_iou(a: Instance, b: Instance) -> float:
    r0, c0 = min(a.row_off, b.row_off), min(a.col_off, b.col_off)
    r1, c1 = max(a.row_off + a.height, b.row_off + b.height), max(a.col_off + a.width, b.col_off + b.width)
    fa, fb = np.zeros((r1 - r0, c1 - c0), bool), np.zeros((r1 - r0, c1 - c0), bool)
    fa[a.row_off - r0 : a.row_off - r0 + a.height, a.col_off - c0 : a.col_off - c0 + a.width] = a.mask
    fb[b.row_off - r0 : b.row_off - r0 + b.height, b.col_off - c0 : b.col_off - c0 + b.width] = b.mask
    return float((fa & fb).sum() / (fa | fb).sum())


def assert_same(onnx_found: list[Instance], torch_found: list[Instance]) -> None:
    """Every torch instance has one ONNX instance with box IoU, mask IoU and score within tolerance, and vice versa."""
    assert len(onnx_found) == len(torch_found)
    free = list(onnx_found)
    for t in torch_found:
        best = max(free, key=lambda o: iou(box(o), box(t)))
        assert iou(box(best), box(t)) >= BOX_IOU
        assert mask_iou(best, t) >= MASK_IOU
        assert abs(best.score - t.score) <= SCORE_ATOL and best.class_id == t.class_id
        free.remove(best)


def test_onnx_matches_torch_on_real_tiles(models: tuple[Path, Path, Path]) -> None:
    ckpt, onnx_path, image = models
    torch_det = build(str(ckpt), device="cpu", score_threshold=0.3)
    onnx_det = load_detector("geomask.detect.maskrcnn:build", {"weights": str(onnx_path), "device": "cpu", "score_threshold": 0.3})
    assert isinstance(onnx_det, OnnxDetector)  # chosen by the suffix
    assert onnx_det.classes == torch_det.classes == ("square",) and onnx_det.hints == torch_det.hints
    assert onnx_det.card.metrics == torch_det.card.metrics and onnx_det.card.attribution == torch_det.card.attribution == "synthetic"
    assert str(onnx_path) in onnx_det.card.source and str(ckpt) in torch_det.card.source  # each names its own file
    batch = tiles(image)
    found = 0
    for image_tile, o, t in zip(batch, onnx_det.detect(batch), torch_det.detect(batch), strict=True):
        assert_same(o, t)
        assert all(i.row_off >= image_tile.tile.read.row_off for i in o)  # global pixels
        found += len(t)
    assert found >= 5  # the comparison compared something


def test_metadata_carries_everything(models: tuple[Path, Path, Path]) -> None:
    _, onnx_path, _ = models
    info = read_metadata(onnx_path)
    assert info["arch"] == "tiny_fpn" and info["classes"] == ["square"] and info["tile_size_px"] == 128
    assert info["attribution"] == "synthetic" and info["baked"]["score_threshold"] == 0.05
    assert {"gsd_m", "bands", "normalize_mode", "percentiles", "inference"} <= set(info)


def test_zero_detections_and_refused_options(models: tuple[Path, Path, Path]) -> None:
    _, onnx_path, _ = models
    det = load_detector("geomask.detect.maskrcnn:build", {"weights": str(onnx_path), "device": "cpu"})
    win = Window(0, 0, 128, 128)
    blank = TileImage(Tile(0, 0, 0, win, win, None), np.zeros((3, 128, 128), np.float32), np.ones((128, 128), bool))
    assert det.detect([blank]) == [[]]
    with pytest.raises(DetectorError, match="re-export with"):
        load_detector("geomask.detect.maskrcnn:build", {"weights": str(onnx_path), "score_threshold": 0.01})
    with pytest.raises(DetectorError, match="tta"):
        load_detector("geomask.detect.maskrcnn:build", {"weights": str(onnx_path), "tta": 4})
    with pytest.raises(WeightsError, match="do not exist"):
        load_detector("geomask.detect.maskrcnn:build", {"weights": str(onnx_path.with_name("nope.onnx"))})


def test_shared_mask_step() -> None:
    masks = np.zeros((3, 8, 10), np.float32)
    masks[0, 2:4, 3:7] = 0.9
    masks[2, 7, 9] = 0.6
    found = instances_from_masks(masks, np.array([0.9, 0.8, 0.7]), np.array([1, 1, 2]), 0.5, 100, 200)
    assert [(i.row_off, i.col_off, i.mask.shape, i.class_id) for i in found] == [(102, 203, (2, 4), 0), (107, 209, (1, 1), 1)]
    assert instances_from_masks(masks[:0], np.zeros(0), np.zeros(0, int), 0.5, 0, 0) == []


def test_predict_serial_gives_the_torch_polygons(models: tuple[Path, Path, Path], tmp_path: Path) -> None:
    ckpt, onnx_path, image = models
    outputs = {}
    for name, weights in (("torch", ckpt), ("onnx", onnx_path)):
        outputs[name] = tmp_path / f"{name}.geojson"
        main(["predict", str(image), "-o", str(outputs[name]), "--weights", str(weights), "--device", "cpu", "--serial"])
    a, b = gpd.read_file(outputs["torch"]), gpd.read_file(outputs["onnx"])
    assert len(a) == len(b) >= 5
    for geom in a.geometry:
        best = max(b.geometry, key=lambda g: geom.intersection(g).area / geom.union(g).area)
        assert geom.intersection(best).area / geom.union(best).area >= MASK_IOU
    assert set(b["model"]) == {f"onnx-tiny_fpn:{onnx_path.name}"}


def test_export_model_cli_and_torch_free_run(models: tuple[Path, Path, Path], tmp_path: Path) -> None:
    ckpt, onnx_path, _ = models
    out = tmp_path / "cli.onnx"
    main(["export-model", str(ckpt), "-o", str(out)])
    assert json.loads(json.dumps(read_metadata(out)))["classes"] == ["square"]
    with pytest.raises(SystemExit) as exit_info:
        main(["export-model", str(ckpt), "-o", str(out)])
    assert exit_info.value.code == 2  # exists: refused without --overwrite
    # A fresh interpreter where `import torch` fails: building and running the ONNX detector must not need it.
    script = f"""
import sys
sys.modules["torch"] = None
sys.modules["torchvision"] = None
import numpy as np
from rasterio.windows import Window
from geomask.detect.base import TileImage, load_detector
from geomask.tiling import Tile
det = load_detector("geomask.detect.maskrcnn:build", {{"weights": {str(onnx_path)!r}, "device": "cpu", "score_threshold": 0.3}})
win = Window(0, 0, 128, 128)
rng = np.random.default_rng(0)
tile = TileImage(Tile(0, 0, 0, win, win, None), rng.random((3, 128, 128), dtype=np.float32), np.ones((128, 128), bool))
det.detect([tile])
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules if sys.modules[m] is not None)
print("ok", det.name)
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok onnx-tiny_fpn")


def test_a_checkpoint_with_tta_defaults_exports_without_tta(
    models: tuple[Path, Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The graph runs one view per call: a checkpoint whose defaults ask for TTA exports with a warning, and the
    exported file does not carry ``tta`` (else every ONNX run with the file's own defaults would be refused)."""
    from geomask.detect.checkpoint import set_inference_defaults

    ckpt, _, _ = models
    with_tta = set_inference_defaults(ckpt, tmp_path / "tta.pt", {"tta": 4, "min_area_m2": 2.0})
    out = export_onnx(str(with_tta), tmp_path / "tta.onnx", score_threshold=0.05)
    assert "tta 4" in caplog.text and "runs without it" in caplog.text
    assert read_metadata(out)["inference"] == {"min_area_m2": 2.0}  # the other defaults travel
    det = load_detector("geomask.detect.maskrcnn:build", {"weights": str(out), "device": "cpu"})
    assert isinstance(det, OnnxDetector)


@pytest.mark.parametrize("mode", ["--serial", "--workers=1"])
def test_predict_cli_runs_where_torch_cannot_be_imported(models: tuple[Path, Path, Path], tmp_path: Path, mode: str) -> None:
    """The whole `geomask predict` (CLI, pipeline, Dask workers, writers) with ONNX weights needs no torch: what
    the torch-free install (requirements/onnx-runtime.txt) relies on. Workers inherit the blocked import through
    a sitecustomize on PYTHONPATH, as a torch-free environment would have it."""
    _, onnx_path, image = models
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\nsys.modules['torchvision'] = None\n")
    out = tmp_path / "free.geojson"
    env = {**os.environ, "PYTHONPATH": f"{block}{os.pathsep}{Path(__file__).resolve().parents[1]}"}
    cmd = [sys.executable, "-m", "workflows.cli", "-q", "predict", str(image), "-o", str(out), "--weights", str(onnx_path), mode]
    done = subprocess.run([*cmd, "--no-preview"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(gpd.read_file(out)) >= 5


def test_pt_weights_without_torch_say_how_to_fix_it(models: tuple[Path, Path, Path], tmp_path: Path) -> None:
    ckpt, _, image = models
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\nsys.modules['torchvision'] = None\n")
    env = {**os.environ, "PYTHONPATH": f"{block}{os.pathsep}{Path(__file__).resolve().parents[1]}"}
    cmd = [sys.executable, "-m", "workflows.cli", "-q", "predict", str(image), "-o", str(tmp_path / "o.gpkg"), "--weights", str(ckpt)]
    done = subprocess.run([*cmd, "--serial"], capture_output=True, text=True, env=env, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert ".pt weights need torch" in lines[0] and "geomask export-model" in lines[0]
    assert not (tmp_path / "o.gpkg").exists()
