"""The built-in detector: torchvision Mask R-CNN, batched, with masks cropped on the device.

Architectures: ``resnet50_fpn`` (torchvision v1, the COCO weights' shape), ``resnet50_fpn_v2``,
``resnet101_fpn`` (v1 heads on ResNet-101, for ImageNet-initialised training), ``tiny_fpn`` (tests)
and ``resnet18_fpn``, a CPU-friendly model for training from scratch (trainable ``BatchNorm2d``,
because frozen batch norm without pretrained statistics is wrong from scratch; 128-channel FPN and
mask head; anchors from 16 px because objects at 0.3 m are small).

The model's own resize is neutralised: each batch is zero-padded to one square side (at least the
model's tile size) and ``min_size = max_size = side``, so the scale factor is exactly 1 and a pixel in
is a pixel out. Rasters smaller than a tile therefore work unchanged.

Test-time augmentation (``tta`` 4 or 8) runs each padded tile through the flips (4) or all eight
dihedral transforms (8), maps every view's masks back, and fuses them per tile before the cross-tile
merge (:func:`fuse_views`): one object is a group of detections, at most one per view, whose binary
masks overlap by mask IoU ≥ 0.5; its mask is the mean probability of its members (mask voting) and its
score the sum of their scores over the number of views, so an object seen in few views is
down-weighted and, below ``score_threshold``, dropped. Nadir imagery has no "up", so every view is a
plausible image; the cost is ``tta`` forward passes per tile.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from geomask.detect.base import ModelCard, ModelHints, TileImage
from geomask.detect.checkpoint import Checkpoint, CheckpointMeta, load_checkpoint
from geomask.detect.d2_arch import DETECTRON2_ARCHS, Detectron2Arch, build_detectron2_model
from geomask.detect.masks import instances_from_masks
from geomask.detect.tta import TTA_CHOICES, TTA_VIEWS, fuse_views, unview_output, view_image
from geomask.errors import DetectorError, WeightsError
from geomask.instances import Instance
from geomask.models import bundled_model_path

log = logging.getLogger(__name__)

#: ``tiny_fpn`` is a few-hundred-thousand-parameter model for tests and demos: it learns simple shapes in seconds.
ARCHS = ("resnet50_fpn", "resnet50_fpn_v2", "resnet101_fpn", "resnet18_fpn", "tiny_fpn")
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


def _resnet18_fpn(common: dict[str, Any], channels: int) -> MaskRCNN:
    from torchvision.models import resnet18

    body = resnet18(weights=None, norm_layer=nn.BatchNorm2d)
    return _light_maskrcnn(body, [64, 128, 256, 512], channels, 16, 512, 4, 1000, 256, common)


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
        mask_head=MaskRCNNHeads(channels, [channels] * mask_layers, 1),
        mask_predictor=MaskRCNNPredictor(channels, channels, num_classes),
        **common,
    )


def resolve_device(device: str) -> torch.device:
    """Return the torch device for ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` (error if unavailable)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DetectorError(f"device {device!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DetectorError(f"device {device!r} asked for but CUDA is not available; use device: cpu or auto")
    return dev


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


class MaskRCNNDetector:
    """A torchvision Mask R-CNN behind the :class:`~geomask.detect.base.Detector` protocol.

    Holds the model on its device in eval mode; ``detect`` is safe to call repeatedly with batches of
    any tile sizes. Instances come back in global working-grid pixels, masks cropped to their boxes.
    """

    def __init__(
        self,
        model: MaskRCNN,
        classes: Sequence[str],
        hints: ModelHints,
        name: str,
        device: torch.device,
        score_threshold: float = 0.5,
        mask_threshold: float = 0.5,
        amp: bool = True,
        tta: int = 1,
        card: ModelCard | None = None,
    ):
        _check_tta(tta)
        self.card = card or ModelCard()  # the checkpoint's stated accuracy, for the run report
        self.model = model.to(device).eval()
        self.classes = tuple(classes)
        self.hints = dataclasses.replace(hints, channels=3)  # torchvision's transform normalises 3 bands
        self.name = name
        self.device = device
        self.mask_threshold = mask_threshold
        self.score_threshold = score_threshold
        self.tta = tta
        self.amp = amp and device.type == "cuda"
        # With views fused, an object is kept on its mean score; each view keeps candidates down to half the
        # threshold so that an object scoring just under it in one view still counts there.
        self.model.roi_heads.score_thresh = score_threshold if tta == 1 else score_threshold / 2
        self.tile_size_px = hints.tile_size_px or int(model.transform.max_size)

    def detect(self, batch: Sequence[TileImage]) -> list[list[Instance]]:
        """Return the instances of each tile in ``batch`` in global working-grid pixels."""
        if not batch:
            return []
        for image in batch:
            if image.pixels.ndim != 3 or image.pixels.shape[0] != 3:
                raise DetectorError(
                    f"{self.name} needs 3-band tiles, got shape {image.pixels.shape}; set raster.bands to three bands (e.g. [1, 2, 3])"
                )
        side = max([self.tile_size_px] + [max(im.pixels.shape[1:]) for im in batch])
        tensors = []
        for image in batch:
            t = torch.from_numpy(np.ascontiguousarray(image.pixels, dtype=np.float32)).to(self.device, non_blocking=True)
            _, h, w = t.shape
            if h != side or w != side:
                t = torch.nn.functional.pad(t, (0, side - w, 0, side - h))
            tensors.append(t)
        # Pixels in equal pixels out: with a square input of this side, torchvision's scale factor is exactly 1.
        self.model.transform.min_size = (side,)
        self.model.transform.max_size = side
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.amp else nullcontext()
        with torch.inference_mode(), autocast:
            outputs = self.model(tensors)
            if self.tta > 1:
                views = [outputs]
                for turns, flip in TTA_VIEWS[1 : self.tta]:
                    seen = self.model([view_image(t, turns, flip) for t in tensors])
                    views.append([unview_output(o, turns, flip) for o in seen])
                limit = int(self.model.roi_heads.detections_per_img)
                outputs = [fuse_views([v[i] for v in views], self.score_threshold, self.mask_threshold, limit) for i in range(len(tensors))]
        return [self._instances(out, image) for out, image in zip(outputs, batch, strict=True)]

    def _instances(self, out: dict[str, torch.Tensor], image: TileImage) -> list[Instance]:
        h, w = image.pixels.shape[1:]
        # Threshold on the device: one byte per pixel crosses to the host, then the shared numpy step crops.
        masks = (out["masks"][:, 0, :h, :w] >= self.mask_threshold).cpu().numpy()
        scores = out["scores"].float().cpu().numpy()
        labels = out["labels"].cpu().numpy()
        return instances_from_masks(masks, scores, labels, self.mask_threshold, int(image.tile.read.row_off), int(image.tile.read.col_off))


def _check_tta(tta: float) -> None:
    if tta not in TTA_CHOICES:
        raise DetectorError(f"tta must be one of {list(TTA_CHOICES)} (identity, flips, all 8 flips/rotations), got {tta}")


#: What the detector options default to when neither the call nor the checkpoint sets them.
DETECTOR_DEFAULTS: dict[str, float | int] = {
    "score_threshold": 0.5,
    "mask_threshold": 0.5,
    "detections_per_img": 300,
    "nms_threshold": 0.5,
    "tta": 1,
}


def _check_options(
    score_threshold: float, mask_threshold: float, detections_per_img: float, tile_size_px: int | None, nms_threshold: float, tta: float
) -> None:
    _check_tta(tta)
    if not 0.0 < nms_threshold <= 1.0:
        raise DetectorError(f"nms_threshold must be in (0, 1], got {nms_threshold}")
    if not 0.0 <= score_threshold <= 1.0:
        raise DetectorError(f"score_threshold must be in [0, 1], got {score_threshold}")
    if not 0.0 < mask_threshold < 1.0:
        raise DetectorError(f"mask_threshold must be in (0, 1), got {mask_threshold}")
    if detections_per_img < 1:
        raise DetectorError(f"detections_per_img must be at least 1, got {detections_per_img}")
    if tile_size_px is not None and tile_size_px < 32:
        raise DetectorError(f"tile_size_px must be at least 32, got {tile_size_px}")


def build(
    weights: str | None = None,
    arch: str | None = None,
    device: str = "auto",
    score_threshold: float | None = None,
    mask_threshold: float | None = None,
    detections_per_img: int | None = None,
    amp: bool = True,
    classes: Sequence[str] | None = None,
    tile_size_px: int | None = None,
    nms_threshold: float | None = None,
    tta: int | None = None,
) -> MaskRCNNDetector:
    """Build the Mask R-CNN detector (factory ``geomask.detect.maskrcnn:build``).

    Args:
        weights: A geomask checkpoint or torchvision state dict path, ``coco``/``coco_v2`` (torchvision
            COCO weights, downloaded when online), the name of a shipped model (``buildings``, ``trees``),
            or ``None`` for the bundled buildings model.
        arch: Architecture; default: the checkpoint's (``resnet50_fpn`` for a plain state dict).
        device: ``auto`` (CUDA if present), ``cpu``, ``cuda`` or ``cuda:N``.
        score_threshold: Instances scoring below this are dropped.
        mask_threshold: Mask probability at which a pixel belongs to the instance.
        detections_per_img: Most instances per tile.
        amp: Use float16 autocast on CUDA (ignored on CPU).
        classes: Class names; must match the weights' class count when given.
        tile_size_px: Override the tile size hint (default: the checkpoint's, else 512).
        nms_threshold: Within a tile, of two detections whose boxes overlap by more than this IoU only
            the higher-scoring one is kept (torchvision's ``box_nms_thresh``). Lower it for objects
            that rarely overlap (isolated crowns) to drop double detections of one object.
        tta: Test-time augmentation: 1 (off), 4 (flips) or 8 (flips and 90° rotations), fused per tile
            (see :func:`fuse_views`); costs ``tta`` forward passes per tile.

    The five threshold/TTA options left ``None`` take the checkpoint's inference defaults (its
    ``inference`` metadata, the model card's settings), else :data:`DETECTOR_DEFAULTS`.

    Raises:
        DetectorError: An option is invalid.
        WeightsError: The weights are missing, unreadable or do not match ``arch``/``classes``.
    """
    given = {"score_threshold": score_threshold, "mask_threshold": mask_threshold, "detections_per_img": detections_per_img}
    given.update(nms_threshold=nms_threshold, tta=tta)
    _check_options(**{**DETECTOR_DEFAULTS, **{k: v for k, v in given.items() if v is not None}}, tile_size_px=tile_size_px)
    if arch is not None and arch not in ARCHS + IMPORTED_ARCHS:
        raise DetectorError(f"unknown architecture {arch!r}; use one of {list(ARCHS + IMPORTED_ARCHS)}")
    dev = resolve_device(device)
    meta: CheckpointMeta | None
    if weights in COCO_WEIGHTS:
        coco_arch, state, names = coco_state_dict(str(weights))
        if arch is not None and arch != coco_arch:
            raise WeightsError(f"weights {weights!r} are {coco_arch!r} but arch={arch!r} was asked for; drop arch or change it")
        meta, source = None, f"torchvision {weights}"
        ckpt = Checkpoint(None, state)
        default_classes: Sequence[str] = names
    else:
        shipped = bundled_model_path(weights)
        path = shipped if shipped is not None else Path(str(weights))
        if shipped is not None and not path.is_file():
            raise WeightsError(
                f"no bundled model at {path}; pass weights (a checkpoint from `geomask train`, or 'coco' when online) via --weights"
            )
        ckpt = load_checkpoint(path)
        meta, source = ckpt.meta, str(path)
        default_classes = meta.classes if meta is not None else []
    the_arch = _pick_arch(arch, meta, source)
    n = ckpt.num_classes
    if n is None:
        raise WeightsError(f"{source} has no box predictor weights; it is not a Mask R-CNN checkpoint")
    if classes is not None and len(classes) != n:
        raise WeightsError(
            f"{source} was trained for {n} classes but {len(classes)} class names were given; drop the classes option or fine-tune"
        )
    names_out = list(classes) if classes is not None else list(default_classes)
    if len(names_out) != n:
        names_out = [f"class_{i}" for i in range(n)]
    carried = {k: v for k, v in (meta.inference if meta is not None else {}).items() if k in DETECTOR_DEFAULTS}
    opts = {**DETECTOR_DEFAULTS, **carried, **{k: v for k, v in given.items() if v is not None}}
    if carried:
        _check_options(**opts, tile_size_px=tile_size_px)
        log.info("%s: inference defaults %s (options given override them)", source, carried)
    tile = tile_size_px or (meta.tile_size_px if meta is not None else DEFAULT_TILE_SIZE_PX)
    model = build_model(the_arch, n, tile, int(opts["detections_per_img"]), meta.arch_options if meta is not None else None)
    model.roi_heads.nms_thresh = float(opts["nms_threshold"])
    load_weights(model, ckpt.state_dict, source, the_arch)
    hints = meta.hints() if meta is not None else ModelHints()
    if tile_size_px is not None:
        hints = dataclasses.replace(hints, tile_size_px=tile_size_px)
    name = f"maskrcnn-{the_arch}:{Path(source).name if weights not in COCO_WEIGHTS else weights}"
    log.info("loaded %s (%d classes) on %s", name, n, dev)
    card = ModelCard(meta.metrics, f"the checkpoint's metrics ({source})", meta.attribution) if meta is not None else None
    return MaskRCNNDetector(
        model, names_out, hints, name, dev, float(opts["score_threshold"]), float(opts["mask_threshold"]), amp, int(opts["tta"]), card
    )


def _pick_arch(arch: str | None, meta: CheckpointMeta | None, source: str) -> str:
    if meta is None:
        return arch or "resnet50_fpn"
    if meta.arch not in ARCHS + IMPORTED_ARCHS:
        raise WeightsError(f"{source} names architecture {meta.arch!r}, unknown to this geomask; use one of {list(ARCHS + IMPORTED_ARCHS)}")
    if arch is not None and arch != meta.arch:
        raise WeightsError(f"{source} holds a {meta.arch!r} model but arch={arch!r} was asked for; drop arch or pass matching weights")
    return meta.arch


def count_parameters(model: nn.Module) -> int:
    """Return the number of trainable parameters (for logs and the model card)."""
    return int(sum(math.prod(p.shape) for p in model.parameters() if p.requires_grad))
