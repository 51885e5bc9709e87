"""``geomask import-model detectron2``: a Detectron2-style checkpoint converts, loads, runs; bad ones fail in one line.

The Detectron2 names and shapes come from a real Detectron2 Mask R-CNN R50-FPN (2 classes), written
once to ``tests/data/detectron2_mask_rcnn_R_50_FPN_2classes.json`` by building the model from a
Detectron2 source snapshot (``bench/detectron2_reference.py`` checks the converted model against
Detectron2 itself; CI has no Detectron2). Values are random, except the heads, which are set so that
the class order and the per-class mask channel are visible in the output: every proposal scores
softmax([3, 0, -3]) with Detectron2's background last, and only class 0's mask channel is on.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window

from geomask.detect.base import TileImage
from geomask.detect.checkpoint import load_checkpoint
from geomask.detect.d2_arch import Detectron2Anchors, Detectron2Arch, build_detectron2_model, paste_masks
from geomask.detect.d2_config import read_detectron2_config
from geomask.detect.d2_import import (
    convert_state_dict,
    detectron2_name,
    import_detectron2,
    load_detectron2_weights,
    torchvision_name,
)
from geomask.detect.maskrcnn import build
from geomask.errors import ConfigError, WeightsError
from geomask.tiling import Tile
from tests.helpers import write_raster
from workflows.cli import main

pytestmark = pytest.mark.slow  # a ResNet-50 Mask R-CNN built and run several times: about a minute on two free cores

ROOT = Path(__file__).resolve().parents[1]
SHAPES: dict[str, list[int]] = json.loads((ROOT / "tests/data/detectron2_mask_rcnn_R_50_FPN_2classes.json").read_text())
SAMPLE = ROOT / "examples/sample_nairobi.tif"
#: Detectron2's Base-RCNN-FPN.yaml and mask_rcnn_R_50_FPN_3x.yaml, as the model zoo has them (the keys this reader uses).
BASE_FPN = """MODEL:
  META_ARCHITECTURE: "GeneralizedRCNN"
  BACKBONE:
    NAME: "build_resnet_fpn_backbone"
  RESNETS:
    OUT_FEATURES: ["res2", "res3", "res4", "res5"]
  FPN:
    IN_FEATURES: ["res2", "res3", "res4", "res5"]
  ANCHOR_GENERATOR:
    SIZES: [[32], [64], [128], [256], [512]]
    ASPECT_RATIOS: [[0.5, 1.0, 2.0]]
  RPN:
    IN_FEATURES: ["p2", "p3", "p4", "p5", "p6"]
    PRE_NMS_TOPK_TEST: 1000
    POST_NMS_TOPK_TEST: 1000
  ROI_HEADS:
    NAME: "StandardROIHeads"
    IN_FEATURES: ["p2", "p3", "p4", "p5"]
  ROI_BOX_HEAD:
    NAME: "FastRCNNConvFCHead"
    NUM_FC: 2
    POOLER_RESOLUTION: 7
  ROI_MASK_HEAD:
    NAME: "MaskRCNNConvUpsampleHead"
    NUM_CONV: 4
    POOLER_RESOLUTION: 14
VERSION: 2
"""
R50 = """_BASE_: "Base-RCNN-FPN.yaml"
MODEL:
  MASK_ON: True
  RESNETS:
    DEPTH: 50
  ROI_HEADS:
    NUM_CLASSES: 2
    SCORE_THRESH_TEST: 0.3
TEST:
  DETECTIONS_PER_IMAGE: 50
"""
SCORE = math.exp(3) / (math.exp(3) + 1 + math.exp(-3))  # softmax([3, 0, -3])[0]


def detectron2_state(seed: int = 0) -> dict[str, np.ndarray]:
    """A Detectron2 R50-FPN Mask R-CNN state dict (numpy, as detectree2 ships them) with the heads described above."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in SHAPES.items():
        if key.endswith(("running_var", "norm.weight")):
            value = rng.uniform(0.8, 1.2, shape)
        elif key.endswith(("norm.bias", "running_mean")):
            value = rng.normal(0.0, 0.05, shape)
        elif key.endswith(".weight") and len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            value = rng.normal(0.0, math.sqrt(1.0 / fan_in), shape)
        else:
            value = rng.normal(0.0, 0.01, shape)
        state[key] = value.astype(np.float32)
    state["roi_heads.box_predictor.cls_score.weight"][:] = 0.0
    state["roi_heads.box_predictor.cls_score.bias"][:] = [3.0, 0.0, -3.0]  # class 0, class 1, background (last)
    state["roi_heads.box_predictor.bbox_pred.weight"][:] = 0.0
    state["roi_heads.box_predictor.bbox_pred.bias"][:] = 0.0
    state["roi_heads.mask_head.predictor.weight"][:] = 0.0
    state["roi_heads.mask_head.predictor.bias"][:] = [6.0, -6.0]  # class 0's mask fills its box, class 1's is empty
    state["proposal_generator.rpn_head.objectness_logits.weight"] *= 100.0  # spread objectness: distinct proposals
    return state


def write_config(folder: Path, body: str = R50) -> Path:
    (folder / "Base-RCNN-FPN.yaml").write_text(BASE_FPN)
    path = folder / "config.yaml"
    path.write_text(body)
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(Detectron2 .pth, its config, the geomask checkpoint converted from them)."""
    d = tmp_path_factory.mktemp("d2")
    weights = d / "model_final.pth"
    torch.save({"model": detectron2_state(), "iteration": 10, "__author__": "test"}, weights)
    config = write_config(d)
    out = d / "converted.pt"
    import_detectron2(weights, config, out, classes=["tree", "shrub"], tile_size_px=128, gsd_m=0.1, attribution="test weights")
    return weights, config, out


def sample_tile(size: int = 128) -> TileImage:
    with rasterio.open(SAMPLE) as src:
        data = src.read([1, 2, 3], window=Window(200, 200, size, size)).astype(np.float32) / 255
    win = Window(200, 200, size, size)
    return TileImage(Tile(0, 0, 0, win, win, None), data, np.ones((size, size), bool))


def test_names_map_both_ways_onto_the_torchvision_model() -> None:
    own = build_detectron2_model(Detectron2Arch(), 2, 128, 10).state_dict()
    mapped = {torchvision_name(k) for k in SHAPES if not k.startswith(("pixel_", "proposal_generator.anchor_generator"))}
    assert mapped == set(own)  # every weight has a place and every place a weight
    assert all(detectron2_name(str(torchvision_name(k))) == k for k in SHAPES)
    assert torchvision_name("roi_heads.keypoint_head.conv_fcn1.weight") is None


def test_converted_model_runs_with_detectron2s_class_order_and_masks(converted: tuple[Path, Path, Path]) -> None:
    _, _, out = converted
    det = build(str(out), device="cpu")
    assert det.classes == ("tree", "shrub")
    assert det.score_threshold == pytest.approx(0.3)  # the config's SCORE_THRESH_TEST travelled as a default
    assert det.model.roi_heads.detections_per_img == 50
    found = det.detect([sample_tile()])[0]
    assert found, "no detections: the heads lost their class order or mask channel"
    # Background last in Detectron2: had it not moved to torchvision's index 0, these would score ~0.05 or be background.
    assert {i.class_id for i in found} == {0}
    assert all(abs(i.score - SCORE) < 1e-4 for i in found)
    # The mask channel of class 0 (on) is used, not a background row or class 1's (off): masks fill their boxes.
    assert np.mean([i.mask.mean() for i in found]) > 0.9


def test_metadata_round_trips(converted: tuple[Path, Path, Path]) -> None:
    weights, config, out = converted
    meta = load_checkpoint(out).meta
    assert meta is not None
    assert meta.arch == "detectron2_resnet50_fpn" and meta.classes == ("tree", "shrub")
    assert meta.tile_size_px == 128 and meta.gsd_m == 0.1 and meta.attribution == "test weights"
    assert meta.inference == {"score_threshold": 0.3, "nms_threshold": 0.5, "detections_per_img": 50}
    arch = Detectron2Arch.from_dict(meta.arch_options, str(out))
    assert arch == read_detectron2_config(config).arch
    assert arch.pixel_mean_rgb == (123.675, 116.28, 103.53)  # Detectron2's BGR mean, reordered
    assert meta.training["converted_from"] == "detectron2" and meta.training["input_format"] == "BGR"
    assert meta.training["checkpoint_sha256"] == __import__("hashlib").sha256(weights.read_bytes()).hexdigest()


def test_bgr_first_conv_is_reordered_and_heads_are_padded(tmp_path: Path) -> None:
    state = {k: torch.from_numpy(v) for k, v in detectron2_state().items()}
    bgr = convert_state_dict(state, read_detectron2_config(write_config(tmp_path)), "x")
    rgb = convert_state_dict(state, read_detectron2_config(write_config(tmp_path, R50 + "INPUT:\n  FORMAT: RGB\n")), "x")
    conv1 = state["backbone.bottom_up.stem.conv1.weight"]
    assert torch.equal(bgr["backbone.body.conv1.weight"], conv1.flip(1)) and torch.equal(rgb["backbone.body.conv1.weight"], conv1)
    assert bgr["roi_heads.box_predictor.cls_score.bias"].tolist() == [-3.0, 3.0, 0.0]
    assert bgr["roi_heads.box_predictor.bbox_pred.weight"].shape == (12, 1024)
    assert bgr["roi_heads.mask_predictor.mask_fcn_logits.bias"].tolist() == [0.0, 6.0, -6.0]


def test_onnx_export_is_refused_in_one_line(converted: tuple[Path, Path, Path], tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from geomask.detect.onnx_export import export_onnx

    with pytest.raises(WeightsError, match=r"converted detectron2_resnet50_fpn model, which export-model does not support"):
        export_onnx(str(converted[2]), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_predict_runs_the_converted_checkpoint(converted: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, _, out = converted
    with rasterio.open(SAMPLE) as src:
        crop = src.read([1, 2, 3], window=Window(200, 200, 160, 160))
        transform = src.window_transform(Window(200, 200, 160, 160))
        crs = src.crs.to_string()
    raster = write_raster(tmp_path / "crop.tif", crop, transform=transform, crs=crs)
    gpkg = tmp_path / "out.gpkg"
    main(["predict", str(raster), "-o", str(gpkg), "--weights", str(out), "--device", "cpu", "--serial"])

    frame = gpd.read_file(gpkg)
    assert len(frame) > 0 and set(frame["class"]) == {"tree"}


def test_missing_keys_are_named_in_one_line_and_cli_exits_2(
    converted: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, config, _ = converted
    state = detectron2_state()
    del state["roi_heads.mask_head.deconv.weight"], state["backbone.bottom_up.res3.0.conv2.norm.running_var"]
    bad = tmp_path / "bad.pth"
    torch.save({"model": state}, bad)
    with pytest.raises(WeightsError) as err:
        import_detectron2(bad, config, tmp_path / "x.pt")
    message = str(err.value)
    assert "\n" not in message and "lacks 2 weights" in message
    assert "roi_heads.mask_head.deconv.weight" in message and "backbone.bottom_up.res3.0.conv2.norm.running_var" in message
    out = tmp_path / "cli.pt"
    with pytest.raises(SystemExit) as exit_info:
        main(["import-model", "detectron2", str(bad), "--config", str(config), "-o", str(out)])
    assert exit_info.value.code == 2 and not out.exists()
    assert "lacks 2 weights" in capsys.readouterr().err


def test_cli_converts_and_refuses_to_overwrite(
    converted: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights, config, _ = converted
    out = tmp_path / "m.pt"
    main(
        [
            "import-model",
            "detectron2",
            str(weights),
            "--config",
            str(config),
            "-o",
            str(out),
            "--classes",
            "tree, shrub",
            "--tile-size",
            "256",
        ]
    )
    meta = load_checkpoint(out).meta
    assert meta is not None and meta.classes == ("tree", "shrub") and meta.tile_size_px == 256
    with pytest.raises(SystemExit) as exit_info:
        main(["import-model", "detectron2", str(weights), "--config", str(config), "-o", str(out)])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["import-model", "detectron2", str(weights), "--config", str(config), "-o", str(tmp_path / "n.pt"), "--classes", "one"])
    assert exit_info.value.code == 2 and "1 class names given but the model has 2 classes" in capsys.readouterr().err


def test_wrong_class_count_and_unexpected_heads_are_refused(tmp_path: Path) -> None:
    state = {k: torch.from_numpy(v) for k, v in detectron2_state().items()}
    three = read_detectron2_config(write_config(tmp_path, R50.replace("NUM_CLASSES: 2", "NUM_CLASSES: 3")))
    with pytest.raises(WeightsError, match=r"has 2 classes but the config says MODEL.ROI_HEADS.NUM_CLASSES: 3; set it to 2"):
        convert_state_dict(state, three, "m.pth")
    extra = {**state, "roi_heads.keypoint_head.conv_fcn1.weight": torch.zeros(1)}
    with pytest.raises(WeightsError, match=r"has 1 weights a Mask R-CNN R50-FPN does not: roi_heads.keypoint_head.conv_fcn1.weight"):
        convert_state_dict(extra, read_detectron2_config(write_config(tmp_path)), "m.pth")
    r101 = read_detectron2_config(write_config(tmp_path, R50.replace("DEPTH: 50", "DEPTH: 101")))
    with pytest.raises(
        WeightsError, match=r"lacks 255 weights of a Detectron2 Mask R-CNN R101-FPN: backbone.bottom_up.res4.6.conv1.weight"
    ):
        convert_state_dict(state, r101, "m.pth")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("MODEL:\n  MASK_ON: True\n", r"MODEL.BACKBONE.NAME is 'build_resnet_backbone'; geomask converts only Mask R-CNN R50/R101-FPN"),
        (R50.replace("DEPTH: 50", "DEPTH: 50\n    NUM_GROUPS: 32"), r"MODEL.RESNETS.NUM_GROUPS is 32"),
        (R50.replace("DEPTH: 50", "DEPTH: 50\n    NORM: GN"), r"MODEL.RESNETS.NORM is 'GN'; geomask converts batch-norm ResNets only"),
        (R50.replace("DEPTH: 50", "DEPTH: 152"), r"MODEL.RESNETS.DEPTH is 152"),
        (R50.replace("MASK_ON: True", "MASK_ON: False"), r"MODEL.MASK_ON is False"),
        (R50 + "INPUT:\n  FORMAT: L\n", r"INPUT.FORMAT is 'L'"),
        (
            R50.replace("MASK_ON: True", "MASK_ON: True\n  ANCHOR_GENERATOR:\n    SIZES: [[32, 64, 128, 256, 512]]"),
            r"one anchor size per FPN level",
        ),
        ('_BASE_: "https://example.org/Base-RCNN-FPN.yaml"\n', r"_BASE_ 'https://example.org/Base-RCNN-FPN.yaml' is not a local file"),
        ('_BASE_: "missing.yaml"\n', r"missing.yaml does not exist"),
        ("MODEL: !!python/object/apply:os.system ['true']\n", r"cannot read Detectron2 config .*; give a plain YAML file"),
    ],
)
def test_unsupported_configs_are_refused_naming_the_key(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        read_detectron2_config(write_config(tmp_path, body))
    assert "\n" not in str(err.value)


def test_config_base_resolution_and_defaults(tmp_path: Path) -> None:
    cfg = read_detectron2_config(
        write_config(tmp_path, R50.replace("MASK_ON: True", "MASK_ON: True\n  PIXEL_STD: !!python/tuple [57.375, 57.12, 58.395]"))
    )
    assert cfg.num_classes == 2 and cfg.arch.depth == 50 and cfg.arch.stride_in_1x1
    assert cfg.arch.pixel_std_rgb == (58.395, 57.12, 57.375)  # BGR reordered; the tuple tag cfg.dump() writes is read
    assert cfg.arch.anchor_sizes == (32, 64, 128, 256, 512) and cfg.arch.rpn_pre_nms_topk == 1000  # the base's, not the default 6000
    assert cfg.score_thresh_test == 0.3 and cfg.nms_thresh_test == 0.5 and cfg.detections_per_image == 50
    assert cfg.arch.box_reg_weights == (10.0, 10.0, 5.0, 5.0) and cfg.arch.box_pooler_aligned and cfg.arch.box_pooler_sampling_ratio == 0


class _RunsCode:
    """Pickles as a call of ``subprocess.run``: a loader that honours it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[list[str]]]:
        return subprocess.run, (["touch", str(self.marker)],)


class _CallsSystem(_RunsCode):
    def __reduce__(self) -> tuple[object, tuple[str]]:  # type: ignore[override]
        return os.system, (f"touch {self.marker}",)


def test_weights_are_read_as_data_only(tmp_path: Path) -> None:
    state = {k: v for k, v in list(detectron2_state().items())[:5]}
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    marker = tmp_path / "ran"
    # Detectron2's model zoo: a plain pickle of numpy arrays, here with code-running objects beside the model.
    pkl = tmp_path / "model.pkl"
    pkl.write_bytes(pickle.dumps({"model": state, "__author__": "zoo", "extra": _RunsCode(marker), "more": _CallsSystem(marker)}))
    loaded = load_detectron2_weights(pkl)
    assert list(loaded) == list(state) and torch.equal(loaded[next(iter(state))], next(iter(tensors.values())))
    # A Detectron2 training checkpoint: torch.save with objects (optimizer, scheduler) beside the model.
    pth = tmp_path / "model.pth"
    torch.save({"model": tensors, "scheduler": _RunsCode(marker), "iteration": 7}, pth)
    assert list(load_detectron2_weights(pth)) == list(state)
    assert not marker.exists()
    # An object inside the model entry is refused, still without running it; os.system is refused outright.
    torch.save({"model": {**tensors, "evil": _RunsCode(marker)}}, pth)
    with pytest.raises(WeightsError, match=r"model entry 'evil' is a .*, not an array"):
        load_detectron2_weights(pth)
    torch.save({"model": tensors, "scheduler": _CallsSystem(marker)}, pth)
    with pytest.raises(WeightsError, match=r"refers to a blocked system function .*posix.system"):
        load_detectron2_weights(pth)
    assert not marker.exists()
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x80\x04not a pickle at all")
    with pytest.raises(WeightsError, match="is not a readable Detectron2 checkpoint"):
        load_detectron2_weights(junk)


def test_anchors_are_detectron2s() -> None:
    gen = Detectron2Anchors((32.0, 64.0, 128.0, 256.0, 512.0), (0.5, 1.0, 2.0), 0.0)
    w = math.sqrt(32 * 32 / 0.5)  # Detectron2: area size², w = sqrt(area / ratio), h = ratio * w; not rounded
    assert gen.cell_anchors[0][0].tolist() == pytest.approx([-w / 2, -w / 4, w / 2, w / 4])
    from torchvision.models.detection.image_list import ImageList

    # 480 px: p6 is 8 cells (ceil(15 / 2)); torchvision would infer a stride of 480 // 8 = 60, Detectron2's is 64.
    feats = [torch.zeros(1, 1, n, n) for n in (120, 60, 30, 15, 8)]
    anchors = gen(ImageList(torch.zeros(1, 3, 480, 480), [(480, 480)]), feats)[0]
    last = anchors[-1] - gen.cell_anchors[4][-1]
    assert last[:2].tolist() == [7 * 64.0, 7 * 64.0]
    shifted = Detectron2Anchors((32.0, 64.0, 128.0, 256.0, 512.0), (1.0,), 0.5)(ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)]), feats)[0]
    assert shifted[0].tolist() == pytest.approx([2.0 - 16, 2.0 - 16, 2.0 + 16, 2.0 + 16])  # centre at offset × stride


def test_masks_are_pasted_at_pixel_centres() -> None:
    box = torch.tensor([[10.3, 20.6, 30.2, 40.9]])
    pasted = paste_masks(torch.ones(1, 1, 28, 28), box, (64, 64))[0, 0] >= 0.5
    centres = torch.arange(64) + 0.5
    inside_x = (centres >= 10.3) & (centres <= 30.2)
    inside_y = (centres >= 20.6) & (centres <= 40.9)
    assert torch.equal(pasted, inside_y[:, None] & inside_x[None, :])
