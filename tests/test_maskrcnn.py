"""The Mask R-CNN detector's contract: global coordinates, cropped masks, batching, no hidden resize."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from rasterio.windows import Window
from torchvision.ops import box_iou

from geomask.detect.base import Detector, TileImage, load_detector
from geomask.detect.checkpoint import CheckpointMeta, save_checkpoint
from geomask.detect.maskrcnn import ARCHS, MaskRCNNDetector, build, build_model
from geomask.errors import DetectorError
from geomask.tiling import Tile

TILE = 64


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> MaskRCNNDetector:
    """An untrained tiny model with every threshold at zero: it returns many arbitrary instances."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, CheckpointMeta("tiny_fpn", ("thing",), TILE), build_model("tiny_fpn", 1, TILE).state_dict())
    return build(str(path), device="cpu", score_threshold=0.0, mask_threshold=0.3, detections_per_img=50)


def tile_image(row: int, col: int, h: int = TILE, w: int = TILE, seed: int = 0) -> TileImage:
    win = Window(col, row, w, h)
    pixels = np.random.default_rng(seed).random((3, h, w), dtype=np.float32)
    return TileImage(Tile(0, 0, 0, win, win, None), pixels, np.ones((h, w), dtype=bool))


def test_is_a_detector(detector: MaskRCNNDetector) -> None:
    assert isinstance(detector, Detector)
    assert detector.classes == ("thing",) and detector.name.startswith("maskrcnn-tiny_fpn")
    assert detector.hints.tile_size_px == TILE


def test_instances_in_global_pixels_with_cropped_masks(detector: MaskRCNNDetector) -> None:
    batch = [tile_image(1000, 2000), tile_image(37, 5, seed=1)]
    results = detector.detect(batch)
    assert len(results) == 2
    for image, found in zip(batch, results):
        assert found, "an untrained model at score 0 returns something"
        assert len(found) <= 50
        win = image.tile.read
        for inst in found:
            assert win.row_off <= inst.row_off and inst.row_off + inst.height <= win.row_off + win.height
            assert win.col_off <= inst.col_off and inst.col_off + inst.width <= win.col_off + win.width
            m = inst.mask
            assert m[0].any() and m[-1].any() and m[:, 0].any() and m[:, -1].any()  # cropped to its box
            assert inst.class_id == 0 and 0.0 <= inst.score <= 1.0 and inst.tile_id == -1


def test_batched_equals_one_by_one(detector: MaskRCNNDetector) -> None:
    a, b = tile_image(0, 0, seed=2), tile_image(64, 64, seed=3)
    together = detector.detect([a, b])
    alone = [detector.detect([a])[0], detector.detect([b])[0]]
    for x, y in zip(together, alone):
        assert [(i.row_off, i.col_off, i.mask.shape) for i in x] == [(i.row_off, i.col_off, i.mask.shape) for i in y]
        assert all(np.array_equal(i.mask, j.mask) for i, j in zip(x, y))


def test_tile_smaller_than_the_tile_size(detector: MaskRCNNDetector) -> None:
    small = tile_image(500, 700, h=40, w=23)
    (found,) = detector.detect([small])
    for inst in found:
        assert inst.row_off >= 500 and inst.row_off + inst.height <= 540
        assert inst.col_off >= 700 and inst.col_off + inst.width <= 723
    mixed = detector.detect([tile_image(0, 0), small])  # mixed sizes in one batch are padded, not resized
    assert len(mixed) == 2


def test_no_hidden_resize(detector: MaskRCNNDetector) -> None:
    """torchvision's transform sees the padded square at scale 1, for the tile size and for bigger tiles."""
    for side in (TILE, 96):
        detector.detect([tile_image(0, 0, h=side, w=side - 10)])
        images, _ = detector.model.transform([torch.zeros(3, side, side)])
        assert images.image_sizes == [(side, side)]


def test_bad_input(detector: MaskRCNNDetector) -> None:
    win = Window(0, 0, TILE, TILE)
    four = TileImage(Tile(0, 0, 0, win, win, None), np.zeros((4, TILE, TILE), np.float32), np.ones((TILE, TILE), bool))
    with pytest.raises(DetectorError, match="3-band"):
        detector.detect([four])
    assert detector.detect([]) == []


def test_factory_through_load_detector(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "t.pt", CheckpointMeta("tiny_fpn", ("a",), TILE), build_model("tiny_fpn", 1, TILE).state_dict())
    det = load_detector("geomask.detect.maskrcnn:build", {"weights": str(path), "device": "cpu", "detections_per_img": 7})
    assert isinstance(det, MaskRCNNDetector) and det.model.roi_heads.detections_per_img == 7


def test_nms_threshold_limits_the_overlap_of_kept_boxes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "t.pt", CheckpointMeta("tiny_fpn", ("a",), TILE), build_model("tiny_fpn", 1, TILE).state_dict())
    image = torch.from_numpy(tile_image(0, 0).pixels)
    counts = {}
    for nms in (0.7, 0.1):
        det = build(str(path), device="cpu", score_threshold=0.0, detections_per_img=100, nms_threshold=nms)
        with torch.no_grad():
            boxes = det.model.eval()([image])[0]["boxes"]
        iou = box_iou(boxes, boxes).fill_diagonal_(0.0)
        assert len(boxes) > 1 and float(iou.max()) <= nms + 1e-6
        counts[nms] = len(boxes)
    assert counts[0.1] < counts[0.7]
    with pytest.raises(DetectorError, match="nms_threshold"):
        build(str(path), device="cpu", nms_threshold=0.0)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "tiny_fpn"])
def test_architectures_build_without_downloads(arch: str) -> None:
    model = build_model(arch, 2, 128)
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    assert model.transform.min_size == (128,) and model.transform.max_size == 128


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_amp_matches_cpu_contract(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "g.pt", CheckpointMeta("tiny_fpn", ("a",), TILE), build_model("tiny_fpn", 1, TILE).state_dict())
    det = build(str(path), device="cuda", score_threshold=0.0, amp=True)
    (found,) = det.detect([tile_image(10, 20)])
    assert all(isinstance(i.mask, np.ndarray) and i.mask.dtype == np.bool_ for i in found)
