"""Mask R-CNN architectures as builders (no weights, no downloads) and weights loaded into them.

``resnet50_fpn`` (torchvision v1, the COCO weights' shape), ``resnet50_fpn_v2``, ``resnet101_fpn`` (v1
heads on ResNet-101, for ImageNet-initialised training), ``tiny_fpn`` (tests) and ``resnet18_fpn``, a
CPU-friendly model for training from scratch (trainable ``BatchNorm2d``, because frozen batch norm
without pretrained statistics is wrong from scratch; 128-channel FPN and mask head; anchors from 16 px
because objects at 0.3 m are small), and ``resnet18_gn_fpn``, the same with GroupNorm in the backbone,
FPN and mask head. Converted Detectron2 models (:data:`IMPORTED_ARCHS`, from
``geomask import-model``) are built by :mod:`geomask.detect.d2_arch` from the checkpoint's
``arch_options``; they predict but are not trained here. The detector (:mod:`geomask.detect.maskrcnn`) and training
(:mod:`geomask.detect.training`) build their models here.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from geomask.detect.d2_arch import DETECTRON2_ARCHS, Detectron2Arch, build_detectron2_model
from geomask.errors import DetectorError, WeightsError

#: ``tiny_fpn`` is a few-hundred-thousand-parameter model for tests and demos: it learns simple shapes in seconds.
ARCHS = ("resnet50_fpn", "resnet50_fpn_v2", "resnet101_fpn", "resnet18_fpn", "resnet18_gn_fpn", "tiny_fpn")
#: Architectures that predict but are not trained here: converted Detectron2 models (``geomask import-model``).
IMPORTED_ARCHS = tuple(DETECTRON2_ARCHS.values())
#: Names accepted as ``weights`` for torchvision's COCO weights (downloaded on first use when online).
COCO_WEIGHTS = {"coco": "resnet50_fpn", "coco_v2": "resnet50_fpn_v2"}
DEFAULT_TILE_SIZE_PX = 512


def build_model(
    arch: str,
    num_classes: int,
    tile_size_px: int = DEFAULT_TILE_SIZE_PX,
    detections_per_img: int = 300,
    arch_options: dict[str, Any] | None = None,
) -> MaskRCNN:
    """Build an untrained Mask R-CNN (no downloads) for ``num_classes`` object classes.

    Args:
        arch: One of :data:`ARCHS` or :data:`IMPORTED_ARCHS`.
        num_classes: Object classes, background excluded.
        tile_size_px: Input side; ``min_size`` and ``max_size`` are set to it so nothing is resized.
        detections_per_img: Upper bound on instances per tile (dense scenes need hundreds).
        arch_options: The checkpoint's ``arch_options`` (an imported architecture's settings).
    """
    if arch in IMPORTED_ARCHS:
        spec = Detectron2Arch.from_dict(arch_options or {}, arch)
        if spec.arch != arch:
            raise WeightsError(f"arch {arch!r} does not match its options (ResNet-{spec.depth}); re-convert the model")
        return build_detectron2_model(spec, num_classes, tile_size_px, detections_per_img)
    common: dict[str, Any] = {
        "num_classes": num_classes + 1,
        "min_size": tile_size_px,
        "max_size": tile_size_px,
        "box_detections_per_img": detections_per_img,
    }
    if arch == "resnet50_fpn":
        from torchvision.models.detection import maskrcnn_resnet50_fpn

        return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **common)
    if arch == "resnet50_fpn_v2":
        from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

        return maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, **common)
    if arch == "resnet101_fpn":
        return _resnet101_fpn(common)
    if arch == "resnet18_fpn":
        return _resnet18_fpn(common, channels=128)
    if arch == "resnet18_gn_fpn":
        return _resnet18_fpn(common, channels=128, group_norm=True)
    if arch == "tiny_fpn":
        return _tiny_fpn(common)
    raise DetectorError(f"unknown architecture {arch!r}; use one of {list(ARCHS)}")


def _resnet101_fpn(common: dict[str, Any]) -> MaskRCNN:
    """ResNet-101 + FPN with torchvision's v1 heads (256 channels), the backbone of the Mask R-CNN paper.

    Batch norm is trainable ``BatchNorm2d`` in every stage: correct from scratch, and ImageNet ResNet-101
    weights (``torchvision.models.ResNet101_Weights``) load into ``backbone.body`` with the same keys.
    """
    from torchvision.models import resnet101
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

    backbone = _resnet_fpn_extractor(resnet101(weights=None, norm_layer=nn.BatchNorm2d), trainable_layers=5)
    return MaskRCNN(backbone, **common)


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (Wu & He 2018): no batch statistics, so the same at any batch size and on any image."""
    return nn.GroupNorm(32, channels)


def _resnet18_fpn(common: dict[str, Any], channels: int, group_norm: bool = False) -> MaskRCNN:
    """ResNet-18 + FPN; ``group_norm`` puts GroupNorm in the backbone, the FPN and the mask head.

    GroupNorm is what He et al. ("Rethinking ImageNet Pre-training", 2019) train detectors from scratch
    with: batch norm's running statistics are those of the training chips, and batches of 4 estimate them poorly.
    """
    from torchvision.models import resnet18

    body = resnet18(weights=None, norm_layer=_group_norm if group_norm else nn.BatchNorm2d)
    norm = _group_norm if group_norm else None
    return _light_maskrcnn(body, [64, 128, 256, 512], channels, 16, 512, 4, 1000, 256, common, norm)


def _tiny_fpn(common: dict[str, Any]) -> MaskRCNN:
    def stage(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    body = nn.Sequential(
        OrderedDict(stem=stage(3, 16), layer1=stage(16, 16), layer2=stage(16, 32), layer3=stage(32, 64), layer4=stage(64, 64))
    )
    return _light_maskrcnn(body, [16, 32, 64, 64], 32, 8, 128, 2, 300, 128, common)


def _light_maskrcnn(
    body: nn.Module,
    in_channels: list[int],
    channels: int,
    smallest_anchor_px: int,
    box_repr: int,
    mask_layers: int,
    proposals: int,
    box_samples: int,
    common: dict[str, Any],
    norm_layer: Callable[[int], nn.Module] | None = None,
) -> MaskRCNN:
    """Assemble a Mask R-CNN with narrow FPN and heads around a backbone with ``layer1..layer4``.

    Anchors double per FPN level from ``smallest_anchor_px``; ``proposals`` bounds the RPN's output,
    ``box_samples`` the RoIs sampled per image in training: both dominate CPU time at small tile sizes.
    """
    backbone = BackboneWithFPN(
        body,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=in_channels,
        out_channels=channels,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=norm_layer,
    )
    sizes = tuple((smallest_anchor_px * 2**k,) for k in range(5))
    anchors = AnchorGenerator(sizes=sizes, aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    num_classes = common.pop("num_classes")
    return MaskRCNN(
        backbone,
        num_classes=None,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=proposals,
        rpn_post_nms_top_n_train=proposals,
        rpn_pre_nms_top_n_test=proposals,
        rpn_post_nms_top_n_test=proposals,
        box_head=TwoMLPHead(channels * 7 * 7, box_repr),
        box_predictor=FastRCNNPredictor(box_repr, num_classes),
        box_batch_size_per_image=box_samples,
        mask_head=MaskRCNNHeads(channels, [channels] * mask_layers, 1, norm_layer=norm_layer),
        mask_predictor=MaskRCNNPredictor(channels, channels, num_classes),
        **common,
    )


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str, arch: str) -> None:
    """Load ``state_dict`` into ``model``; mismatches become one-line :class:`WeightsError` messages."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise WeightsError(
            f"{source} does not fit architecture {arch!r} ({len(missing)} missing, {len(unexpected)} unexpected keys, "
            f"e.g. {example!r}); pass the arch the weights were trained with"
        )
    cls = "roi_heads.box_predictor.cls_score.weight"
    if cls in own and own[cls].shape != state_dict[cls].shape:
        raise WeightsError(
            f"{source} was trained for {state_dict[cls].shape[0] - 1} classes but {own[cls].shape[0] - 1} were asked for; "
            "drop the classes option or fine-tune with `geomask train`"
        )
    bad = [k for k in own if own[k].shape != state_dict[k].shape]
    if bad:
        raise WeightsError(
            f"{source} does not fit architecture {arch!r} (shape of {bad[0]!r} is {tuple(state_dict[bad[0]].shape)}, "
            f"expected {tuple(own[bad[0]].shape)}); pass the arch the weights were trained with"
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state_dict.items()})


def coco_state_dict(name: str) -> tuple[str, dict[str, torch.Tensor], list[str]]:
    """Fetch torchvision's COCO weights by name (``coco`` / ``coco_v2``): arch, state dict, class names.

    Uses torchvision's own cache (``$TORCH_HOME/hub/checkpoints``), so a file placed there works offline.
    """
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_V2_Weights, MaskRCNN_ResNet50_FPN_Weights

    arch = COCO_WEIGHTS[name]
    enum = MaskRCNN_ResNet50_FPN_Weights.DEFAULT if arch == "resnet50_fpn" else MaskRCNN_ResNet50_FPN_V2_Weights.DEFAULT
    try:
        state = enum.get_state_dict(progress=False, check_hash=False)
    except (OSError, RuntimeError, ValueError) as err:  # URLError is an OSError
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        raise WeightsError(
            f"cannot get COCO weights {name!r} ({str(err).splitlines()[0][:120]}); this machine may be offline: "
            f"put {enum.url.rsplit('/', 1)[-1]} into {hub} or give a geomask checkpoint"
        ) from None
    return arch, state, [str(c) for c in enum.meta["categories"]][1:]


def count_parameters(model: nn.Module) -> int:
    """Return the number of trainable parameters (for logs and the model card)."""
    return int(sum(math.prod(p.shape) for p in model.parameters() if p.requires_grad))
