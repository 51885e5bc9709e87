"""Detectron2's Mask R-CNN (R50/R101-FPN) rebuilt from torchvision parts, for converted Detectron2 checkpoints.

A torchvision ``MaskRCNN`` computes the same function as Detectron2's ``GeneralizedRCNN`` with FPN once
five things are made Detectron2's (each a small subclass or a setting; nothing here has parameters of
its own, so the state dict keeps torchvision's names):

- *Bottleneck stride.* Detectron2's ``STRIDE_IN_1X1: True`` (the MSRA ResNets, its default) downsamples
  in the first 1×1 conv of each stage; torchvision (v1.5) in the 3×3. The first block of ``layer2..4``
  gets its strides moved.
- *Input.* Detectron2 takes 0–255 pixels in ``INPUT.FORMAT`` order minus ``PIXEL_MEAN`` over
  ``PIXEL_STD``. geomask feeds 0–1 RGB, so the transform normalises with ``mean/255`` and ``std/255``
  (identical arithmetic) and the converter reverses the first conv's input channels for BGR models.
- *RoIAlign.* ``ROIAlignV2`` is ``aligned=True`` with Detectron2's level assignment
  (``floor(4 + log2(sqrt(area) / 224 + 1e-8))``) and ``POOLER_SAMPLING_RATIO`` (0: adaptive);
  torchvision's ``MultiScaleRoIAlign`` is ``aligned=False`` with a fixed ratio of 2.
- *Anchors.* Detectron2's cell anchors are not rounded (torchvision rounds them to whole pixels), its
  strides are the FPN levels' (4..64, not inferred from the padded image size) and the grid starts at
  ``OFFSET × stride``.
- *Proposal NMS.* Detectron2 ranks proposals by objectness logit; torchvision by its sigmoid, which is
  1.0 for every logit above ~17 in float32, so confident proposals tie and NMS may keep others.
  :class:`Detectron2RPN` suppresses on the logits and drops only empty boxes, as Detectron2 does.
  Likewise for detections (:class:`Detectron2RoIHeads`): torchvision drops boxes under 0.01 px before
  NMS, Detectron2 keeps them through NMS and the ``TEST.DETECTIONS_PER_IMAGE`` cut and drops empty ones
  after (boxes clipped to nothing at the image edge take places in its top 100).
- *Mask pasting.* Detectron2 samples each 28×28 mask at the pixel centres of its box
  (``grid_sample``, ``align_corners=False``); torchvision resizes the mask to the rounded box, one pixel
  bigger on each side. :class:`Detectron2Transform` pastes Detectron2's way.

What still differs is listed in the README ("Detectron2 checkpoints").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision.models import resnet50, resnet101
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign, roi_align
from torchvision.ops import boxes as box_ops

from geomask.errors import WeightsError

#: Architecture names of converted Detectron2 models (``arch`` in the checkpoint), by ResNet depth.
DETECTRON2_ARCHS = {50: "detectron2_resnet50_fpn", 101: "detectron2_resnet101_fpn"}
#: FPN levels p2..p6: their strides, in input pixels.
FPN_STRIDES = (4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Detectron2Arch:
    """The settings of a Detectron2 Mask R-CNN that shape its computation (stored as ``arch_options``).

    Attributes:
        depth: ResNet depth, 50 or 101.
        stride_in_1x1: Downsample in the 1×1 conv of each stage's first block (Detectron2's default).
        pixel_mean_rgb: ``PIXEL_MEAN`` reordered to RGB, 0–255 units.
        pixel_std_rgb: ``PIXEL_STD`` reordered to RGB, 0–255 units.
        anchor_sizes: One anchor size per FPN level p2..p6, input pixels.
        aspect_ratios: Anchor height/width ratios, the same at every level.
        anchor_offset: Grid offset of the anchor centres, in strides.
        rpn_pre_nms_topk: Proposals per FPN level before NMS (``RPN.PRE_NMS_TOPK_TEST``).
        rpn_post_nms_topk: Proposals per image after NMS (``RPN.POST_NMS_TOPK_TEST``).
        rpn_nms_thresh: RPN NMS IoU (``RPN.NMS_THRESH``).
        rpn_bbox_reg_weights: ``RPN.BBOX_REG_WEIGHTS``.
        box_reg_weights: ``ROI_BOX_HEAD.BBOX_REG_WEIGHTS``.
        box_pooler_sampling_ratio: ``ROI_BOX_HEAD.POOLER_SAMPLING_RATIO`` (0: adaptive).
        box_pooler_aligned: ``ROI_BOX_HEAD.POOLER_TYPE`` is ``ROIAlignV2`` (half-pixel shift) rather than ``ROIAlign``.
        mask_pooler_sampling_ratio: ``ROI_MASK_HEAD.POOLER_SAMPLING_RATIO``.
        mask_pooler_aligned: ``ROI_MASK_HEAD.POOLER_TYPE`` is ``ROIAlignV2``.
    """

    depth: int = 50
    stride_in_1x1: bool = True
    pixel_mean_rgb: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std_rgb: tuple[float, float, float] = (1.0, 1.0, 1.0)
    anchor_sizes: tuple[float, ...] = (32.0, 64.0, 128.0, 256.0, 512.0)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_offset: float = 0.0
    rpn_pre_nms_topk: int = 1000
    rpn_post_nms_topk: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_bbox_reg_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    box_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    box_pooler_sampling_ratio: int = 0
    box_pooler_aligned: bool = True
    mask_pooler_sampling_ratio: int = 0
    mask_pooler_aligned: bool = True

    @property
    def arch(self) -> str:
        """The checkpoint's ``arch`` name for this model."""
        return DETECTRON2_ARCHS[self.depth]

    def to_dict(self) -> dict[str, Any]:
        """Return plain JSON-like values (tuples as lists) for the checkpoint metadata."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> Detectron2Arch:
        """Read :meth:`to_dict`'s output back; unknown or mistyped keys raise :class:`WeightsError`."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise WeightsError(f"{source} has unknown Detectron2 architecture options {unknown}; upgrade geomask or re-convert it")
        values: dict[str, Any] = {}
        defaults = cls()
        for name, value in data.items():
            default = getattr(defaults, name)
            try:
                if isinstance(default, tuple):
                    values[name] = tuple(float(v) for v in value)
                elif isinstance(default, bool):
                    if not isinstance(value, bool):
                        raise TypeError(value)
                    values[name] = value
                else:
                    values[name] = type(default)(value)
            except (TypeError, ValueError):
                raise WeightsError(
                    f"{source}: Detectron2 architecture option {name} = {value!r} is invalid; re-convert the model"
                ) from None
        arch = cls(**values)
        if arch.depth not in DETECTRON2_ARCHS or len(arch.anchor_sizes) != len(FPN_STRIDES) or len(arch.pixel_mean_rgb) != 3:
            raise WeightsError(f"{source}: Detectron2 architecture options {data} are not a ResNet-50/101 FPN model; re-convert it")
        return arch


def build_detectron2_model(arch: Detectron2Arch, num_classes: int, tile_size_px: int, detections_per_img: int) -> MaskRCNN:
    """Build an untrained torchvision Mask R-CNN that computes what Detectron2's does with ``arch``.

    Args:
        arch: The converted model's settings.
        num_classes: Object classes, background excluded.
        tile_size_px: Input side (``min_size = max_size``: nothing is resized).
        detections_per_img: Most instances per tile (``TEST.DETECTIONS_PER_IMAGE``).
    """
    body = (resnet50 if arch.depth == 50 else resnet101)(weights=None, norm_layer=FrozenBatchNorm2d)
    if arch.stride_in_1x1:
        for layer in (body.layer2, body.layer3, body.layer4):
            layer[0].conv1.stride = (2, 2)
            layer[0].conv2.stride = (1, 1)
    backbone = _resnet_fpn_extractor(body, trainable_layers=0)
    mean = [m / 255.0 for m in arch.pixel_mean_rgb]
    std = [s / 255.0 for s in arch.pixel_std_rgb]
    model = MaskRCNN(
        backbone,
        num_classes=num_classes + 1,
        min_size=tile_size_px,
        max_size=tile_size_px,
        image_mean=mean,
        image_std=std,
        rpn_anchor_generator=Detectron2Anchors(arch.anchor_sizes, arch.aspect_ratios, arch.anchor_offset),
        rpn_pre_nms_top_n_test=arch.rpn_pre_nms_topk,
        rpn_post_nms_top_n_test=arch.rpn_post_nms_topk,
        rpn_nms_thresh=arch.rpn_nms_thresh,
        box_roi_pool=AlignedRoIPool(7, arch.box_pooler_sampling_ratio, arch.box_pooler_aligned),
        mask_roi_pool=AlignedRoIPool(14, arch.mask_pooler_sampling_ratio, arch.mask_pooler_aligned),
        bbox_reg_weights=arch.box_reg_weights,
        box_detections_per_img=detections_per_img,
    )
    rpn = model.rpn
    model.rpn = Detectron2RPN(rpn.anchor_generator, rpn.head, 0.7, 0.3, 256, 0.5, rpn._pre_nms_top_n, rpn._post_nms_top_n, rpn.nms_thresh)
    model.rpn.box_coder.weights = arch.rpn_bbox_reg_weights
    h = model.roi_heads
    model.roi_heads = Detectron2RoIHeads(
        h.box_roi_pool, h.box_head, h.box_predictor, 0.5, 0.5, 512, 0.25, arch.box_reg_weights, h.score_thresh, h.nms_thresh,
        h.detections_per_img, mask_roi_pool=h.mask_roi_pool, mask_head=h.mask_head, mask_predictor=h.mask_predictor,
    )  # fmt: skip
    model.transform = Detectron2Transform(tile_size_px, tile_size_px, mean, std)
    return model


class Detectron2Anchors(AnchorGenerator):  # type: ignore[misc]  # torchvision is untyped for mypy
    """Detectron2's ``DefaultAnchorGenerator``: unrounded cell anchors, fixed FPN strides, a grid offset."""

    def __init__(self, sizes: tuple[float, ...], aspect_ratios: tuple[float, ...], offset: float):
        self.offset = offset
        super().__init__(tuple((s,) for s in sizes), (aspect_ratios,) * len(sizes))

    def generate_anchors(
        self, scales: list[int], aspect_ratios: list[float], dtype: torch.dtype = torch.float32, device: torch.device | None = None
    ) -> Tensor:
        anchors = []
        for size in scales:  # Detectron2's order: size outer, ratio inner; one size per level here
            for ratio in aspect_ratios:
                w = math.sqrt(size * size / ratio)
                h = ratio * w
                anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
        return torch.tensor(anchors, dtype=dtype, device=device)

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        self.set_cell_anchors(dtype, device)
        levels = []
        for fmap, stride, cell in zip(feature_maps, FPN_STRIDES, self.cell_anchors, strict=True):
            h, w = fmap.shape[-2:]
            xs = torch.arange(w, dtype=torch.float32, device=device) * stride + self.offset * stride
            ys = torch.arange(h, dtype=torch.float32, device=device) * stride + self.offset * stride
            sy, sx = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack((sx.reshape(-1), sy.reshape(-1), sx.reshape(-1), sy.reshape(-1)), dim=1).to(dtype)
            levels.append((shifts.view(-1, 1, 4) + cell.view(1, -1, 4)).reshape(-1, 4))
        anchors = torch.cat(levels)
        return [anchors for _ in image_list.image_sizes]


class Detectron2RPN(RegionProposalNetwork):  # type: ignore[misc]  # torchvision is untyped for mypy
    """torchvision's RPN with Detectron2's proposal selection: NMS on logits, only empty boxes removed."""

    def filter_proposals(
        self, proposals: Tensor, objectness: Tensor, image_shapes: list[tuple[int, int]], num_anchors_per_level: list[int]
    ) -> tuple[list[Tensor], list[Tensor]]:
        n = proposals.shape[0]
        logits = objectness.detach().reshape(n, -1)
        levels = torch.cat([torch.full((k,), i, dtype=torch.int64, device=logits.device) for i, k in enumerate(num_anchors_per_level)])
        top = self._get_top_n_idx(logits, num_anchors_per_level)  # per level, sorted by logit
        batch = torch.arange(n, device=logits.device)[:, None]
        logits, boxes_all, levels_all = logits[batch, top], proposals[batch, top], levels[top]
        final_boxes, final_scores = [], []
        for boxes, scores, lvl, shape in zip(boxes_all, logits, levels_all, image_shapes, strict=True):
            finite = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
            boxes = box_ops.clip_boxes_to_image(boxes[finite], shape)
            scores, lvl = scores[finite], lvl[finite]
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = box_ops.batched_nms(boxes, scores, lvl, self.nms_thresh)[: self.post_nms_top_n()]
            final_boxes.append(boxes[keep])
            final_scores.append(torch.sigmoid(scores[keep]))
        return final_boxes, final_scores


class Detectron2RoIHeads(RoIHeads):  # type: ignore[misc]  # torchvision is untyped for mypy
    """torchvision's RoI heads with Detectron2's detection selection: empty boxes removed after NMS and the top-k."""

    def postprocess_detections(
        self, class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        num_classes = class_logits.shape[-1]
        sizes = [len(p) for p in proposals]
        boxes_all = torch.split(self.box_coder.decode(box_regression, proposals), sizes, 0)
        scores_all = torch.split(F.softmax(class_logits, -1), sizes, 0)
        out_boxes, out_scores, out_labels = [], [], []
        for boxes, scores, shape in zip(boxes_all, scores_all, image_shapes, strict=True):
            finite = torch.isfinite(boxes).all(dim=(1, 2)) & torch.isfinite(scores).all(dim=1)
            boxes, scores = box_ops.clip_boxes_to_image(boxes[finite], shape)[:, 1:], scores[finite][:, 1:]
            labels = torch.arange(1, num_classes, device=scores.device).view(1, -1).expand_as(scores)
            boxes, scores, labels = boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            out_boxes.append(boxes[keep])
            out_scores.append(scores[keep])
            out_labels.append(labels[keep])
        return out_boxes, out_scores, out_labels


class AlignedRoIPool(MultiScaleRoIAlign):  # type: ignore[misc]  # torchvision is untyped for mypy
    """Detectron2's ``ROIPooler`` over p2..p5: its level assignment, sampling ratio and ``aligned`` RoIAlign."""

    def __init__(self, output_size: int, sampling_ratio: int, aligned: bool):
        super().__init__(featmap_names=["0", "1", "2", "3"], output_size=output_size, sampling_ratio=sampling_ratio)
        self.aligned = aligned

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        feats = [x[name] for name in self.featmap_names]
        size = self.output_size if isinstance(self.output_size, int) else self.output_size[0]
        index = torch.cat([torch.full((len(b), 1), i, dtype=b.dtype, device=b.device) for i, b in enumerate(boxes)])
        rois = torch.cat([index, torch.cat(boxes)], dim=1)
        all_boxes = rois[:, 1:]
        area = (all_boxes[:, 2] - all_boxes[:, 0]) * (all_boxes[:, 3] - all_boxes[:, 1])
        level = torch.floor(4 + torch.log2(torch.sqrt(area) / 224 + 1e-8)).clamp(2, 5).to(torch.int64) - 2
        out = torch.zeros((len(rois), feats[0].shape[1], size, size), dtype=feats[0].dtype, device=feats[0].device)
        for k, (feat, stride) in enumerate(zip(feats, FPN_STRIDES, strict=False)):
            idx = torch.nonzero(level == k).squeeze(1)
            if len(idx):
                pooled = roi_align(feat, rois[idx].to(feat.dtype), size, 1.0 / stride, self.sampling_ratio, self.aligned)
                out.index_put_((idx,), pooled.to(out.dtype))
        return out


class Detectron2Transform(GeneralizedRCNNTransform):  # type: ignore[misc]  # torchvision is untyped for mypy
    """torchvision's transform, but masks are pasted as Detectron2's ``paste_masks_in_image`` does (probabilities kept)."""

    def postprocess(
        self, result: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]], original_image_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        if self.training:
            return result
        for pred, im_s, o_im_s in zip(result, image_shapes, original_image_sizes, strict=True):
            pred["boxes"] = resize_boxes(pred["boxes"], im_s, o_im_s)
            if "masks" in pred:
                pred["masks"] = paste_masks(pred["masks"], pred["boxes"], o_im_s)
        return result


def paste_masks(masks: Tensor, boxes: Tensor, image_hw: tuple[int, int]) -> Tensor:
    """Paste ``(n, 1, m, m)`` mask probabilities into ``(n, 1, h, w)`` by sampling at pixel centres inside each box.

    Detectron2's method (``detectron2.layers.mask_ops._do_paste_mask``, Apache-2.0): pixel ``(x + 0.5,
    y + 0.5)`` maps to ``(x + 0.5 - x0) / (x1 - x0) * 2 - 1`` in the mask's ``grid_sample`` frame.
    Masks are pasted one by one within their box grown by a pixel (zero elsewhere), as it does on the CPU.
    """
    img_h, img_w = image_hw
    out = masks.new_zeros((masks.shape[0], 1, img_h, img_w))
    for i in range(masks.shape[0]):
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        c0, r0 = max(math.floor(x0) - 1, 0), max(math.floor(y0) - 1, 0)
        c1, r1 = min(math.ceil(x1) + 1, img_w), min(math.ceil(y1) + 1, img_h)
        if c1 <= c0 or r1 <= r0 or x1 <= x0 or y1 <= y0:
            continue
        xs = (torch.arange(c0, c1, device=masks.device, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1
        ys = (torch.arange(r0, r1, device=masks.device, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], dim=2)[None]
        sampled = F.grid_sample(masks[i : i + 1].float(), grid, align_corners=False)
        out[i, :, r0:r1, c0:c1] = sampled[0].to(out.dtype)
    return out
