"""The Mask R-CNN detector's contract: global coordinates, cropped masks, batching, no hidden resize."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from rasterio.windows import Window
from torchvision.ops import box_iou

from geomask.config import DEFAULT_DETECTOR
from geomask.detect.base import Detector, ModelHints, TileImage, load_detector
from geomask.detect.checkpoint import CheckpointMeta, save_checkpoint
from geomask.detect.maskrcnn import ARCHS, MaskRCNNDetector, build, build_model
from geomask.detect.tta import fuse_views
from geomask.errors import DetectorError, WeightsError
from geomask.instances import Instance
from geomask.models import bundled_model_path, detector_options, resolve_factory
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


class _BlobModel(torch.nn.Module):
    """A stand-in Mask R-CNN that is exactly equivariant: instance ``k`` is where channel 1 equals ``k / 10``.

    Its score is the mean of channel 2 over the instance, its mask probability channel 0 there. With
    ``quadrant`` set it only reports instances whose centre lies in the top-left quadrant of its input,
    so a view that moves an object out of that quadrant misses it.
    """

    def __init__(self, quadrant: bool = False):
        super().__init__()
        self.quadrant = quadrant
        self.transform = torch.nn.Module()
        self.transform.min_size, self.transform.max_size = (TILE,), TILE  # type: ignore[assignment]
        self.roi_heads = torch.nn.Module()
        self.roi_heads.score_thresh, self.roi_heads.detections_per_img = 0.0, 100  # type: ignore[assignment]

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        outs = []
        for image in images:
            ids = torch.round(image[1] * 10).long()
            masks, scores = [], []
            for k in range(1, 10):
                m = ids == k
                if not m.any():
                    continue
                rows, cols = torch.nonzero(m, as_tuple=True)
                if self.quadrant and not (rows.float().mean() < image.shape[1] / 2 and cols.float().mean() < image.shape[2] / 2):
                    continue
                score = float(image[2][m].mean())
                if score >= float(self.roi_heads.score_thresh):
                    masks.append(torch.where(m, image[0], 0.0))
                    scores.append(score)
            n = len(masks)
            outs.append(
                {
                    "masks": torch.stack(masks)[:, None] if n else torch.zeros((0, 1, *image.shape[1:])),
                    "scores": torch.tensor(scores),
                    "labels": torch.ones(n, dtype=torch.int64),
                    "boxes": torch.zeros((n, 4)),
                }
            )
        return outs


def _blob_scene() -> TileImage:
    """Three objects of different shapes, scores and mask probabilities, none of them symmetric."""
    pixels = np.zeros((3, TILE, TILE), dtype=np.float32)
    for k, (r0, r1, c0, c1), score in ((1, (4, 12, 6, 30), 0.9), (2, (40, 60, 35, 42), 0.7), (3, (20, 34, 44, 60), 0.55)):
        pixels[0, r0:r1, c0:c1] = 0.8
        pixels[0, r0, c0:c1] = 0.6
        pixels[1, r0:r1, c0:c1] = k / 10
        pixels[2, r0:r1, c0:c1] = score
    pixels[1:, 20:24, 44:48] = 0.0  # a notch: object 3 is not a rectangle
    pixels[0, 20:24, 44:48] = 0.0
    win = Window(100, 200, TILE, TILE)
    return TileImage(Tile(0, 0, 0, win, win, None), pixels, np.ones((TILE, TILE), dtype=bool))


def _summary(found: list[Instance]) -> list[tuple[int, int, tuple[int, ...], float]]:
    return sorted((i.row_off, i.col_off, i.mask.shape, round(i.score, 6)) for i in found)


@pytest.mark.parametrize("tta", [4, 8])
def test_tta_of_an_equivariant_model_equals_no_tta(tta: int) -> None:
    image = _blob_scene()
    plain = MaskRCNNDetector(_BlobModel(), ("a",), ModelHints(), "blob", torch.device("cpu"), 0.5, 0.5, False)  # type: ignore[arg-type]
    fused = MaskRCNNDetector(_BlobModel(), ("a",), ModelHints(), "blob", torch.device("cpu"), 0.5, 0.5, False, tta)  # type: ignore[arg-type]
    (a,), (b,) = plain.detect([image]), fused.detect([image])
    assert len(a) == 3 and _summary(a) == _summary(b)
    for x, y in zip(sorted(a, key=lambda i: i.row_off), sorted(b, key=lambda i: i.row_off), strict=True):
        assert (x.mask == y.mask).all()


def test_tta_down_weights_an_object_seen_in_few_views() -> None:
    """Each object lies in another quadrant, so exactly one of the 4 flip views sees it: every score is quartered."""
    image = _blob_scene()
    det = MaskRCNNDetector(_BlobModel(quadrant=True), ("a",), ModelHints(), "blob", torch.device("cpu"), 0.1, 0.5, False, 4)  # type: ignore[arg-type]
    (found,) = det.detect([image])
    assert sorted(round(i.score, 6) for i in found) == [round(s / 4, 6) for s in (0.55, 0.7, 0.9)]
    det.score_threshold = 0.2  # a threshold above a quartered score drops that object
    assert [round(i.score, 6) for i in det.detect([image])[0]] == [round(0.9 / 4, 6)]


def _blob(threshold: float, tta: int = 1, members: tuple[torch.nn.Module, ...] = ()) -> MaskRCNNDetector:
    return MaskRCNNDetector(_BlobModel(), ("a",), ModelHints(), "blob", torch.device("cpu"), threshold, 0.5, False, tta, None, members)  # type: ignore[arg-type]


@pytest.mark.parametrize("tta", [1, 4])
def test_an_ensemble_of_a_model_with_itself_equals_the_model(tta: int) -> None:
    image = _blob_scene()
    (a,), (b,) = _blob(0.5, tta).detect([image]), _blob(0.5, tta, (_BlobModel(), _BlobModel())).detect([image])
    assert len(a) == 3 and _summary(a) == _summary(b)
    for x, y in zip(sorted(a, key=lambda i: i.row_off), sorted(b, key=lambda i: i.row_off), strict=True):
        assert (x.mask == y.mask).all()


def test_an_ensemble_down_weights_what_only_some_members_see() -> None:
    """The member sees only object 1 (top-left): objects 2 and 3 keep half their score, and 3 falls under 0.3."""
    det = _blob(0.3, 1, (_BlobModel(quadrant=True),))
    assert det.views == 2 and all(m.roi_heads.score_thresh == 0.15 for m in det.models)  # each keeps down to half
    (found,) = det.detect([_blob_scene()])
    assert sorted(round(i.score, 6) for i in found) == [0.35, 0.9]


def test_build_an_ensemble_from_checkpoints(tmp_path: Path, detector: MaskRCNNDetector) -> None:
    torch.manual_seed(1)  # another initialisation than the fixture's (seed 0)
    main = save_checkpoint(tmp_path / "a.pt", CheckpointMeta("tiny_fpn", ("thing",), TILE), detector.model.state_dict())
    other = save_checkpoint(tmp_path / "b.pt", CheckpointMeta("tiny_fpn", ("thing",), TILE), build_model("tiny_fpn", 1, TILE).state_dict())
    opts = {"device": "cpu", "score_threshold": 0.0, "mask_threshold": 0.3, "detections_per_img": 50}
    image = tile_image(64, 128, seed=3)
    (alone,) = build(str(main), **opts).detect([image])  # type: ignore[arg-type]
    twice = build(str(main), ensemble=[str(main)], **opts)  # type: ignore[arg-type]
    assert twice.name.endswith("a.pt+1") and len(twice.members) == 1
    assert _summary(twice.detect([image])[0]) == _summary(alone)
    mixed = build(str(main), ensemble=str(other), **opts)  # type: ignore[arg-type]
    assert _summary(mixed.detect([image])[0]) != _summary(alone)  # another model's votes change the result
    for meta, needle in (
        (CheckpointMeta("tiny_fpn", ("thing",), 32), "tile_size_px=32"),
        (CheckpointMeta("tiny_fpn", ("thing",), TILE, gsd_m=0.3), "gsd_m=0.3"),
    ):
        bad = save_checkpoint(tmp_path / "bad.pt", meta, detector.model.state_dict())
        with pytest.raises(WeightsError, match=f"ensemble member .*bad.pt was trained with {needle}"):
            build(str(main), ensemble=[str(bad)], **opts)  # type: ignore[arg-type]
    two = save_checkpoint(tmp_path / "two.pt", CheckpointMeta("tiny_fpn", ("x", "y"), TILE), build_model("tiny_fpn", 2, TILE).state_dict())
    with pytest.raises(WeightsError, match="has 2 classes"):
        build(str(main), ensemble=[str(two)], **opts)  # type: ignore[arg-type]


def test_ensemble_members_are_paths_and_part_of_the_model_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rules = detector_options(DEFAULT_DETECTOR)
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    monkeypatch.chdir(tmp_path)  # the flags name files relative to here
    options = rules.with_flags({}, {"weights": "a.pt", "ensemble": ["b.pt", "trees"]})
    assert options == {"weights": str(a), "ensemble": [str(b), "trees"]}  # files made absolute, names kept
    files = rules.model_files(options)
    assert files[-2:] == [b, a] and bundled_model_path("trees") in files  # a shipped member by name counts too
    with pytest.raises(DetectorError, match="ONNX weights run alone"):
        resolve_factory(DEFAULT_DETECTOR, {"weights": "m.onnx", "ensemble": [str(b)]})


def test_fuse_views_votes_masks() -> None:
    """Two of three views put a pixel in the mask: its mean probability decides, and the score is averaged."""
    m = torch.zeros((1, 1, 4, 4))
    m[0, 0, :2, :2] = 0.9
    grown = m.clone()
    grown[0, 0, 2, :2] = 0.9
    views = [{"masks": x, "scores": torch.tensor([s]), "labels": torch.tensor([1])} for x, s in ((m, 0.9), (grown, 0.6), (grown, 0.3))]
    out = fuse_views(views, 0.1, 0.5, 10)
    assert out["masks"].shape == (1, 1, 4, 4) and float(out["scores"][0]) == pytest.approx(0.6)
    assert ((out["masks"][0, 0] >= 0.5) == (grown[0, 0] > 0)).all()  # row 2: 0.6 mean probability, kept
    other_class = [*views[:2], {"masks": grown, "scores": torch.tensor([0.3]), "labels": torch.tensor([2])}]
    assert fuse_views(other_class, 0.0, 0.5, 10)["labels"].tolist() == [1, 2]  # classes never merge


def test_tta_with_a_real_model(detector: MaskRCNNDetector) -> None:
    image = tile_image(64, 128, h=50, w=TILE)
    det = MaskRCNNDetector(detector.model, detector.classes, detector.hints, "t", torch.device("cpu"), 0.0, 0.3, False, 8)
    (found,) = det.detect([image])
    assert found and all(i.score <= 1.0 for i in found) and len(found) <= 50
    for inst in found:  # mapped back into the tile, inside its valid (unpadded) part
        assert (
            inst.row_off >= 64 and inst.row_off + inst.height <= 64 + 50 and inst.col_off >= 128 and inst.col_off + inst.width <= 128 + TILE
        )
    with pytest.raises(DetectorError, match="tta must be one of"):
        build(None, device="cpu", tta=3)


def _train_step_and_round_trip(model: torch.nn.Module, arch: str, tmp_path: Path) -> None:
    """One training forward has finite losses; the weights saved as a checkpoint predict through ``build``."""
    model.train()
    target = {
        "boxes": torch.tensor([[8.0, 8.0, 40.0, 30.0]]),
        "labels": torch.tensor([1]),
        "masks": torch.zeros((1, 64, 64), dtype=torch.uint8),
    }
    target["masks"][0, 8:30, 8:40] = 1
    losses = model([torch.rand(3, 64, 64)], [target])
    assert {"loss_classifier", "loss_mask"} <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    path = save_checkpoint(tmp_path / f"{arch}.pt", CheckpointMeta(arch, ("a",), 64), model.state_dict())
    det = build(str(path), device="cpu", score_threshold=0.0, detections_per_img=5)
    assert det.name.startswith(f"maskrcnn-{arch}") and len(det.detect([tile_image(0, 0)])) == 1


def test_resnet101_fpn_forward_and_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("resnet101_fpn", 1, 64, detections_per_img=5)
    assert sum(p.numel() for p in model.backbone.body.parameters()) > 40_000_000  # ResNet-101, not 50
    _train_step_and_round_trip(model, "resnet101_fpn", tmp_path)


def test_resnet18_gn_fpn_normalises_each_image_alone_and_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18_gn_fpn", 1, 64, detections_per_img=5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules()) > 20  # backbone, FPN and mask head
    model.train()
    # In training, an image's features do not depend on the other images of its batch (they would with batch norm).
    a, b = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64) * 0.2
    alone = model.backbone(a)["0"]
    together = model.backbone(torch.cat([a, b]))["0"][:1]
    assert torch.allclose(alone, together, atol=1e-5)
    _train_step_and_round_trip(model, "resnet18_gn_fpn", tmp_path)
