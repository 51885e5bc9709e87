"""The geomask checkpoint format: round trip, data-only loading, one-line errors for bad weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from geomask.detect.base import load_detector
from geomask.detect.checkpoint import CheckpointMeta, export_half, load_checkpoint, save_checkpoint
from geomask.detect.maskrcnn import build, build_model
from geomask.errors import DetectorError, WeightsError
from geomask.models import BUNDLED_MODEL, MODELS_DIR

META = CheckpointMeta(
    arch="tiny_fpn",
    classes=("building",),
    tile_size_px=64,
    gsd_m=0.3,
    bands=(1, 2, 3),
    normalize_mode="auto",
    percentiles=(2.0, 98.0),
    attribution="test data",
    metrics={"val_f1": 0.5},
    training={"iterations": 3, "torch": torch.__version__},  # a str subclass: must be stored as plain str
)


@pytest.fixture
def tiny_ckpt(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "tiny.pt", META, build_model("tiny_fpn", 1, 64).state_dict())


def test_round_trip(tiny_ckpt: Path) -> None:
    ckpt = load_checkpoint(tiny_ckpt)
    assert ckpt.meta == CheckpointMeta(**{**META.__dict__, "training": {"iterations": 3, "torch": str(torch.__version__)}})
    assert ckpt.num_classes == 1 and ckpt.train_state is None
    torch.manual_seed(0)
    original = build_model("tiny_fpn", 1, 64)
    for key, value in original.state_dict().items():
        assert torch.equal(value, ckpt.state_dict[key]), key
    hints = build(str(tiny_ckpt), device="cpu").hints
    assert (hints.tile_size_px, hints.gsd_m, hints.bands, hints.percentiles) == (64, 0.3, (1, 2, 3), (2.0, 98.0))


def test_half_precision_and_train_state(tmp_path: Path) -> None:
    model = build_model("tiny_fpn", 1, 64)
    opt = torch.optim.AdamW(model.parameters())
    path = save_checkpoint(
        tmp_path / "h.pt", META, model.state_dict(), train_state={"optimizer": opt.state_dict(), "iteration": 7}, half=True
    )
    ckpt = load_checkpoint(path)
    assert ckpt.train_state is not None and ckpt.train_state["iteration"] == 7
    assert all(v.dtype == torch.float16 for v in ckpt.state_dict.values() if v.is_floating_point())
    det = build(str(path), device="cpu")  # fp16 weights load into a float32 model
    assert next(det.model.parameters()).dtype == torch.float32


def test_export_half(tiny_ckpt: Path, tmp_path: Path) -> None:
    out = export_half(tiny_ckpt, tmp_path / "small.pt", metrics={"val_f1": 0.9})
    ckpt = load_checkpoint(out)
    assert ckpt.meta is not None and ckpt.meta.metrics == {"val_f1": 0.9} and ckpt.meta.arch == "tiny_fpn"
    assert out.stat().st_size < 0.6 * tiny_ckpt.stat().st_size


def test_unwritable_destination(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist; create it first"):
        save_checkpoint(tmp_path / "no" / "such" / "m.pt", META, {})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        build(str(tmp_path / "nope.pt"))


def test_corrupt_and_truncated(tmp_path: Path, tiny_ckpt: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(junk)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(tiny_ckpt.read_bytes()[:5000])
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint"):
        build(str(cut))


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": "geomask-checkpoint", "payload": Path("x")}, path)
    with pytest.raises(WeightsError, match=r"pickled Python objects.*Unsupported global: GLOBAL pathlib.PosixPath"):
        load_checkpoint(path)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(WeightsError, match="not a checkpoint"):
        load_checkpoint(path)
    path2 = tmp_path / "dict.pt"
    torch.save({"a": 1}, path2)
    with pytest.raises(WeightsError, match="neither a geomask checkpoint nor a state dict"):
        load_checkpoint(path2)


def test_architecture_mismatch(tmp_path: Path, tiny_ckpt: Path) -> None:
    with pytest.raises(WeightsError, match="holds a 'tiny_fpn' model but arch='resnet18_fpn'"):
        build(str(tiny_ckpt), arch="resnet18_fpn")
    raw = tmp_path / "raw.pt"  # a plain state dict carries no arch: the mismatch shows in its keys/shapes
    torch.save(build_model("tiny_fpn", 1, 64).state_dict(), raw)
    with pytest.raises(WeightsError, match="does not fit architecture 'resnet18_fpn'"):
        build(str(raw), arch="resnet18_fpn")


def test_class_count_mismatch(tiny_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="trained for 1 classes but 2 class names"):
        build(str(tiny_ckpt), classes=["a", "b"])
    raw = tmp_path / "raw3.pt"
    torch.save(build_model("tiny_fpn", 3, 64).state_dict(), raw)
    det = build(str(raw), arch="tiny_fpn", classes=["a", "b", "c"])
    assert det.classes == ("a", "b", "c")


def test_unknown_option_and_bad_values(tiny_ckpt: Path) -> None:
    with pytest.raises(DetectorError, match="rejected its options"):
        load_detector("geomask.detect.maskrcnn:build", {"weights": str(tiny_ckpt), "bogus": 1})
    with pytest.raises(DetectorError, match="score_threshold"):
        build(str(tiny_ckpt), score_threshold=2.0)
    with pytest.raises(DetectorError, match="unknown architecture"):
        build(str(tiny_ckpt), arch="vgg")
    with pytest.raises(DetectorError, match=r"not a torch device|CUDA is not available"):
        build(str(tiny_ckpt), device="tpu" if torch.cuda.is_available() else "cuda")


def test_coco_weights_by_name_from_the_torch_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``weights='coco'`` goes through torchvision's real loader; a locally made file in its cache stands in for the download."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(1)
    model = build_model("resnet50_fpn", 90, 128)
    torch.save(model.state_dict(), cache / MaskRCNN_ResNet50_FPN_Weights.DEFAULT.url.rsplit("/", 1)[-1])
    det = build("coco", device="cpu", tile_size_px=128)
    assert det.classes[0] == "person" and len(det.classes) == 90
    assert torch.equal(det.model.roi_heads.box_predictor.cls_score.weight, model.roi_heads.box_predictor.cls_score.weight)
    with pytest.raises(WeightsError, match="'resnet50_fpn' but arch='resnet18_fpn'"):
        build("coco", arch="resnet18_fpn")


def test_bundled_model() -> None:
    """``build()`` with no weights loads the bundled model, or says clearly that none is installed."""
    if (MODELS_DIR / BUNDLED_MODEL).is_file():
        det = build(device="cpu")
        assert det.classes == ("building",) and det.hints.tile_size_px and det.hints.gsd_m
        assert det.hints.normalize_mode == "auto"
        assert np.isfinite(det.model.roi_heads.score_thresh)
    else:
        with pytest.raises(WeightsError, match="no bundled model"):
            build()


def test_shipped_models_by_name() -> None:
    """``weights: trees`` (or ``buildings``) names a model shipped in the package; checkpoints carry their hints."""
    from geomask.models import BUNDLED_MODELS

    trees = build("trees", device="cpu")
    assert trees.classes == ("tree",) and trees.hints.gsd_m == pytest.approx(0.1) and trees.hints.tile_size_px == 256
    meta = load_checkpoint(MODELS_DIR / BUNDLED_MODELS["trees"]).meta
    assert meta is not None and "NEON" in meta.attribution and meta.metrics["heldout_f1"] > 0.5
    assert build("buildings", device="cpu").classes == ("building",)
    with pytest.raises(WeightsError, match="forest"):  # an unknown name is a (missing) path, with its one-line error
        build("forest")


def test_the_tree_checkpoint_carries_the_settings_of_its_config() -> None:
    """``--weights trees`` alone must give what ``-c configs/trees.yaml`` gives (the card's number)."""
    from geomask.config import load_config
    from geomask.models import BUNDLED_MODELS

    config = load_config(Path(__file__).parents[1] / "configs" / "trees.yaml")
    meta = load_checkpoint(MODELS_DIR / BUNDLED_MODELS["trees"]).meta
    assert meta is not None
    options = config.detector.options
    for key in ("score_threshold", "nms_threshold", "detections_per_img"):
        assert meta.inference[key] == options[key], key
    assert meta.inference["min_area_m2"] == config.vectorize.min_area_m2
    assert meta.inference["shape"] == config.vectorize.shape.method


def test_inference_defaults_round_trip_and_are_used(tmp_path: Path) -> None:
    from geomask.detect.checkpoint import set_inference_defaults

    path = save_checkpoint(
        tmp_path / "d.pt",
        CheckpointMeta("tiny_fpn", ("a",), 64, inference={"score_threshold": 0.7, "tta": 4, "min_area_m2": 2.5, "shape": "poly"}),
        build_model("tiny_fpn", 1, 64).state_dict(),
    )
    meta = load_checkpoint(path).meta
    assert meta is not None and meta.inference == {"score_threshold": 0.7, "tta": 4, "min_area_m2": 2.5, "shape": "poly"}
    assert meta.hints().min_area_m2 == 2.5 and meta.hints().shape == "poly" and meta.hints().simplify_tolerance_m is None
    det = build(str(path), device="cpu")
    assert det.score_threshold == 0.7 and det.tta == 4 and det.model.roi_heads.nms_thresh == 0.5  # unset keys: built-in defaults
    det = build(str(path), device="cpu", score_threshold=0.2, tta=1)  # given options override the checkpoint's
    assert det.score_threshold == 0.2 and det.tta == 1 and det.model.roi_heads.score_thresh == 0.2
    before = load_checkpoint(path).state_dict
    set_inference_defaults(path, path, {"nms_threshold": 0.3, "tta": None})
    after = load_checkpoint(path)
    assert after.meta is not None and after.meta.inference == {
        "score_threshold": 0.7,
        "min_area_m2": 2.5,
        "shape": "poly",
        "nms_threshold": 0.3,
    }
    assert all(torch.equal(before[k], after.state_dict[k]) for k in before)  # weights untouched
    with pytest.raises(WeightsError, match="unknown inference default 'score'"):
        set_inference_defaults(path, path, {"score": 0.3})
    with pytest.raises(WeightsError, match="tta must be an integer"):
        set_inference_defaults(path, path, {"tta": 2.5})
    set_inference_defaults(path, path, {"tta": 3})  # a value the detector rejects fails at build, in one line
    with pytest.raises(DetectorError, match="tta must be one of"):
        build(str(path), device="cpu")
