"""Read the few keys of a Detectron2 YAML config that a converted Mask R-CNN needs, and refuse the rest.

Detectron2 configs are partial: a model-zoo file names a ``_BASE_`` file and leaves every other key at
Detectron2's default (``detectron2/config/defaults.py``). This reader resolves ``_BASE_`` like fvcore's
``CfgNode.load_yaml_with_base`` (relative to the file, merged depth-first, lists replaced), but only for
local files, with ``yaml.safe_load`` (plus ``!!python/tuple``, which ``cfg.dump()`` can write), and
falls back to :data:`DEFAULTS` — Detectron2's defaults for exactly the keys read here. A setting that
changes the network away from what :mod:`geomask.detect.d2_arch` builds (C4 or cascade heads, ResNeXt,
deformable convs, GroupNorm, dilation, a keypoint head, several anchor sizes per level) is refused in one
line naming the key, so a conversion that succeeds is one that computes the same network.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from geomask.detect.d2_arch import Detectron2Arch
from geomask.errors import ConfigError, first_line

#: Detectron2's defaults (``detectron2/config/defaults.py``, 2026 snapshot) for every key read here.
DEFAULTS: dict[str, Any] = {
    "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
    "MODEL.MASK_ON": False,
    "MODEL.KEYPOINT_ON": False,
    "MODEL.LOAD_PROPOSALS": False,
    "MODEL.PIXEL_MEAN": [103.530, 116.280, 123.675],
    "MODEL.PIXEL_STD": [1.0, 1.0, 1.0],
    "INPUT.FORMAT": "BGR",
    "INPUT.MIN_SIZE_TEST": 800,
    "INPUT.MAX_SIZE_TEST": 1333,
    "MODEL.BACKBONE.NAME": "build_resnet_backbone",
    "MODEL.RESNETS.DEPTH": 50,
    "MODEL.RESNETS.OUT_FEATURES": ["res4"],
    "MODEL.RESNETS.NUM_GROUPS": 1,
    "MODEL.RESNETS.NORM": "FrozenBN",
    "MODEL.RESNETS.WIDTH_PER_GROUP": 64,
    "MODEL.RESNETS.STRIDE_IN_1X1": True,
    "MODEL.RESNETS.RES5_DILATION": 1,
    "MODEL.RESNETS.RES2_OUT_CHANNELS": 256,
    "MODEL.RESNETS.STEM_OUT_CHANNELS": 64,
    "MODEL.RESNETS.DEFORM_ON_PER_STAGE": [False, False, False, False],
    "MODEL.FPN.IN_FEATURES": [],
    "MODEL.FPN.OUT_CHANNELS": 256,
    "MODEL.FPN.NORM": "",
    "MODEL.FPN.FUSE_TYPE": "sum",
    "MODEL.PROPOSAL_GENERATOR.NAME": "RPN",
    "MODEL.ANCHOR_GENERATOR.NAME": "DefaultAnchorGenerator",
    "MODEL.ANCHOR_GENERATOR.SIZES": [[32, 64, 128, 256, 512]],
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[0.5, 1.0, 2.0]],
    "MODEL.ANCHOR_GENERATOR.OFFSET": 0.0,
    "MODEL.RPN.HEAD_NAME": "StandardRPNHead",
    "MODEL.RPN.IN_FEATURES": ["res4"],
    "MODEL.RPN.PRE_NMS_TOPK_TEST": 6000,
    "MODEL.RPN.POST_NMS_TOPK_TEST": 1000,
    "MODEL.RPN.NMS_THRESH": 0.7,
    "MODEL.RPN.BBOX_REG_WEIGHTS": [1.0, 1.0, 1.0, 1.0],
    "MODEL.RPN.CONV_DIMS": [-1],
    "MODEL.ROI_HEADS.NAME": "Res5ROIHeads",
    "MODEL.ROI_HEADS.NUM_CLASSES": 80,
    "MODEL.ROI_HEADS.IN_FEATURES": ["res4"],
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.05,
    "MODEL.ROI_HEADS.NMS_THRESH_TEST": 0.5,
    "MODEL.ROI_BOX_HEAD.NAME": "",
    "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS": [10.0, 10.0, 5.0, 5.0],
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 14,
    "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": 0,
    "MODEL.ROI_BOX_HEAD.POOLER_TYPE": "ROIAlignV2",
    "MODEL.ROI_BOX_HEAD.NUM_FC": 0,
    "MODEL.ROI_BOX_HEAD.FC_DIM": 1024,
    "MODEL.ROI_BOX_HEAD.NUM_CONV": 0,
    "MODEL.ROI_BOX_HEAD.NORM": "",
    "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG": False,
    "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE": False,
    "MODEL.ROI_MASK_HEAD.NAME": "MaskRCNNConvUpsampleHead",
    "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION": 14,
    "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO": 0,
    "MODEL.ROI_MASK_HEAD.POOLER_TYPE": "ROIAlignV2",
    "MODEL.ROI_MASK_HEAD.NUM_CONV": 0,
    "MODEL.ROI_MASK_HEAD.CONV_DIM": 256,
    "MODEL.ROI_MASK_HEAD.NORM": "",
    "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK": False,
    "TEST.DETECTIONS_PER_IMAGE": 100,
}
#: Keys whose value must be exactly this for the network to be the one geomask builds.
REQUIRED: dict[str, Any] = {
    "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
    "MODEL.MASK_ON": True,
    "MODEL.KEYPOINT_ON": False,
    "MODEL.LOAD_PROPOSALS": False,
    "MODEL.BACKBONE.NAME": "build_resnet_fpn_backbone",
    "MODEL.RESNETS.OUT_FEATURES": ["res2", "res3", "res4", "res5"],
    "MODEL.RESNETS.NUM_GROUPS": 1,
    "MODEL.RESNETS.WIDTH_PER_GROUP": 64,
    "MODEL.RESNETS.RES5_DILATION": 1,
    "MODEL.RESNETS.RES2_OUT_CHANNELS": 256,
    "MODEL.RESNETS.STEM_OUT_CHANNELS": 64,
    "MODEL.RESNETS.DEFORM_ON_PER_STAGE": [False, False, False, False],
    "MODEL.FPN.IN_FEATURES": ["res2", "res3", "res4", "res5"],
    "MODEL.FPN.OUT_CHANNELS": 256,
    "MODEL.FPN.NORM": "",
    "MODEL.FPN.FUSE_TYPE": "sum",
    "MODEL.PROPOSAL_GENERATOR.NAME": "RPN",
    "MODEL.ANCHOR_GENERATOR.NAME": "DefaultAnchorGenerator",
    "MODEL.RPN.HEAD_NAME": "StandardRPNHead",
    "MODEL.RPN.IN_FEATURES": ["p2", "p3", "p4", "p5", "p6"],
    "MODEL.RPN.CONV_DIMS": [-1],
    "MODEL.ROI_HEADS.NAME": "StandardROIHeads",
    "MODEL.ROI_HEADS.IN_FEATURES": ["p2", "p3", "p4", "p5"],
    "MODEL.ROI_BOX_HEAD.NAME": "FastRCNNConvFCHead",
    "MODEL.ROI_BOX_HEAD.NUM_FC": 2,
    "MODEL.ROI_BOX_HEAD.NUM_CONV": 0,
    "MODEL.ROI_BOX_HEAD.FC_DIM": 1024,
    "MODEL.ROI_BOX_HEAD.NORM": "",
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 7,
    "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE": False,
    "MODEL.ROI_MASK_HEAD.NAME": "MaskRCNNConvUpsampleHead",
    "MODEL.ROI_MASK_HEAD.NUM_CONV": 4,
    "MODEL.ROI_MASK_HEAD.CONV_DIM": 256,
    "MODEL.ROI_MASK_HEAD.NORM": "",
    "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION": 14,
}
#: Batch norm kinds that compute ``(x - mean) / sqrt(var + 1e-5) * w + b`` at inference (all but GroupNorm).
EVAL_BATCH_NORMS = ("FrozenBN", "BN", "SyncBN", "nnSyncBN", "naiveSyncBN")
POOLER_TYPES = {"ROIAlignV2": True, "ROIAlign": False}
MAX_BASE_DEPTH = 8


@dataclass(frozen=True)
class Detectron2Config:
    """What a Detectron2 config says about a Mask R-CNN: the network and its test-time settings.

    Attributes:
        arch: The settings that shape the computation (see :class:`Detectron2Arch`).
        num_classes: ``ROI_HEADS.NUM_CLASSES`` (background excluded).
        input_format: ``INPUT.FORMAT``, ``BGR`` or ``RGB``: the channel order the first conv expects.
        cls_agnostic_bbox_reg: One box regression for all classes (``ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG``).
        cls_agnostic_mask: One mask for all classes (``ROI_MASK_HEAD.CLS_AGNOSTIC_MASK``).
        score_thresh_test: ``ROI_HEADS.SCORE_THRESH_TEST``.
        nms_thresh_test: ``ROI_HEADS.NMS_THRESH_TEST``.
        detections_per_image: ``TEST.DETECTIONS_PER_IMAGE``.
        min_size_test: ``INPUT.MIN_SIZE_TEST``: Detectron2's predictor resizes to it; geomask does not.
        max_size_test: ``INPUT.MAX_SIZE_TEST``.
    """

    arch: Detectron2Arch
    num_classes: int
    input_format: str
    cls_agnostic_bbox_reg: bool
    cls_agnostic_mask: bool
    score_thresh_test: float
    nms_thresh_test: float
    detections_per_image: int
    min_size_test: int
    max_size_test: int


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``!!python/tuple`` (as a list): ``cfg.dump()`` may write it."""


_Loader.add_constructor("tag:yaml.org,2002:python/tuple", lambda loader, node: loader.construct_sequence(node))  # type: ignore[arg-type]


def load_yaml_with_base(path: Path, depth: int = 0) -> dict[str, Any]:
    """Load a Detectron2 YAML file with its ``_BASE_`` files merged under it (local files only)."""
    if depth > MAX_BASE_DEPTH:
        raise ConfigError(f"{path}: _BASE_ files nest more than {MAX_BASE_DEPTH} deep (a cycle?); give the full config from cfg.dump()")
    if not path.is_file():
        raise ConfigError(f"Detectron2 config {path} does not exist; give the config.yaml the model was trained with")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # a SafeLoader subclass
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read Detectron2 config {path} ({first_line(err, 160)}); give a plain YAML file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Detectron2 config {path} is not a YAML mapping; give the config.yaml the model was trained with")
    bases = data.pop("_BASE_", None)
    if bases is None:
        return data
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else list(bases):
        if not isinstance(base, str) or base.startswith(("http://", "https://")) or "://" in base:
            raise ConfigError(
                f"{path}: _BASE_ {base!r} is not a local file; download it beside the config or give the full config from cfg.dump()"
            )
        base_path = Path(base).expanduser()
        _merge(load_yaml_with_base(base_path if base_path.is_absolute() else path.parent / base_path, depth + 1), merged)
    _merge(data, merged)
    return merged


def _merge(src: dict[str, Any], dst: dict[str, Any]) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(value, dst[key])
        else:
            dst[key] = value


def read_detectron2_config(path: str | Path) -> Detectron2Config:
    """Read and check a Detectron2 Mask R-CNN config; unsupported settings raise :class:`ConfigError` naming the key."""
    p = Path(path)
    data = load_yaml_with_base(p)

    def get(key: str) -> Any:
        node: Any = data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return DEFAULTS[key]
            node = node[part]
        return node

    for key, want in REQUIRED.items():
        if _plain(get(key)) != _plain(want):
            raise ConfigError(f"{p}: {key} is {get(key)!r}; geomask converts only Mask R-CNN R50/R101-FPN models, which need {want!r}")
    norm = get("MODEL.RESNETS.NORM")
    if norm not in EVAL_BATCH_NORMS:
        raise ConfigError(f"{p}: MODEL.RESNETS.NORM is {norm!r}; geomask converts batch-norm ResNets only ({', '.join(EVAL_BATCH_NORMS)})")
    depth = get("MODEL.RESNETS.DEPTH")
    if depth not in (50, 101):
        raise ConfigError(f"{p}: MODEL.RESNETS.DEPTH is {depth!r}; geomask converts ResNet-50 and ResNet-101 FPN models")
    input_format = get("INPUT.FORMAT")
    if input_format not in ("BGR", "RGB"):
        raise ConfigError(f"{p}: INPUT.FORMAT is {input_format!r}; geomask converts BGR or RGB models")
    mean, std = _numbers(p, "MODEL.PIXEL_MEAN", get("MODEL.PIXEL_MEAN"), 3), _numbers(p, "MODEL.PIXEL_STD", get("MODEL.PIXEL_STD"), 3)
    if any(s <= 0 for s in std):
        raise ConfigError(f"{p}: MODEL.PIXEL_STD {std} has a value <= 0; fix the config")
    if input_format == "BGR":
        mean, std = mean[::-1], std[::-1]
    arch = Detectron2Arch(
        depth=int(depth),
        stride_in_1x1=_bool(p, "MODEL.RESNETS.STRIDE_IN_1X1", get("MODEL.RESNETS.STRIDE_IN_1X1")),
        pixel_mean_rgb=(mean[0], mean[1], mean[2]),
        pixel_std_rgb=(std[0], std[1], std[2]),
        anchor_sizes=_anchor_sizes(p, get("MODEL.ANCHOR_GENERATOR.SIZES")),
        aspect_ratios=_aspect_ratios(p, get("MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS")),
        anchor_offset=_number(p, "MODEL.ANCHOR_GENERATOR.OFFSET", get("MODEL.ANCHOR_GENERATOR.OFFSET"), 0.0, 1.0),
        rpn_pre_nms_topk=int(_number(p, "MODEL.RPN.PRE_NMS_TOPK_TEST", get("MODEL.RPN.PRE_NMS_TOPK_TEST"), 1)),
        rpn_post_nms_topk=int(_number(p, "MODEL.RPN.POST_NMS_TOPK_TEST", get("MODEL.RPN.POST_NMS_TOPK_TEST"), 1)),
        rpn_nms_thresh=_number(p, "MODEL.RPN.NMS_THRESH", get("MODEL.RPN.NMS_THRESH"), 0.0, 1.0),
        rpn_bbox_reg_weights=_weights4(p, "MODEL.RPN.BBOX_REG_WEIGHTS", get("MODEL.RPN.BBOX_REG_WEIGHTS")),
        box_reg_weights=_weights4(p, "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS", get("MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS")),
        box_pooler_sampling_ratio=int(
            _number(p, "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO", get("MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO"), 0)
        ),
        box_pooler_aligned=_pooler(p, "MODEL.ROI_BOX_HEAD.POOLER_TYPE", get("MODEL.ROI_BOX_HEAD.POOLER_TYPE")),
        mask_pooler_sampling_ratio=int(
            _number(p, "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO", get("MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO"), 0)
        ),
        mask_pooler_aligned=_pooler(p, "MODEL.ROI_MASK_HEAD.POOLER_TYPE", get("MODEL.ROI_MASK_HEAD.POOLER_TYPE")),
    )
    return Detectron2Config(
        arch=arch,
        num_classes=int(_number(p, "MODEL.ROI_HEADS.NUM_CLASSES", get("MODEL.ROI_HEADS.NUM_CLASSES"), 1)),
        input_format=str(input_format),
        cls_agnostic_bbox_reg=_bool(p, "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", get("MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG")),
        cls_agnostic_mask=_bool(p, "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK", get("MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK")),
        score_thresh_test=_number(p, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", get("MODEL.ROI_HEADS.SCORE_THRESH_TEST"), 0.0, 1.0),
        nms_thresh_test=_number(p, "MODEL.ROI_HEADS.NMS_THRESH_TEST", get("MODEL.ROI_HEADS.NMS_THRESH_TEST"), 0.0, 1.0),
        detections_per_image=int(_number(p, "TEST.DETECTIONS_PER_IMAGE", get("TEST.DETECTIONS_PER_IMAGE"), 1)),
        min_size_test=int(_number(p, "INPUT.MIN_SIZE_TEST", get("INPUT.MIN_SIZE_TEST"), 0)),
        max_size_test=int(_number(p, "INPUT.MAX_SIZE_TEST", get("INPUT.MAX_SIZE_TEST"), 0)),
    )


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _number(p: Path, key: str, value: Any, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f"at least {low}"
        raise ConfigError(f"{p}: {key} is {value!r}; it must be a number {bound}")
    return float(value)


def _bool(p: Path, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{p}: {key} is {value!r}; it must be true or false")
    return value


def _numbers(p: Path, key: str, value: Any, n: int) -> tuple[float, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != n:
        raise ConfigError(f"{p}: {key} is {value!r}; it must be a list of {n} numbers")
    return tuple(_number(p, key, v, float("-inf")) for v in value)


def _weights4(p: Path, key: str, value: Any) -> tuple[float, float, float, float]:
    w = _numbers(p, key, value, 4)
    return (w[0], w[1], w[2], w[3])


def _pooler(p: Path, key: str, value: Any) -> bool:
    if value not in POOLER_TYPES:
        raise ConfigError(f"{p}: {key} is {value!r}; geomask converts {' or '.join(POOLER_TYPES)} poolers")
    return POOLER_TYPES[value]


def _anchor_sizes(p: Path, value: Any) -> tuple[float, ...]:
    key = "MODEL.ANCHOR_GENERATOR.SIZES"
    if not isinstance(value, list) or len(value) != 5 or not all(isinstance(v, list) and len(v) == 1 for v in value):
        raise ConfigError(
            f"{p}: {key} is {value!r}; geomask converts one anchor size per FPN level p2..p6, e.g. [[32], [64], [128], [256], [512]]"
        )
    return tuple(_number(p, key, v[0], 1.0) for v in value)


def _aspect_ratios(p: Path, value: Any) -> tuple[float, ...]:
    key = "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS"
    if not isinstance(value, list) or not value or not all(isinstance(v, list) and v for v in value):
        raise ConfigError(f"{p}: {key} is {value!r}; it must be a list of lists of ratios, e.g. [[0.5, 1.0, 2.0]]")
    if len(value) not in (1, 5) or any(_plain(v) != _plain(value[0]) for v in value):
        raise ConfigError(f"{p}: {key} is {value!r}; geomask converts the same aspect ratios at every FPN level")
    return tuple(_number(p, key, r, 1e-6) for r in value[0])
