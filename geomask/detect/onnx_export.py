"""Export the built-in Mask R-CNN to ONNX, with everything needed to run it stored in the file.

The whole torchvision model is exported (transform, backbone, RPN, heads, box and mask post-processing)
with the TorchScript-based exporter (``dynamo=False``, opset 17): the ``dynamo=True`` exporter fails inside
torchvision's ``batched_nms`` (torchvision #9321, #9306). The graph takes one ``(3, height, width)``
float32 image in ``[0, 1]`` with dynamic height and width; batching is not supported, because torchvision
exports a batch of two as two fixed inputs (torchvision #2311).

The model's resize is replaced by the identity before tracing, so the exported graph never rescales:
a pixel in is a pixel out at any tile size, as the torch detector ensures by setting ``min_size =
max_size = side`` per batch. Score threshold, NMS threshold and detections per tile are constants of the
graph; they are written into the metadata as ``baked`` so the ONNX Runtime detector can refuse options it
cannot honour instead of silently ignoring them.

Metadata (``metadata_props`` key ``geomask``, JSON): ``format`` ``geomask-onnx``, ``format_version``, the
checkpoint's metadata (arch, classes, tile size, GSD, bands, normalisation, attribution, metrics,
inference defaults) and ``baked``. See :mod:`geomask.detect.onnxrt` for the reader.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from geomask.atomic import replacing
from geomask.detect.architectures import COCO_WEIGHTS, IMPORTED_ARCHS
from geomask.detect.checkpoint import CheckpointMeta, load_checkpoint
from geomask.detect.maskrcnn import build
from geomask.detect.onnxrt import METADATA_KEY, ONNX_FORMAT, ONNX_FORMAT_VERSION, OUTPUT_NAMES
from geomask.errors import WeightsError, first_line
from geomask.models import bundled_model_path

log = logging.getLogger(__name__)
OPSET = 17


class _NoResize(nn.Module):
    """Stand-in for ``GeneralizedRCNNTransform.resize``: returns the image and target unchanged."""

    def forward(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor] | None]:
        return image, target


def _checkpoint_meta(weights: str | None) -> CheckpointMeta | None:
    if weights in COCO_WEIGHTS:
        return None
    shipped = bundled_model_path(weights)
    return load_checkpoint(shipped if shipped is not None else Path(str(weights))).meta


def export_onnx(
    weights: str | None,
    output: str | Path,
    score_threshold: float | None = None,
    nms_threshold: float | None = None,
    detections_per_img: int | None = None,
    classes: Sequence[str] | None = None,
) -> Path:
    """Write ``weights`` (a checkpoint path, a shipped model name, ``coco``) as one self-contained ONNX file.

    Args:
        weights: What :func:`geomask.detect.maskrcnn.build` accepts as ``weights``.
        output: Destination ``.onnx`` file (written atomically).
        score_threshold: Lowest score the graph keeps (default: the checkpoint's inference default, else 0.5).
            Export lower than you will predict with: the ONNX detector can raise it, never lower it.
        nms_threshold: Box NMS IoU baked into the graph (default: the checkpoint's, else 0.5).
        detections_per_img: Most detections per tile baked into the graph (default: the checkpoint's, else 300).
        classes: Class names overriding the checkpoint's.

    Raises:
        WeightsError: The weights cannot be loaded, or the export or the output write failed.
    """
    out = Path(output)
    if out.suffix.lower() != ".onnx":
        raise WeightsError(f"ONNX output {str(out)!r} must end with .onnx (predict chooses the ONNX detector by that suffix)")
    if not out.parent.is_dir():
        raise WeightsError(f"cannot write {out}: folder {out.parent} does not exist; create it first")
    try:
        import onnx
    except ImportError:
        raise WeightsError("export-model needs the onnx package; install it with: pip install 'geomask[onnx]'") from None
    meta = _checkpoint_meta(weights)
    if meta is not None and meta.inference.get("tta", 1) != 1:
        # The graph is one view per call (the view fusion is the torch detector's): keep the file honest about it.
        log.warning(
            "%s: the checkpoint's inference defaults use test-time augmentation (tta %s); the ONNX graph runs without it "
            "(its accuracy can be lower than the checkpoint's stated metrics, which were measured with it)",
            weights,
            meta.inference["tta"],
        )
        meta = replace(meta, inference={k: v for k, v in meta.inference.items() if k != "tta"})
    if meta is not None and meta.arch in IMPORTED_ARCHS:
        raise WeightsError(
            f"{weights} is a converted {meta.arch} model, which export-model does not support (its Detectron2 mask pasting and "
            "anchors would be traced as constants); predict with the .pt checkpoint"
        )
    detector = build(
        weights,
        device="cpu",
        score_threshold=score_threshold,
        nms_threshold=nms_threshold,
        detections_per_img=detections_per_img,
        classes=classes,
        tta=1,
        amp=False,
    )
    model = detector.model.eval()
    model.transform.resize = _NoResize()  # type: ignore[assignment,method-assign]
    side = detector.tile_size_px
    example = torch.rand(3, side, side, generator=torch.Generator().manual_seed(0))
    baked = {
        "score_threshold": float(model.roi_heads.score_thresh),
        "nms_threshold": float(model.roi_heads.nms_thresh),
        "detections_per_img": int(model.roi_heads.detections_per_img),
    }
    info: dict[str, Any] = {
        "format": ONNX_FORMAT,
        "format_version": ONNX_FORMAT_VERSION,
        **(asdict(meta) if meta is not None else {"arch": detector.name.split(":")[0].removeprefix("maskrcnn-"), "tile_size_px": side}),
        "classes": list(detector.classes),
        "name": detector.name,
        "mask_threshold": detector.mask_threshold,
        "baked": baked,
        "exported_with": {"torch": str(torch.__version__), "opset": OPSET},
    }
    dynamic = {"image": {1: "height", 2: "width"}, **{name: {0: "detections"} for name in OUTPUT_NAMES}}
    try:
        with replacing(out) as tmpdir:
            raw = tmpdir / "raw.onnx"
            # The tracer warns about every data-dependent branch of torchvision's detection code (known, handled by
            # its ONNX paths); a user would see dozens of lines that say nothing about their model.
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model,
                    ([example],),
                    str(raw),
                    dynamo=False,
                    opset_version=OPSET,
                    input_names=["image"],
                    output_names=list(OUTPUT_NAMES),
                    dynamic_axes=dynamic,
                    do_constant_folding=True,
                )
            proto = onnx.load(str(raw))
            raw.unlink()
            entry = proto.metadata_props.add()
            entry.key, entry.value = METADATA_KEY, json.dumps(info, default=str)
            proto.producer_name = "geomask"
            onnx.save(proto, str(tmpdir / out.name))
    except (RuntimeError, OSError, ValueError) as err:
        raise WeightsError(f"cannot export {detector.name} to ONNX ({first_line(err, 200)})") from None
    log.info("exported %s to %s (baked %s)", detector.name, out, baked)
    return out
