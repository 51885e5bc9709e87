"""The built-in detector: torchvision Mask R-CNN, batched, with masks cropped on the device.

The architectures and their builders are in :mod:`geomask.detect.architectures` (re-exported here);
this module runs a built model behind the detector protocol and builds one from weights and options.

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

An ensemble (``ensemble``: more checkpoints trained for the same inputs, e.g. the same recipe with other
seeds) is fused the same way: every member's every view is one more view of the tile, so an object is
kept on its mean score over all members and views. Models trained from scratch on little data differ
from seed to seed by more than most recipe changes (MODEL_CARD.md); averaging members cancels part of
that. The cost is one forward pass per member and view.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torchvision.models.detection import MaskRCNN

from geomask.detect.architectures import (
    ARCHS,
    COCO_WEIGHTS,
    DEFAULT_TILE_SIZE_PX,
    IMPORTED_ARCHS,
    build_model,
    coco_state_dict,
    count_parameters,
    load_weights,
)
from geomask.detect.base import ModelCard, ModelHints, TileImage
from geomask.detect.checkpoint import Checkpoint, CheckpointMeta, load_checkpoint
from geomask.detect.masks import instances_from_masks
from geomask.detect.tta import TTA_CHOICES, TTA_VIEWS, fuse_views, unview_output, view_image
from geomask.errors import DetectorError, WeightsError
from geomask.instances import Instance
from geomask.models import as_list, bundled_model_path

__all__ = [
    "ARCHS",
    "COCO_WEIGHTS",
    "DEFAULT_TILE_SIZE_PX",
    "IMPORTED_ARCHS",
    "MaskRCNNDetector",
    "build",
    "build_model",
    "coco_state_dict",
    "count_parameters",
    "load_weights",
    "resolve_device",
]

log = logging.getLogger(__name__)


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
        members: Sequence[MaskRCNN] = (),
    ):
        _check_tta(tta)
        self.card = card or ModelCard()  # the checkpoint's stated accuracy, for the run report
        self.model = model.to(device).eval()
        self.members = [m.to(device).eval() for m in members]  # ensemble members beside ``model``, fused with it
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
        for m in self.models:
            m.roi_heads.score_thresh = score_threshold if self.views == 1 else score_threshold / 2
        self.tile_size_px = hints.tile_size_px or int(model.transform.max_size)

    @property
    def models(self) -> list[MaskRCNN]:
        """The model, then the ensemble members."""
        return [self.model, *self.members]

    @property
    def views(self) -> int:
        """Forward passes per tile, all fused: test-time views times models."""
        return self.tta * len(self.models)

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
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.amp else nullcontext()
        views: list[list[dict[str, torch.Tensor]]] = []  # per model and view: one output per tile, in the tile's orientation
        with torch.inference_mode(), autocast:
            for model in self.models:
                # Pixels in equal pixels out: with a square input of this side, torchvision's scale factor is exactly 1.
                model.transform.min_size = (side,)
                model.transform.max_size = side
                views.append(model(tensors))
                for turns, flip in TTA_VIEWS[1 : self.tta]:
                    seen = model([view_image(t, turns, flip) for t in tensors])
                    views.append([unview_output(o, turns, flip) for o in seen])
            outputs = views[0]
            if len(views) > 1:
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
    ensemble: str | Sequence[str] | None = None,
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
        ensemble: More geomask checkpoints (paths or shipped names) run beside ``weights`` and fused with it
            per tile like test-time views (each member also runs ``tta`` views). They must share the main
            model's classes, tile size, GSD, bands and normalisation; their own inference defaults are
            ignored (the main checkpoint's apply). Costs one forward pass per member and view.

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
    ckpt, source, default_classes = _load(weights, arch)
    meta = ckpt.meta
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
    model = _loaded_model(the_arch, n, tile, opts, ckpt, source)
    members = [_member(m, meta, n, tile, opts, source) for m in as_list(ensemble)]
    hints = meta.hints() if meta is not None else ModelHints()
    if tile_size_px is not None:
        hints = dataclasses.replace(hints, tile_size_px=tile_size_px)
    name = f"maskrcnn-{the_arch}:{Path(source).name if weights not in COCO_WEIGHTS else weights}"
    if members:
        name += f"+{len(members)}"  # the provenance names an ensemble's main model and how many members joined it
    log.info("loaded %s (%d classes) on %s", name, n, dev)
    card = ModelCard(meta.metrics, f"the checkpoint's metrics ({source})", meta.attribution) if meta is not None else None
    return MaskRCNNDetector(
        model,
        names_out,
        hints,
        name,
        dev,
        float(opts["score_threshold"]),
        float(opts["mask_threshold"]),
        amp,
        int(opts["tta"]),
        card,
        members,
    )


def _load(weights: str | None, arch: str | None) -> tuple[Checkpoint, str, Sequence[str]]:
    """Return the checkpoint ``weights`` names, where it came from, and its class names."""
    if weights in COCO_WEIGHTS:
        coco_arch, state, names = coco_state_dict(str(weights))
        if arch is not None and arch != coco_arch:
            raise WeightsError(f"weights {weights!r} are {coco_arch!r} but arch={arch!r} was asked for; drop arch or change it")
        return Checkpoint(None, state), f"torchvision {weights}", names
    shipped = bundled_model_path(weights)
    path = shipped if shipped is not None else Path(str(weights))
    if shipped is not None and not path.is_file():
        raise WeightsError(
            f"no bundled model at {path}; pass weights (a checkpoint from `geomask train`, or 'coco' when online) via --weights"
        )
    ckpt = load_checkpoint(path)
    return ckpt, str(path), ckpt.meta.classes if ckpt.meta is not None else []


#: What ensemble members must share with the main model: the same pixels must mean the same to each.
_SHARED_HINTS = ("tile_size_px", "gsd_m", "bands", "normalize_mode", "percentiles")


def _member(weights: str, main: CheckpointMeta | None, n: int, tile: int, opts: dict[str, float | int], main_source: str) -> MaskRCNN:
    """Build one ensemble member: a geomask checkpoint for the same classes, grid and normalisation as the main model."""
    ckpt, source, _ = _load(weights, None)
    meta = ckpt.meta
    if meta is None or main is None:
        raise WeightsError(f"ensemble member {source}: ensembles need geomask checkpoints on both sides (they say grid and normalisation)")
    if ckpt.num_classes != n:
        raise WeightsError(
            f"ensemble member {source} has {ckpt.num_classes} classes, {main_source} {n}; ensemble models of the same classes"
        )
    for key in _SHARED_HINTS:
        if getattr(meta, key) != getattr(main, key):
            raise WeightsError(
                f"ensemble member {source} was trained with {key}={getattr(meta, key)!r}, {main_source} with "
                f"{getattr(main, key)!r}; ensemble models trained on the same grid and normalisation"
            )
    return _loaded_model(_pick_arch(None, meta, source), n, tile, opts, ckpt, source)


def _loaded_model(arch: str, n: int, tile: int, opts: dict[str, float | int], ckpt: Checkpoint, source: str) -> MaskRCNN:
    """Build ``arch`` for ``n`` classes with the detector options (detections per tile, NMS) and load ``ckpt`` into it."""
    model = build_model(arch, n, tile, int(opts["detections_per_img"]), ckpt.meta.arch_options if ckpt.meta is not None else None)
    model.roi_heads.nms_thresh = float(opts["nms_threshold"])
    load_weights(model, ckpt.state_dict, source, arch)
    return model


def _pick_arch(arch: str | None, meta: CheckpointMeta | None, source: str) -> str:
    if meta is None:
        return arch or "resnet50_fpn"
    if meta.arch not in ARCHS + IMPORTED_ARCHS:
        raise WeightsError(f"{source} names architecture {meta.arch!r}, unknown to this geomask; use one of {list(ARCHS + IMPORTED_ARCHS)}")
    if arch is not None and arch != meta.arch:
        raise WeightsError(f"{source} holds a {meta.arch!r} model but arch={arch!r} was asked for; drop arch or pass matching weights")
    return meta.arch
