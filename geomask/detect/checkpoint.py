"""The geomask checkpoint format: a state dict plus what is needed to use it, loaded as data only.

A checkpoint is a plain ``dict`` of tensors, strings, numbers, lists and dicts, written with
``torch.save`` and read with ``torch.load(weights_only=True)``: loading one never runs code, so a
checkpoint from a stranger is as safe to open as an image. Layout (``FORMAT_VERSION`` 1)::

    {"format": "geomask-checkpoint", "format_version": 1,
     "arch": "resnet18_fpn", "classes": ["building"], "tile_size_px": 256, "gsd_m": 0.3,
     "bands": [1, 2, 3], "normalize_mode": "auto", "percentiles": [2.0, 98.0],
     "attribution": "...", "metrics": {"val_f1": 0.5}, "training": {...},
     "inference": {"score_threshold": 0.8, "tta": 4, ...} (optional: the model card's settings),
     "arch_options": {...} (optional: what the architecture's builder needs beyond its name),
     "state_dict": {...}, "train_state": {...} (optional: optimizer, iteration, for resuming)}

Plain torchvision state dicts (e.g. the COCO weights) are read too, without metadata.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import asdict, dataclass, field
from dataclasses import replace as replaced
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geomask.atomic import replacing
from geomask.detect.base import ModelHints
from geomask.errors import WeightsError, first_line

FORMAT = "geomask-checkpoint"
FORMAT_VERSION = 1
_CLS_KEY = "roi_heads.box_predictor.cls_score.weight"
#: Inference defaults a checkpoint may carry, with their types. Detector options (the first five) are
#: used by :func:`geomask.detect.maskrcnn.build` when not given; ``min_area_m2``, ``simplify_tolerance_m``
#: and ``shape`` (the polygon method, by name) fill the config's vectorize settings that are left at their
#: defaults. Keys a newer geomask wrote are kept when read, and ignored.
INFERENCE_KEYS: dict[str, type] = {
    "score_threshold": float,
    "mask_threshold": float,
    "nms_threshold": float,
    "detections_per_img": int,
    "tta": int,
    "min_area_m2": float,
    "simplify_tolerance_m": float,
    "shape": str,
}


def check_inference(values: dict[str, Any]) -> dict[str, Any]:
    """Return ``values`` as plain typed inference defaults, or raise :class:`WeightsError` naming the first bad key.

    Called when writing defaults, so a typo is caught where it is made, not silently ignored by ``predict``.
    """
    out: dict[str, Any] = {}
    for key, value in values.items():
        kind = INFERENCE_KEYS.get(key)
        if kind is None:
            raise WeightsError(f"unknown inference default {key!r}; use some of {sorted(INFERENCE_KEYS)}")
        if kind is str:
            if not isinstance(value, str):
                raise WeightsError(f"inference default {key} must be a name, got {value!r}")
            out[key] = value
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
            raise WeightsError(f"inference default {key} must be a{'n integer' if kind is int else ' number'}, got {value!r}")
        out[key] = kind(value)
    return out


@dataclass(frozen=True)
class CheckpointMeta:
    """Everything besides the weights that ``predict`` needs, plus provenance.

    Attributes:
        arch: Architecture name understood by :func:`geomask.detect.maskrcnn.build_model`.
        classes: Class names, background excluded; ``class_id`` indexes this list.
        tile_size_px: Tile (chip) size the model was trained on, working-grid pixels.
        gsd_m: Ground sample distance of the training chips in metres, or ``None`` (native).
        bands: 1-based band indexes in model order, or ``None`` (first three).
        normalize_mode: Normalisation mode the training chips used (see ``raster.normalize.mode``).
        percentiles: Percentiles for ``percentile`` normalisation.
        attribution: Credit owed to the training data's authors; travels with every copy.
        metrics: Validation metrics at the time of saving (e.g. ``val_f1``).
        training: Free-form provenance (iterations, seconds, hardware, command line).
        inference: Inference defaults chosen for this model (see :data:`INFERENCE_KEYS`), so that naming
            the weights alone gives the model card's accuracy; a config overrides each of them.
        arch_options: Settings that shape the architecture beyond its name, read by its builder (a
            converted Detectron2 model's pixel statistics, anchors and poolers:
            :class:`geomask.detect.d2_arch.Detectron2Arch`); empty for geomask's own architectures.
    """

    arch: str
    classes: tuple[str, ...]
    tile_size_px: int
    gsd_m: float | None = None
    bands: tuple[int, ...] | None = None
    normalize_mode: str | None = "auto"
    percentiles: tuple[float, float] | None = None
    attribution: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    inference: dict[str, Any] = field(default_factory=dict)
    arch_options: dict[str, Any] = field(default_factory=dict)

    def hints(self) -> ModelHints:
        """Return the settings ``predict`` should default to for this model."""
        return ModelHints(
            tile_size_px=self.tile_size_px,
            gsd_m=self.gsd_m,
            bands=self.bands,
            normalize_mode=self.normalize_mode,
            percentiles=self.percentiles,
            min_area_m2=self.inference.get("min_area_m2"),
            simplify_tolerance_m=self.inference.get("simplify_tolerance_m"),
            shape=self.inference.get("shape"),
        )


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: metadata (``None`` for a plain torchvision state dict) and weights."""

    meta: CheckpointMeta | None
    state_dict: dict[str, torch.Tensor]
    train_state: dict[str, Any] | None = None

    @property
    def num_classes(self) -> int | None:
        """Number of object classes the weights were trained for (background excluded), if known."""
        weight = self.state_dict.get(_CLS_KEY)
        return None if weight is None else int(weight.shape[0]) - 1


def save_checkpoint(
    path: str | Path,
    meta: CheckpointMeta,
    state_dict: dict[str, torch.Tensor],
    train_state: dict[str, Any] | None = None,
    half: bool = False,
) -> Path:
    """Write a checkpoint atomically (temp file + rename), so a killed run never leaves a torn file.

    Args:
        path: Destination ``.pt`` file.
        meta: Metadata stored beside the weights.
        state_dict: Model weights (moved to the CPU before writing).
        train_state: Optional optimizer state and counters for resuming training.
        half: Store floating-point weights as float16 (halves the file; used for the bundled model).
    """
    out = Path(path)
    weights = {}
    for key, value in state_dict.items():
        tensor = value.detach().cpu()
        if half and tensor.is_floating_point():
            tensor = tensor.half()
        weights[key] = tensor.contiguous()
    data: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, **_meta_to_dict(meta), "state_dict": weights}
    if train_state is not None:
        data["train_state"] = train_state
    if not out.parent.is_dir():
        raise WeightsError(f"cannot write checkpoint {out}: folder {out.parent} does not exist; create it first")
    try:
        with replacing(out) as tmpdir:  # a run stopped mid-write keeps the previous checkpoint whole
            torch.save(data, tmpdir / out.name)
    except (OSError, RuntimeError) as err:  # torch reports write failures as RuntimeError
        raise WeightsError(f"cannot write checkpoint {out} ({first_line(err, 200)}); check the folder is writable and has space") from None
    return out


def _meta_to_dict(meta: CheckpointMeta) -> dict[str, Any]:
    # A JSON round trip turns tuples into lists and str/float subclasses (torch's TorchVersion, numpy
    # scalars) into plain values: anything else would make the file unloadable with weights_only=True.
    try:
        data: dict[str, Any] = json.loads(json.dumps(asdict(meta), default=_plain))
    except (TypeError, ValueError) as err:
        raise WeightsError(f"checkpoint metadata must be plain JSON-like values ({err}); convert it before saving") from None
    return data


def _plain(value: object) -> object:
    if isinstance(value, (np.generic,)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not a plain value")


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a geomask checkpoint or a plain torchvision state dict, as data only.

    Raises:
        WeightsError: The file is missing, unreadable, holds pickled objects, or is not a checkpoint.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(
            f"weights file {str(p)!r} does not exist; give a checkpoint from `geomask train` or omit --weights for the bundled model"
        )
    unreadable = f"{p} is not a readable PyTorch checkpoint"
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's weights-only refusal names the offending class on a later line; garbage fails the same way without one
        refused = [line.strip().split(" was not", 1)[0][:200] for line in str(err).splitlines() if "Unsupported global" in line]
        if not refused:
            raise WeightsError(f"{unreadable} ({first_line(err, 200)}); it may be truncated or not a .pt file") from None
        raise WeightsError(
            f"{p} holds pickled Python objects ({refused[0]}), which could run arbitrary code; "
            "geomask loads only weights-only checkpoints: save a plain state dict or a `geomask train` checkpoint"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise WeightsError(f"{unreadable} ({first_line(err, 200)}); it may be truncated or not a .pt file") from None
    except Exception as err:  # noqa: BLE001 - random bytes make torch's weights-only unpickler fail in any way (KeyError, IndexError, ...); no code ran
        raise WeightsError(f"{unreadable} ({first_line(err, 200, with_type=True)}); it may be truncated or not a .pt file") from None
    return checkpoint_from_data(data, str(p))


def checkpoint_from_data(data: object, source: str) -> Checkpoint:
    """Interpret loaded data as a geomask checkpoint or a plain state dict (``source`` names it in errors)."""
    if not isinstance(data, dict):
        raise WeightsError(f"{source} holds a {type(data).__name__}, not a checkpoint; give a file written by `geomask train`")
    if data.get("format") == FORMAT:
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise WeightsError(f"{source} has checkpoint format version {version!r}; this geomask reads up to {FORMAT_VERSION}, upgrade it")
        state = data.get("state_dict")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise WeightsError(f"{source} is a geomask checkpoint without a valid state_dict; it is corrupt, re-create it")
        try:
            meta = _meta_from_dict(data)
        except (KeyError, TypeError, ValueError) as err:
            raise WeightsError(f"{source} has invalid checkpoint metadata ({err}); re-create it with `geomask train`") from None
        train_state = data.get("train_state")
        return Checkpoint(meta, state, train_state if isinstance(train_state, dict) else None)
    if data and all(isinstance(k, str) for k in data) and all(isinstance(v, torch.Tensor) for v in data.values()):
        return Checkpoint(None, data)
    raise WeightsError(f"{source} is neither a geomask checkpoint nor a state dict; give a file written by `geomask train`")


def _meta_from_dict(data: dict[str, Any]) -> CheckpointMeta:
    bands = data.get("bands")
    percentiles = data.get("percentiles")
    return CheckpointMeta(
        arch=str(data["arch"]),
        classes=tuple(str(c) for c in data["classes"]),
        tile_size_px=int(data["tile_size_px"]),
        gsd_m=None if data.get("gsd_m") is None else float(data["gsd_m"]),
        bands=None if bands is None else tuple(int(b) for b in bands),
        normalize_mode=data.get("normalize_mode"),
        percentiles=None if percentiles is None else (float(percentiles[0]), float(percentiles[1])),
        attribution=str(data.get("attribution", "")),
        metrics={str(k): float(v) for k, v in dict(data.get("metrics") or {}).items()},
        training=dict(data.get("training") or {}),
        inference=_read_inference(data.get("inference")),
        arch_options=dict(data.get("arch_options") or {}),
    )


def _read_inference(raw: object) -> dict[str, Any]:
    """Known keys typed (invalid values raise ValueError/TypeError); keys of a newer geomask kept as they are."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise TypeError(f"inference must be a mapping, got {type(raw).__name__}")
    known = {k: v for k, v in raw.items() if k in INFERENCE_KEYS}
    try:
        typed = check_inference(known)
    except WeightsError as err:
        raise ValueError(str(err)) from None
    return {**{str(k): v for k, v in raw.items() if k not in INFERENCE_KEYS}, **typed}


def set_inference_defaults(source: str | Path, destination: str | Path, values: dict[str, Any], replace: bool = False) -> Path:
    """Write a copy of a checkpoint whose inference defaults are updated with ``values`` (weights untouched).

    Args:
        source: A geomask checkpoint.
        destination: Where to write (may be ``source``; the write is atomic).
        values: Inference defaults to set (see :data:`INFERENCE_KEYS`); a ``None`` value removes a key.
        replace: Start from no defaults instead of the checkpoint's.
    """
    ckpt = load_checkpoint(source)
    if ckpt.meta is None:
        raise WeightsError(f"{source} is a plain state dict without metadata; only geomask checkpoints carry inference defaults")
    merged = {} if replace else dict(ckpt.meta.inference)
    merged.update(check_inference({k: v for k, v in values.items() if v is not None}))
    for key in [k for k, v in values.items() if v is None]:
        merged.pop(key, None)
    meta = replaced(ckpt.meta, inference=merged)
    return save_checkpoint(destination, meta, ckpt.state_dict, train_state=ckpt.train_state)


def export_half(source: str | Path, destination: str | Path, metrics: dict[str, float] | None = None) -> Path:
    """Write an inference-only copy of a checkpoint: float16 weights, no optimizer state.

    Halves the file (the bundled model ships this way); weights are cast back to float32 on load.
    ``metrics`` replace the stored validation metrics (e.g. with those measured on full rasters).
    """
    ckpt = load_checkpoint(source)
    if ckpt.meta is None:
        raise WeightsError(f"{source} is a plain state dict without metadata; only geomask checkpoints can be exported")
    meta = ckpt.meta if metrics is None else replaced(ckpt.meta, metrics=dict(metrics))
    return save_checkpoint(destination, meta, ckpt.state_dict, half=True)
