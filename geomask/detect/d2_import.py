"""Convert a Detectron2 Mask R-CNN (R50/R101-FPN) checkpoint into a geomask checkpoint, without Detectron2.

Three steps, each refusing what it cannot do exactly:

1. *Read the weights as data* (:func:`load_detectron2_weights`). Detectron2 writes ``torch.save``
   files (``{"model": state_dict, "optimizer": ..., "scheduler": ..., "iteration": ...}``); its model
   zoo and some published models are plain pickles of numpy arrays (``.pkl``). Torch files are read
   with ``torch.load(weights_only=True)``, numpy's array types allowed by name; plain pickles with
   :class:`_ArrayUnpickler`, which resolves only numpy's array-rebuilding globals. Any other global
   (an fvcore scheduler, a function) is never imported: it becomes an inert :class:`_Skipped` object,
   and only the ``model`` entry, which must be all arrays, is used.
2. *Read the config* (:mod:`geomask.detect.d2_config`).
3. *Map the weights* (:func:`convert_state_dict`): names to torchvision's, the first conv's input
   channels reversed for a BGR model, the class order of the box classifier changed (Detectron2's
   background is the last logit, torchvision's the first), a zero background row added to the box
   regression and mask predictors (Detectron2 predicts foreground classes only), class-agnostic heads
   repeated per class. Batch-norm statistics are copied as they are into torchvision's
   ``FrozenBatchNorm2d``, which computes what Detectron2's does (same ``eps``).
"""

from __future__ import annotations

import functools
import importlib
import logging
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from geomask.detect.checkpoint import CheckpointMeta, check_inference, save_checkpoint
from geomask.detect.d2_arch import build_detectron2_model
from geomask.detect.d2_config import Detectron2Config, read_detectron2_config
from geomask.digest import file_sha256
from geomask.errors import WeightsError, first_line

log = logging.getLogger(__name__)

_CLS = "roi_heads.box_predictor.cls_score"
_BOX = "roi_heads.box_predictor.bbox_pred"
_MASK = "roi_heads.mask_predictor.mask_fcn_logits"
_CONV1 = "backbone.body.conv1.weight"

#: Detectron2 name ↔ torchvision name, one pair per module kind. ``{p}`` stands for a parameter name
#: (``weight``, ``running_mean``), other fields for numbers; ``{s-1}`` for the number that Detectron2
#: writes as ``s``, minus one (``res2`` is torchvision's ``layer1``).
_NAMES: list[tuple[str, str]] = [
    ("backbone.bottom_up.stem.conv1.weight", "backbone.body.conv1.weight"),
    ("backbone.bottom_up.stem.conv1.norm.{p}", "backbone.body.bn1.{p}"),
    ("backbone.bottom_up.res{s}.{b}.conv{c}.weight", "backbone.body.layer{s-1}.{b}.conv{c}.weight"),
    ("backbone.bottom_up.res{s}.{b}.conv{c}.norm.{p}", "backbone.body.layer{s-1}.{b}.bn{c}.{p}"),
    ("backbone.bottom_up.res{s}.{b}.shortcut.weight", "backbone.body.layer{s-1}.{b}.downsample.0.weight"),
    ("backbone.bottom_up.res{s}.{b}.shortcut.norm.{p}", "backbone.body.layer{s-1}.{b}.downsample.1.{p}"),
    ("backbone.fpn_lateral{k}.{p}", "backbone.fpn.inner_blocks.{k-2}.0.{p}"),
    ("backbone.fpn_output{k}.{p}", "backbone.fpn.layer_blocks.{k-2}.0.{p}"),
    ("proposal_generator.rpn_head.conv.{p}", "rpn.head.conv.0.0.{p}"),
    ("proposal_generator.rpn_head.objectness_logits.{p}", "rpn.head.cls_logits.{p}"),
    ("proposal_generator.rpn_head.anchor_deltas.{p}", "rpn.head.bbox_pred.{p}"),
    ("roi_heads.box_head.fc1.{p}", "roi_heads.box_head.fc6.{p}"),
    ("roi_heads.box_head.fc2.{p}", "roi_heads.box_head.fc7.{p}"),
    ("roi_heads.box_predictor.cls_score.{p}", f"{_CLS}.{{p}}"),
    ("roi_heads.box_predictor.bbox_pred.{p}", f"{_BOX}.{{p}}"),
    ("roi_heads.mask_head.mask_fcn{k}.{p}", "roi_heads.mask_head.{k-1}.0.{p}"),
    ("roi_heads.mask_head.deconv.{p}", "roi_heads.mask_predictor.conv5_mask.{p}"),
    ("roi_heads.mask_head.predictor.{p}", f"{_MASK}.{{p}}"),
]
_FIELD = re.compile(r"\{(\w)(-\d)?\}")


@functools.lru_cache(maxsize=64)
def _pattern(template: str) -> re.Pattern[str]:
    parts = _FIELD.split(template)  # text, name, offset, text, name, offset, ..., text
    regex = "".join(
        re.escape(p) if i % 3 == 0 else (f"(?P<{p}>[a-z_]+)" if p == "p" else f"(?P<{p}>[0-9]+)") for i, p in enumerate(parts) if i % 3 != 2
    )
    return re.compile(regex)


def _rename(name: str, source: int) -> str | None:
    """Map ``name`` through :data:`_NAMES` from side ``source`` (0: Detectron2, 1: torchvision) to the other side."""
    for pair in _NAMES:
        match = _pattern(pair[source]).fullmatch(name)
        if match is None:
            continue
        values = dict(match.groupdict())
        for field, offset in _FIELD.findall(pair[source]):  # undo this side's offsets: back to Detectron2's numbers
            if offset:
                values[field] = str(int(values[field]) - int(offset))
        return _FIELD.sub(lambda m, v=values: str(int(v[m[1]]) + int(m[2])) if m[2] else v[m[1]], pair[1 - source])  # type: ignore[misc]
    return None


#: Detectron2 entries that are not weights of the network: input statistics (from the config), cached anchors, BN counters.
_IGNORED = re.compile(r"^(pixel_mean|pixel_std|proposal_generator\.anchor_generator\..*|.*\.num_batches_tracked)$")


def torchvision_name(detectron2_name: str) -> str | None:
    """Return the torchvision state-dict name of a Detectron2 Mask R-CNN FPN weight, or ``None`` if it has none."""
    return _rename(detectron2_name, 0)


def detectron2_name(torchvision_name: str) -> str | None:
    """Return the Detectron2 name of a torchvision Mask R-CNN FPN weight (the inverse of :func:`torchvision_name`)."""
    return _rename(torchvision_name, 1)


class _Skipped:
    """Stands in for any pickled object that is not an array: it accepts whatever it is built with, and does nothing."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass

    def __setitem__(self, key: object, value: object) -> None:
        pass

    def append(self, value: object) -> None:
        pass

    def extend(self, values: object) -> None:
        pass


def _numpy_globals() -> dict[str, Any]:
    """The globals numpy 1 and 2 pickle arrays and scalars with, by the names they are pickled under."""
    from numpy import dtypes

    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy 2 names its module numpy._core.multiarray, numpy 1 numpy.core.multiarray
    module = importlib.import_module(reconstruct.__module__)
    found: dict[str, Any] = {}
    for core in ("numpy.core", "numpy._core"):
        found[f"{core}.multiarray._reconstruct"] = module._reconstruct
        found[f"{core}.multiarray.scalar"] = module.scalar
    found["numpy.ndarray"] = np.ndarray
    found["numpy.dtype"] = np.dtype
    for name in dir(dtypes):
        if name.endswith("DType"):
            found[f"numpy.dtypes.{name}"] = getattr(dtypes, name)
    return found


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickle dicts, lists, numbers, strings and numpy arrays; every other global becomes :class:`_Skipped`."""

    allowed: ClassVar[dict[str, Any]] = {**_numpy_globals(), "collections.OrderedDict": OrderedDict}

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get(f"{module}.{name}")
        return found if found is not None else _Skipped


def load_detectron2_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the ``model`` state dict of a Detectron2 checkpoint (``.pth`` or ``.pkl``) as float32 tensors, running no code.

    Raises:
        WeightsError: The file is missing, unreadable, or holds no state dict of arrays.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"Detectron2 checkpoint {p} does not exist; give the model_final.pth the model was saved as")
    if zipfile.is_zipfile(p):
        data = _torch_load(p)
    else:  # a plain pickle (Detectron2's model zoo .pkl), or torch's legacy format, whose first pickle is a magic number
        try:
            with p.open("rb") as f:
                data = _ArrayUnpickler(f, encoding="latin1").load()
        except Exception as err:  # noqa: BLE001 - arbitrary bytes fail in any way; nothing was imported or run
            raise WeightsError(
                f"{p} is not a readable Detectron2 checkpoint ({first_line(err, 160, with_type=True)}); it may be truncated"
            ) from None
        if not isinstance(data, dict):
            data = _torch_load(p)
    state = data.get("model", data) if isinstance(data, dict) else data
    if not isinstance(state, dict) or not state:
        raise WeightsError(f"{p} holds no state dict (expected {{'model': {{name: array}}}}); give a Detectron2 checkpoint")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
            out[str(key)] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        elif isinstance(value, torch.Tensor):
            out[str(key)] = value.detach().float()
        else:
            raise WeightsError(f"{p}: model entry {key!r} is a {type(value).__name__}, not an array; give a Detectron2 checkpoint")
    return out


def _torch_load(p: Path) -> Any:
    """``torch.load(weights_only=True)`` with numpy arrays allowed; unknown globals are replaced by :class:`_Skipped`."""
    safe: list[Any] = [(obj, name) for name, obj in _numpy_globals().items()]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        blocked = [line.strip() for line in str(err).splitlines() if "is blocked" in line]
        if blocked:  # torch refuses os/sys/posix globals outright: no Detectron2 file holds one, a malicious pickle does
            raise WeightsError(
                f"{p} refers to a blocked system function ({blocked[0][:160]}); it is not a plain checkpoint, do not load it"
            ) from None
        if "Unsupported global" not in str(err):
            raise WeightsError(f"{p} is not a readable PyTorch checkpoint ({first_line(err, 160)}); it may be truncated") from None
    except Exception as err:  # noqa: BLE001 - torch's weights-only reader fails on garbage in many ways; no code ran
        raise WeightsError(
            f"{p} is not a readable PyTorch checkpoint ({first_line(err, 160, with_type=True)}); it may be truncated"
        ) from None
    # The file pickles objects besides the weights (an optimizer's or scheduler's state): name each such
    # global as an inert stand-in, so the weights-only reader never imports or calls it.
    unknown = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(p) if g not in _numpy_globals()]
    log.info("%s: %d pickled non-array globals skipped (%s)", p, len(unknown), ", ".join(unknown[:3]))
    stand_ins = [(type(f"Skipped_{i}", (_Skipped,), {}), name) for i, name in enumerate(unknown)]
    try:
        with torch.serialization.safe_globals(safe + stand_ins):
            return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - as above
        raise WeightsError(
            f"{p}: cannot read its weights as data ({first_line(err, 160, with_type=True)}); save only the model's state dict"
        ) from None


def convert_state_dict(weights: dict[str, torch.Tensor], config: Detectron2Config, source: str) -> dict[str, torch.Tensor]:
    """Map a Detectron2 Mask R-CNN FPN state dict to the one :func:`build_detectron2_model` takes.

    Raises:
        WeightsError: Keys are missing or unexpected, the class count differs from the config's, or a shape is wrong.
    """
    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in weights.items():
        if _IGNORED.match(key):
            continue
        name = torchvision_name(key)
        if name is None:
            unexpected.append(key)
        else:
            mapped[name] = value
    with torch.device("meta"):  # names and shapes only: nothing allocated or initialised
        own = build_detectron2_model(config.arch, config.num_classes, 64, 1).state_dict()
    missing = [detectron2_name(k) or k for k in own if k not in mapped]
    unexpected += [detectron2_name(k) or k for k in mapped if k not in own]  # e.g. res4.6+ in an R50 config
    if missing:
        more = f" and {len(missing) - 6} more" if len(missing) > 6 else ""
        raise WeightsError(
            f"{source} lacks {len(missing)} weights of a Detectron2 Mask R-CNN R{config.arch.depth}-FPN: {', '.join(missing[:6])}{more}; "
            "give the checkpoint the config belongs to (MODEL.RESNETS.DEPTH, MODEL.MASK_ON)"
        )
    if unexpected:
        more = f" and {len(unexpected) - 6} more" if len(unexpected) > 6 else ""
        raise WeightsError(
            f"{source} has {len(unexpected)} weights a Mask R-CNN R{config.arch.depth}-FPN does not: {', '.join(unexpected[:6])}{more}; "
            "check that --config is the model's config (its depth and heads)"
        )
    k = config.num_classes
    have = int(mapped[f"{_CLS}.weight"].shape[0]) - 1
    if have != k:
        raise WeightsError(
            f"{source} has {have} classes but the config says MODEL.ROI_HEADS.NUM_CLASSES: {k}; set it to {have} in the config"
        )
    for part in ("weight", "bias"):
        cls = mapped[f"{_CLS}.{part}"]
        mapped[f"{_CLS}.{part}"] = torch.cat([cls[k:], cls[:k]])  # background: last in Detectron2, first in torchvision
        box = mapped[f"{_BOX}.{part}"]
        want_box = 4 if config.cls_agnostic_bbox_reg else 4 * k
        _check_rows(source, "roi_heads.box_predictor.bbox_pred", part, box, want_box)
        mapped[f"{_BOX}.{part}"] = (
            box.repeat(k + 1, *[1] * (box.dim() - 1)) if config.cls_agnostic_bbox_reg else torch.cat([torch.zeros_like(box[:4]), box])
        )
        mask = mapped[f"{_MASK}.{part}"]
        _check_rows(source, "roi_heads.mask_head.predictor", part, mask, 1 if config.cls_agnostic_mask else k)
        mapped[f"{_MASK}.{part}"] = (
            mask.repeat(k + 1, *[1] * (mask.dim() - 1)) if config.cls_agnostic_mask else torch.cat([torch.zeros_like(mask[:1]), mask])
        )
    if config.input_format == "BGR":
        mapped[_CONV1] = mapped[_CONV1].flip(1)  # geomask feeds RGB
    for name, value in mapped.items():
        if tuple(value.shape) != tuple(own[name].shape):
            raise WeightsError(
                f"{source}: {detectron2_name(name)} has shape {tuple(value.shape)}, a Mask R-CNN R{config.arch.depth}-FPN needs "
                f"{tuple(own[name].shape)}; check that --config is the model's config"
            )
    return mapped


def _check_rows(source: str, name: str, part: str, value: torch.Tensor, rows: int) -> None:
    if value.shape[0] != rows:
        raise WeightsError(
            f"{source}: {name}.{part} has {value.shape[0]} outputs, the config implies {rows}; "
            "check MODEL.ROI_HEADS.NUM_CLASSES and the CLS_AGNOSTIC settings in the config"
        )


def import_detectron2(
    weights: str | Path,
    config: str | Path,
    output: str | Path,
    classes: list[str] | None = None,
    tile_size_px: int = 512,
    gsd_m: float | None = None,
    input_format: str | None = None,
    attribution: str = "",
) -> tuple[Path, CheckpointMeta]:
    """Convert a Detectron2 Mask R-CNN checkpoint and its config into a geomask checkpoint at ``output``.

    Args:
        weights: Detectron2 ``.pth`` (``torch.save``) or ``.pkl`` (pickled numpy arrays) checkpoint.
        config: Its Detectron2 YAML config (``_BASE_`` files must be local).
        output: Destination ``.pt`` file (written atomically).
        classes: Class names in Detectron2's class order; default ``class_0`` ...
        tile_size_px: The tile size ``predict`` should default to.
        gsd_m: Ground sample distance of the training imagery in metres, if known (``predict`` resamples to it).
        input_format: ``BGR`` or ``RGB``, overriding ``INPUT.FORMAT`` (for models trained on channels in the other order).
        attribution: Credit owed to the model's authors, carried in the checkpoint.

    Returns:
        The written path and its metadata.
    """
    cfg = read_detectron2_config(config)
    if input_format is not None:
        if input_format not in ("BGR", "RGB"):
            raise WeightsError(f"input format {input_format!r} is not BGR or RGB")
        if input_format != cfg.input_format:
            mean, std = cfg.arch.pixel_mean_rgb, cfg.arch.pixel_std_rgb
            arch = type(cfg.arch)(**{**cfg.arch.__dict__, "pixel_mean_rgb": mean[::-1], "pixel_std_rgb": std[::-1]})
            cfg = type(cfg)(**{**cfg.__dict__, "arch": arch, "input_format": input_format})
    if classes is not None and len(classes) != cfg.num_classes:
        raise WeightsError(f"{len(classes)} class names given but the model has {cfg.num_classes} classes (MODEL.ROI_HEADS.NUM_CLASSES)")
    source = Path(weights)
    state = convert_state_dict(load_detectron2_weights(source), cfg, str(source))
    meta = CheckpointMeta(
        arch=cfg.arch.arch,
        classes=tuple(classes) if classes is not None else tuple(f"class_{i}" for i in range(cfg.num_classes)),
        tile_size_px=tile_size_px,
        gsd_m=gsd_m,
        normalize_mode="auto",
        attribution=attribution,
        training={
            "converted_from": "detectron2",
            "checkpoint": source.name,
            "checkpoint_sha256": file_sha256(source),
            "config": Path(config).name,
            "input_format": cfg.input_format,
            "min_size_test": cfg.min_size_test,
            "max_size_test": cfg.max_size_test,
        },
        inference=check_inference(
            {"score_threshold": cfg.score_thresh_test, "nms_threshold": cfg.nms_thresh_test, "detections_per_img": cfg.detections_per_image}
        ),
        arch_options=cfg.arch.to_dict(),
    )
    return save_checkpoint(output, meta, state), meta
