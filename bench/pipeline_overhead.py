"""End-to-end wall time of the serial pipeline against model-forward-only time on the same tiles.

Usage: python bench/pipeline_overhead.py [--image examples/sample_nairobi.tif] [--arch resnet50_fpn]
                                         [--weights CKPT] [--tile 512] [--overlap 64] [--batch 2]

Without --weights, a ResNet-50-FPN Mask R-CNN with seeded random weights is used (no downloads
here); its score threshold is set so that a realistic number of instances reaches the merge and
vectorize steps (the count is printed). Goal: end-to-end ≤ 1.10 × model-only.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from geomask.config import Config, merge_overrides
from geomask.detect.base import TileImage
from geomask.detect.checkpoint import CheckpointMeta, save_checkpoint
from geomask.detect.maskrcnn import build, build_model
from geomask.pipeline import plan_raster, read_batches, resolve_config, run_serial


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--image", default="examples/sample_nairobi.tif")
    ap.add_argument("--arch", default="resnet50_fpn")
    ap.add_argument("--weights")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--score", type=float, default=0.5)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        weights = args.weights
        if weights is None:
            torch.manual_seed(0)
            model = build_model(args.arch, 1, args.tile)
            weights = str(save_checkpoint(Path(d) / "random.pt", CheckpointMeta(args.arch, ("building",), args.tile), model.state_dict()))
        det = build(weights=weights, device="cpu", score_threshold=args.score, tile_size_px=args.tile)
        cfg = merge_overrides(Config(), {"tiling.size_px": args.tile, "tiling.overlap_px": args.overlap, "detector.batch_size": args.batch})
        plan = plan_raster(args.image, resolve_config(cfg, det.hints))
        with plan.reader() as reader:
            batches: list[list[TileImage]] = [b for b, _ in read_batches(reader, plan.tiles, args.batch)]
        det.detect(batches[0][:1])  # warm-up (allocator, MKL-DNN kernels)
        # Alternate the two measurements and keep each one's best: other load on the machine then
        # inflates neither side more than the other.
        model_times, e2e_times = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            n_inst = 0
            for batch in batches:
                n_inst += sum(len(r) for r in det.detect(batch))
            model_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            summary = run_serial(args.image, Path(d) / "out.gpkg", cfg, detector=det)
            e2e_times.append(time.perf_counter() - t0)
        model_only, end_to_end = min(model_times), min(e2e_times)
    ratio = end_to_end / model_only
    print(f"# pipeline overhead ({platform.node()}, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {args.threads} threads)")
    print(
        f"model {det.name}, {len(plan.tiles)} tiles of {args.tile} px (overlap {args.overlap}), batch {args.batch}, "
        f"{n_inst} raw instances, {summary.n_features} output features"
    )
    print(f"all runs: model-only {[round(t, 1) for t in model_times]} s, end-to-end {[round(t, 1) for t in e2e_times]} s")
    print("| model-only (s) | end-to-end (s) | ratio | goal |")
    print("| ---: | ---: | ---: | ---: |")
    print(f"| {model_only:.1f} | {end_to_end:.1f} | {ratio:.3f} | ≤ 1.10 |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
