"""Reference check of ``geomask import-model detectron2``: Detectron2 itself vs the converted model, same tiles.

Usage (Detectron2 from a source snapshot, no compiled ``_C``: Mask R-CNN inference needs none of it)::

    git --git-dir=<detectron2 mirror> archive HEAD | tar -x -C /work/d2src
    pip install --target /work/d2deps --no-deps "fvcore<0.1.6" "iopath<0.1.10" yacs "omegaconf<2.4" \\
        antlr4-python3-runtime==4.9.3 tabulate portalocker pycocotools
    PYTHONPATH=.:/work/d2src:/work/d2deps python bench/detectron2_reference.py [--tiles 8] [--out bench/results/detectron2_reference.json]

For each variant, a Detectron2 Mask R-CNN is built from the model-zoo config with a fixed seed, its
random weights perturbed so that the test is not trivial (non-identity frozen batch norm statistics in
every backbone layer, a box classifier and mask predictor scaled so that scores and masks spread over
(0, 1) instead of tying at 1/(K+1) and 0.5), saved with Detectron2's own ``DetectionCheckpointer``
(``model_final.pth``) beside ``cfg.dump()`` (``config.yaml``), converted by geomask, and both models run
on the same real tiles (NEON tree plots, 400 px; fAIr building crops, 512 px). Detectron2 gets the BGR
0–255 image its ``DefaultPredictor`` would pass on (no resize: ``INPUT.MIN_SIZE_TEST`` set to the tile
size); the converted model gets RGB in [0, 1] through geomask's detector (the pixel-in-pixel-out
settings ``MaskRCNNDetector.detect`` uses). Detections are matched one-to-one, greedily by box IoU, same
class; reported: counts, matched box IoU, score differences, mask IoU of the binary masks. The *noise
floor* row compares Detectron2 with itself run on one CPU thread instead of ``--threads``: float
summation order alone moves its features by ~1e-5 relative, which these random, sharpened heads amplify.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
#: Standard deviations the heads' outputs are scaled to on the calibration tile: spread, not saturated.
HEAD_STD = {"objectness_logits": 2.0, "cls_score": 1.5, "bbox_pred": 0.5, "predictor": 3.0}
VARIANTS = {
    # Detectron2's defaults (MSRA ResNet: BGR, stride in the 1x1 conv, std 1), as detectree2's models use.
    "R50-FPN BGR stride-1x1": ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml", []),
    # The other code paths: ResNet-101, stride in the 3x3, RGB with torchvision's statistics, ROIAlign(aligned=False)
    # for boxes, a class-agnostic mask, anchors off the grid by half a stride.
    "R101-FPN RGB stride-3x3": (
        "COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml",
        [
            "MODEL.RESNETS.STRIDE_IN_1X1", False, "INPUT.FORMAT", "RGB",
            "MODEL.PIXEL_MEAN", [123.675, 116.28, 103.53], "MODEL.PIXEL_STD", [58.395, 57.12, 57.375],
            "MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIAlign", "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK", True,
            "MODEL.ANCHOR_GENERATOR.OFFSET", 0.5,
        ],
    ),
}  # fmt: skip


def tiles(n: int) -> list[tuple[str, np.ndarray]]:
    """Return up to ``n`` RGB uint8 ``(3, h, w)`` tiles: NEON plots (400 px) and fAIr crops (512 px), alternating."""
    import rasterio
    from rasterio.windows import Window

    data = Path("/work/shared/data")
    trees = sorted((data / "trees_neon/plots").glob("*.tif"))
    buildings = sorted((data / "buildings_fair").glob("area*/*.tif"))
    out: list[tuple[str, np.ndarray]] = []
    for k in range(n):
        if k % 2 == 0 and trees:
            path = trees[(k // 2) * 7 % len(trees)]
            with rasterio.open(path) as src:
                out.append((path.name, src.read([1, 2, 3])))
        elif buildings:
            path = buildings[(k // 2) % len(buildings)]
            with rasterio.open(path) as src:
                r, c = (src.height - 512) // 2, (src.width - 512) // 2
                out.append((f"{path.name[:24]}@{r},{c}", src.read([1, 2, 3], window=Window(c, r, 512, 512))))
    return out


def calibration_tile() -> np.ndarray:
    """A 512 px crop of the bundled Nairobi sample (not one of the compared tiles), for :func:`calibrate_batch_norm`."""
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(ROOT / "examples/sample_nairobi.tif") as src:
        return np.asarray(src.read([1, 2, 3], window=Window(0, 0, 512, 512)))


def reference_model(config: str, opts: list[object], seed: int, out_dir: Path, calibration: np.ndarray):  # type: ignore[no-untyped-def]
    """Build, perturb and save a Detectron2 Mask R-CNN (2 classes); return (cfg, model, checkpoint, config file)."""
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(str(Path(sys.modules["detectron2"].__file__).parents[1] / "configs" / config))
    cfg.merge_from_list([str(v) if not isinstance(v, str) else v for v in opts])
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    cfg.MODEL.WEIGHTS = ""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    calibrate_batch_norm(model, calibration, g)
    calibrate_heads(model, calibration)
    DetectionCheckpointer(model, save_dir=str(out_dir)).save("model_final")
    (out_dir / "config.yaml").write_text(cfg.dump())
    return cfg, model, out_dir / "model_final.pth", out_dir / "config.yaml"


def calibrate_batch_norm(model, rgb: np.ndarray, g) -> None:  # type: ignore[no-untyped-def]
    """Give every frozen batch norm of the backbone statistics of its input on one image (times random factors).

    Random convolutions on 0–255 input make activations of ~10^3 whose scores all saturate; a trained
    network's batch norms keep them near unit scale. One forward pass, each layer set before it runs
    (a forward pre-hook), gives the same, with weights, biases and statistics that differ per channel.
    """
    import torch
    from detectron2.layers import FrozenBatchNorm2d

    def hook(module, args):  # type: ignore[no-untyped-def]
        x = args[0]
        c = x.shape[1]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)) * (1 + 0.1 * torch.randn(c, generator=g)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)) * (0.8 + 0.4 * torch.rand(c, generator=g)) + 1e-3)
        module.weight.copy_(0.8 + 0.4 * torch.rand(c, generator=g))
        module.bias.copy_(0.1 * torch.randn(c, generator=g))

    handles = [m.register_forward_pre_hook(hook) for m in model.backbone.bottom_up.modules() if isinstance(m, FrozenBatchNorm2d)]
    image = np.ascontiguousarray(rgb[::-1] if model.input_format == "BGR" else rgb).astype(np.float32)
    with torch.no_grad():
        model.backbone(model.preprocess_image([{"image": torch.from_numpy(image)}]).tensor)
    for h in handles:
        h.remove()


def calibrate_heads(model, rgb: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    """Scale the RPN objectness, box classifier, box regression and mask predictor to :data:`HEAD_STD` on one image.

    Detectron2 initialises them to near-zero outputs (all scores tie at 1/(K+1), masks at 0.5); scaled too
    far they saturate (scores of exactly 1.0 tie again). One inference pass measures each output's spread.
    """
    import torch

    heads = {
        "objectness_logits": model.proposal_generator.rpn_head.objectness_logits,
        "cls_score": model.roi_heads.box_predictor.cls_score,
        "bbox_pred": model.roi_heads.box_predictor.bbox_pred,
        "predictor": model.roi_heads.mask_head.predictor,
    }
    spread: dict[str, float] = {}

    def recorder(name: str):  # type: ignore[no-untyped-def]
        def hook(module, args, out):  # type: ignore[no-untyped-def]
            spread[name] = float((out[0] if isinstance(out, (list, tuple)) else out).float().std())

        return hook

    handles = [m.register_forward_hook(recorder(n)) for n, m in heads.items()]
    image = np.ascontiguousarray(rgb[::-1] if model.input_format == "BGR" else rgb).astype(np.float32)
    with torch.no_grad():
        model([{"image": torch.from_numpy(image), "height": rgb.shape[1], "width": rgb.shape[2]}])
        for h in handles:
            h.remove()
        for name, module in heads.items():
            module.weight.mul_(HEAD_STD[name] / max(spread[name], 1e-6))
        model.roi_heads.box_predictor.cls_score.bias.copy_(torch.tensor([0.5, 0.0, 1.0]))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``(n, 4)`` and ``(m, 4)`` xyxy boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return np.asarray(inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9))


def compare(d2: dict[str, np.ndarray], gm: dict[str, np.ndarray]) -> dict[str, list[float] | int]:
    """Match detections one-to-one by box IoU (same class, IoU >= 0.5) and collect the differences."""
    iou = box_iou(d2["boxes"], gm["boxes"]) if len(d2["boxes"]) and len(gm["boxes"]) else np.zeros((len(d2["boxes"]), len(gm["boxes"])))
    iou[d2["labels"][:, None] != gm["labels"][None, :]] = 0.0
    pairs, used_a, used_b = [], set(), set()
    for flat in np.argsort(-iou, axis=None):
        i, j = np.unravel_index(flat, iou.shape)
        if iou[i, j] < 0.5:
            break
        if i in used_a or j in used_b:
            continue
        used_a.add(i)
        used_b.add(j)
        pairs.append((int(i), int(j)))
    mask_iou = []
    for i, j in pairs:
        a, b = d2["masks"][i], gm["masks"][j]
        union = np.logical_or(a, b).sum()
        mask_iou.append(float(np.logical_and(a, b).sum() / union) if union else 1.0)
    return {
        "n_detectron2": len(d2["boxes"]),
        "n_geomask": len(gm["boxes"]),
        "matched": len(pairs),
        "box_iou": [float(iou[i, j]) for i, j in pairs],
        "score_diff": [float(abs(d2["scores"][i] - gm["scores"][j])) for i, j in pairs],
        "mask_iou": mask_iou,
        "d2_scores": [float(s) for s in d2["scores"]],
    }


def run_variant(
    name: str, config: str, opts: list[object], images: list[tuple[str, np.ndarray]], calibration: np.ndarray, seed: int, threads: int
) -> dict[str, object]:
    import torch

    from geomask.detect.d2_import import import_detectron2
    from geomask.detect.maskrcnn import build

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _, ref, weights, cfg_file = reference_model(config, opts, seed, out, calibration)
        t = time.perf_counter()
        import_detectron2(weights, cfg_file, out / "converted.pt", classes=["a", "b"], tile_size_px=32)
        convert_s = time.perf_counter() - t
        det = build(str(out / "converted.pt"), device="cpu", amp=False)
        per_tile = []
        for tile_name, rgb in images:
            h, w = rgb.shape[1:]
            with torch.no_grad():
                bgr = torch.from_numpy(np.ascontiguousarray(rgb[::-1] if ref.input_format == "BGR" else rgb).astype(np.float32))
                inst = ref([{"image": bgr, "height": h, "width": w}])[0]["instances"]
            d2 = {
                "boxes": inst.pred_boxes.tensor.numpy(),
                "scores": inst.scores.numpy(),
                "labels": inst.pred_classes.numpy(),
                "masks": inst.pred_masks.numpy(),
            }
            side = max(h, w)  # what MaskRCNNDetector.detect sets: a pixel in is a pixel out
            det.model.transform.min_size, det.model.transform.max_size = (side,), side
            with torch.inference_mode():
                o = det.model([torch.from_numpy(rgb.astype(np.float32) / 255.0)])[0]
            gm = {
                "boxes": o["boxes"].numpy(),
                "scores": o["scores"].numpy(),
                "labels": o["labels"].numpy() - 1,
                "masks": (o["masks"][:, 0] >= det.mask_threshold).numpy(),
            }
            torch.set_num_threads(1)  # the noise floor: Detectron2 against itself on one thread instead of several
            with torch.no_grad():
                inst1 = ref([{"image": bgr, "height": h, "width": w}])[0]["instances"]
            torch.set_num_threads(threads)
            d2_1 = {
                "boxes": inst1.pred_boxes.tensor.numpy(),
                "scores": inst1.scores.numpy(),
                "labels": inst1.pred_classes.numpy(),
                "masks": inst1.pred_masks.numpy(),
            }
            per_tile.append({"tile": tile_name, **compare(d2, gm), "floor": compare(d2, d2_1)})
    return {"variant": name, "convert_s": convert_s, "tiles": per_tile}


def summarise(result: dict[str, object]) -> dict[str, float | int | str]:
    tiles_ = result["tiles"]
    assert isinstance(tiles_, list)

    def cat(key: str) -> np.ndarray:
        return np.concatenate([np.asarray(t[key], dtype=float) for t in tiles_]) if tiles_ else np.zeros(0)

    box, score, mask, d2s = cat("box_iou"), cat("score_diff"), cat("mask_iou"), cat("d2_scores")
    n_d2 = sum(t["n_detectron2"] for t in tiles_)
    return {
        "variant": str(result["variant"]),
        "tiles": len(tiles_),
        "detectron2": n_d2,
        "geomask": sum(t["n_geomask"] for t in tiles_),
        "matched": len(box),
        "box_iou_min": float(box.min()) if len(box) else float("nan"),
        "box_iou>=0.99": float((box >= 0.99).mean()) if len(box) else float("nan"),
        "score_diff_max": float(score.max()) if len(score) else float("nan"),
        "score_diff<=1e-3": float((score <= 1e-3).mean()) if len(score) else float("nan"),
        "mask_iou_mean": float(mask.mean()) if len(mask) else float("nan"),
        "mask_iou_min": float(mask.min()) if len(mask) else float("nan"),
        "mask_iou>=0.98": float((mask >= 0.98).mean()) if len(mask) else float("nan"),
        "d2_score_range": f"{d2s.min():.3f}-{d2s.max():.3f}" if len(d2s) else "",
        "convert_s": float(result["convert_s"]),  # type: ignore[arg-type]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/detectron2_reference.json")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    images = tiles(args.tiles)
    results, floors = [], []
    for name in args.variants:
        config, opts = VARIANTS[name]
        t = time.perf_counter()
        result = run_variant(name, config, opts, images, calibration_tile(), args.seed, args.threads)
        result["seconds"] = time.perf_counter() - t
        results.append(result)
        print(json.dumps(summarise(result)), flush=True)
        floor = {**result, "variant": f"{name}: Detectron2 1 vs {args.threads} threads", "tiles": [t["floor"] for t in result["tiles"]]}
        print(json.dumps(summarise(floor)), flush=True)
        floors.append(floor)
    summary = [row for r, f in zip(results, floors) for row in (summarise(r), summarise(f))]
    args.out.write_text(json.dumps({"summary": summary, "results": results}))
    cols = list(summary[0])
    print("| " + " | ".join(cols) + " |\n|" + " --- |" * len(cols))
    for row in summary:
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
