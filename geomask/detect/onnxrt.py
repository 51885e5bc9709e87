"""The ONNX Runtime detector: a Mask R-CNN exported by ``geomask export-model``, run without torch.

This module imports numpy and onnxruntime only (an import-linter contract forbids torch here), so a
worker that predicts with ONNX weights never loads torch: smaller install, faster start, less memory
per process. Everything the model needs (classes, hints, inference defaults) comes from the file's
metadata (see :mod:`geomask.detect.onnx_export`).

Its output equals the torch detector's within a tolerance, not bit for bit: the exported graph pastes
masks with torchvision's ONNX loop, not its batched paste, and ONNX Runtime orders float sums
differently (measured on trained models: matched boxes IoU ≥ 0.99, mask IoU ≥ 0.98, scores within 1e-3).
Tiles run one per session call, since the graph takes one image. Test-time augmentation is not offered
(``tta`` > 1 is refused): its view fusion is the torch detector's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from geomask.detect.base import ModelCard, ModelHints, TileImage
from geomask.detect.masks import instances_from_masks
from geomask.errors import DetectorError, WeightsError, first_line
from geomask.instances import Instance

log = logging.getLogger(__name__)

METADATA_KEY = "geomask"
ONNX_FORMAT = "geomask-onnx"
ONNX_FORMAT_VERSION = 1
OUTPUT_NAMES = ("boxes", "labels", "scores", "masks")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Return the geomask metadata of an exported ONNX file (without building a session).

    Raises:
        WeightsError: The file is missing, not ONNX, or was not written by ``geomask export-model``.
    """
    return _metadata(_session(path, ["CPUExecutionProvider"]), str(path))


def _session(path: str | Path, chosen: list[Any], threads: int = 0) -> Any:
    ort = _onnxruntime()
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"ONNX weights {str(p)!r} do not exist; write them with `geomask export-model WEIGHTS -o {p.name}`")
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(0, threads)
    options.log_severity_level = 3  # the exported graph trips harmless shape-inference warnings
    try:
        return ort.InferenceSession(str(p), options, providers=chosen)
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own untyped errors for a bad file
        raise WeightsError(f"{p} is not a readable ONNX model ({first_line(err, 160)}); re-export it with `geomask export-model`") from None


def _metadata(session: Any, source: str) -> dict[str, Any]:
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if raw is None:
        raise WeightsError(f"{source} has no geomask metadata; only models written by `geomask export-model` can be run")
    info: dict[str, Any] = json.loads(raw)
    version = info.get("format_version")
    if info.get("format") != ONNX_FORMAT or not isinstance(version, int) or version > ONNX_FORMAT_VERSION:
        raise WeightsError(
            f"{source} has ONNX format {info.get('format')!r} v{version!r}; this geomask reads v{ONNX_FORMAT_VERSION}, upgrade it"
        )
    return info


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise DetectorError("ONNX weights need onnxruntime; install it with: pip install 'geomask[onnx]'") from None
    return onnxruntime


def hints_from_metadata(info: dict[str, Any]) -> ModelHints:
    """Return the :class:`ModelHints` stored in an exported model's metadata (same fields as a checkpoint's)."""
    inference = dict(info.get("inference") or {})
    bands, pct = info.get("bands"), info.get("percentiles")
    return ModelHints(
        tile_size_px=info.get("tile_size_px"),
        gsd_m=info.get("gsd_m"),
        bands=None if bands is None else tuple(int(b) for b in bands),
        normalize_mode=info.get("normalize_mode"),
        percentiles=None if pct is None else (float(pct[0]), float(pct[1])),
        channels=3,
        min_area_m2=inference.get("min_area_m2"),
        simplify_tolerance_m=inference.get("simplify_tolerance_m"),
        shape=inference.get("shape"),
    )


def providers(device: str, available: Sequence[str]) -> list[Any]:
    """Return the execution providers for ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``).

    Raises:
        DetectorError: CUDA was asked for but this onnxruntime has no CUDA provider.
    """
    if device == "cpu":
        return ["CPUExecutionProvider"]
    cuda = "CUDAExecutionProvider" in available
    if device == "auto":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise DetectorError(f"device {device!r} is not valid for ONNX weights; use auto, cpu, cuda or cuda:N")
    if not cuda:
        raise DetectorError(
            f"device {device!r} asked for but onnxruntime has no CUDA provider; pip install onnxruntime-gpu or use --device cpu"
        )
    return [("CUDAExecutionProvider", {"device_id": int(index or 0)}), "CPUExecutionProvider"]


class OnnxDetector:
    """Run an exported Mask R-CNN with ONNX Runtime, one tile per session call.

    Tiles are zero-padded to a square of side ``max(tile_size_px, h, w)`` exactly as the torch detector
    pads them, so both back-ends see the same pixels.
    """

    def __init__(
        self,
        session: Any,
        classes: Sequence[str],
        hints: ModelHints,
        name: str,
        score_threshold: float,
        mask_threshold: float,
        card: ModelCard | None = None,
    ):
        self.session = session
        self.card = card or ModelCard()  # the export's stated accuracy, for the run report
        self.classes = tuple(classes)
        self.hints = hints
        self.name = name
        self.score_threshold = score_threshold
        self.mask_threshold = mask_threshold
        self.tile_size_px = int(hints.tile_size_px or 512)

    def detect(self, batch: Sequence[TileImage]) -> list[list[Instance]]:
        """Return the instances of each tile in ``batch`` in global working-grid pixels."""
        return [self._detect_one(image) for image in batch]

    def _detect_one(self, image: TileImage) -> list[Instance]:
        if image.pixels.ndim != 3 or image.pixels.shape[0] != 3:
            raise DetectorError(
                f"{self.name} needs 3-band tiles, got shape {image.pixels.shape}; set raster.bands to three bands (e.g. [1, 2, 3])"
            )
        _, h, w = image.pixels.shape
        side = max(self.tile_size_px, h, w)
        padded = np.zeros((3, side, side), dtype=np.float32)
        padded[:, :h, :w] = image.pixels
        _, labels, scores, masks = self.session.run(list(OUTPUT_NAMES), {"image": padded})
        keep = scores >= self.score_threshold  # the graph kept scores >= its baked threshold, which may be lower
        return instances_from_masks(
            masks[keep, 0, :h, :w],
            scores[keep],
            labels[keep],
            self.mask_threshold,
            int(image.tile.read.row_off),
            int(image.tile.read.col_off),
        )


def build(
    weights: str,
    device: str = "auto",
    score_threshold: float | None = None,
    mask_threshold: float | None = None,
    detections_per_img: int | None = None,
    nms_threshold: float | None = None,
    tta: int | None = None,
    classes: Sequence[str] | None = None,
    tile_size_px: int | None = None,
    arch: str | None = None,
    amp: bool = True,
    threads: int | None = None,
) -> OnnxDetector:
    """Build the ONNX Runtime detector (factory ``geomask.detect.onnxrt:build``; ``predict`` picks it for ``.onnx`` weights).

    Takes the built-in detector's options so a config written for one runs the other. Options the graph
    fixed at export are checked against it: ``nms_threshold`` and ``detections_per_img`` must equal the
    baked values, ``score_threshold`` must not be below the baked one (detections under it are gone),
    ``tta`` must be 1; each refusal says how to re-export. ``amp`` is ignored (the graph is float32).

    Args:
        weights: An ``.onnx`` file written by ``geomask export-model``.
        device: ``auto`` (CUDA provider when present), ``cpu``, ``cuda`` or ``cuda:N``.
        score_threshold: Instances scoring below this are dropped (default: the model's).
        mask_threshold: Mask probability at which a pixel belongs to the instance (default: the model's).
        detections_per_img: Must equal the exported value when given.
        nms_threshold: Must equal the exported value when given.
        tta: Only 1 (off).
        classes: Class names; must match the model's class count.
        tile_size_px: Override the tile size hint (the padding side).
        arch: Must equal the exported architecture when given.
        amp: Ignored.
        threads: Intra-op threads (default: ``OMP_NUM_THREADS``, else onnxruntime's choice).

    Raises:
        DetectorError: An option is invalid or cannot be honoured by this graph.
        WeightsError: The file is missing, unreadable or not a geomask export.
    """
    del amp
    ort = _onnxruntime()
    path = Path(str(weights))
    n_threads = threads if threads is not None else int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    session = _session(path, providers(device, ort.get_available_providers()), n_threads)
    info = _metadata(session, str(path))
    baked = dict(info.get("baked") or {})
    source = str(path)
    if tta not in (None, 1):
        raise DetectorError(f"{source}: test-time augmentation (tta={tta}) is not available with ONNX weights; use the .pt checkpoint")
    for key, given in (("nms_threshold", nms_threshold), ("detections_per_img", detections_per_img)):
        if given is not None and given != baked.get(key):
            raise DetectorError(
                f"{source} was exported with {key}={baked.get(key)}; re-export with `geomask export-model --{key.replace('_', '-')} {given}`"
            )
    if arch is not None and arch != info.get("arch"):
        raise WeightsError(f"{source} holds a {info.get('arch')!r} model but arch={arch!r} was asked for; drop arch")
    floor = float(baked.get("score_threshold", 0.0))
    default = float((info.get("inference") or {}).get("score_threshold", 0.5))  # the torch detector's default too
    score = float(score_threshold) if score_threshold is not None else max(default, floor)
    if not 0.0 <= score <= 1.0:
        raise DetectorError(f"score_threshold must be in [0, 1], got {score}")
    if score < floor:
        raise DetectorError(
            f"{source} keeps scores >= {floor} only; re-export with `geomask export-model --score-threshold {score}` to go lower"
        )
    mask = float(mask_threshold if mask_threshold is not None else info.get("mask_threshold", 0.5))
    if not 0.0 < mask < 1.0:
        raise DetectorError(f"mask_threshold must be in (0, 1), got {mask}")
    names = list(info.get("classes") or [])
    if classes is not None:
        if len(classes) != len(names):
            raise WeightsError(
                f"{source} was trained for {len(names)} classes but {len(classes)} class names were given; drop the classes option"
            )
        names = list(classes)
    hints = hints_from_metadata(info)
    if tile_size_px is not None:
        if tile_size_px < 32:
            raise DetectorError(f"tile_size_px must be at least 32, got {tile_size_px}")
        hints = dataclasses.replace(hints, tile_size_px=tile_size_px)
    name = f"onnx-{info.get('arch')}:{path.name}"
    log.info("loaded %s (%d classes) with %s", name, len(names), session.get_providers()[0])
    metrics = {str(k): float(v) for k, v in dict(info.get("metrics") or {}).items()}
    card = ModelCard(metrics, f"the exported model's metadata, metrics ({source})", str(info.get("attribution") or ""))
    return OnnxDetector(session, names, hints, name, score, mask, card)
