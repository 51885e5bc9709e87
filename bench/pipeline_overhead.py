"""End-to-end time of the pipeline against model-forward-only time on the same tiles.

Usage: python bench/pipeline_overhead.py [--image examples/sample_nairobi.tif | --synthetic-side 16384]
                                         [--arch resnet50_fpn] [--weights CKPT] [--device cpu|cuda]
                                         [--tile 512] [--overlap 64] [--batch 2] [--dask] [--json OUT.json]

Model-only: the detector's ``detect`` on every tile batch, read into memory beforehand (includes the
detector's own pre/post-processing: tensor upload, mask thresholding and cropping). End-to-end: the
serial pipeline (``geomask predict --serial``: read, normalise, detect, merge, vectorise, write a
GeoPackage) on the same raster and tiles. With ``--dask``, also the distributed job on a local cluster
of one worker process (tagged ``GPU=1`` on CUDA), wall time from submission to the written file; the
cluster start-up is excluded, the worker's model build is not. (For GPUs: on CPU a Dask worker runs torch
with one thread, as Dask's workers set OMP_NUM_THREADS=1, so that row is not comparable there.)

Without --weights, the architecture is built with seeded random weights (no downloads here); its score
threshold is calibrated on the first batch so that about ``--per-tile`` instances per tile (default 20,
a dense urban tile) reach the merge and vectorise steps (the count is printed). ``--json`` also writes the
figures (tiles/s, km²/h at the working GSD, each path's share of model-only throughput) and, on CUDA, the
GPU's utilisation during each path, sampled through NVML (``nvidia-ml-py``) every 0.2 s. ``bench/gpu.sh``
runs this on a GPU. Goals: serial end-to-end ≤ 1.10 × model-only (CPU, issue 2); end-to-end tiles/s
≥ 85 % of model-only on a GPU (issue 3).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geomask.config import Config, merge_overrides
from geomask.detect.base import TileImage
from geomask.detect.checkpoint import CheckpointMeta, save_checkpoint
from geomask.detect.maskrcnn import build, build_model
from geomask.inference import read_batches
from geomask.pipeline import plan_raster, resolve_config, run_serial


def _calibrate(image: str, weights: str, args: argparse.Namespace) -> float:
    """Score threshold at which random weights give about ``--per-tile`` instances per tile.

    Untrained heads score everything around 0.6–0.95, so a fixed threshold would send the 300 most
    confident boxes of every tile to the merge: far more than a real model finds on real imagery.
    """
    det = build(weights=weights, device=args.device, score_threshold=0.01, tile_size_px=args.tile)
    cfg = merge_overrides(Config(), {"tiling.size_px": args.tile, "tiling.overlap_px": args.overlap})
    plan = plan_raster(image, resolve_config(cfg, det.hints))
    with plan.reader() as reader:
        batch = next(b.images for b in read_batches(reader, plan.tiles, args.batch) if b.images)
    ranked = [sorted((i.score for i in r), reverse=True) for r in det.detect(batch)]
    return float(sum(r[min(args.per_tile, len(r)) - 1] for r in ranked if r) / max(1, sum(1 for r in ranked if r)))


class GpuSampler:
    """GPU utilisation (%) sampled through NVML every ``every_s`` in a thread, grouped by the current phase."""

    def __init__(self, device: str, every_s: float = 0.2) -> None:
        self.phase = "setup"
        self.samples: dict[str, list[int]] = {}
        self._stop = threading.Event()
        self._handle = None
        if device.startswith("cuda"):
            try:
                import pynvml  # nvidia-ml-py

                pynvml.nvmlInit()
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(int(device.partition(":")[2] or 0))
                self._nvml = pynvml
            except Exception as err:  # noqa: BLE001 - no NVML: the figures without utilisation
                print(f"no GPU utilisation: {err}", file=sys.stderr)
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        while self._handle is not None and not self._stop.wait(every_s):
            self.samples.setdefault(self.phase, []).append(int(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))

    def mean(self, phase: str) -> float | None:
        got = self.samples.get(phase)
        return round(sum(got) / len(got), 1) if got else None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default="examples/sample_nairobi.tif")
    ap.add_argument("--synthetic-side", type=int, help="write a synthetic scene of this side (pixels) and use it instead of --image")
    ap.add_argument("--arch", default="resnet50_fpn")
    ap.add_argument("--weights")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--score", type=float, default=0.5, help="score threshold with --weights")
    ap.add_argument("--per-tile", type=int, default=20, help="random weights: threshold set for about this many instances per tile")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--dask", action="store_true", help="also time the distributed job on a one-worker local cluster")
    ap.add_argument("--json", type=Path, help="also write the figures (and GPU utilisation per path) to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gpu = GpuSampler(args.device)
    with tempfile.TemporaryDirectory() as d:
        image = args.image
        if args.synthetic_side:
            from synthetic import write_large_scene

            image = str(write_large_scene(Path(d), args.synthetic_side)[0])
        weights = args.weights
        if weights is None:
            torch.manual_seed(0)
            model = build_model(args.arch, 1, args.tile)
            weights = str(save_checkpoint(Path(d) / "random.pt", CheckpointMeta(args.arch, ("building",), args.tile), model.state_dict()))
        score = args.score
        if args.weights is None:
            score = _calibrate(image, weights, args)
        options = {"weights": weights, "device": args.device, "score_threshold": score, "tile_size_px": args.tile}
        det = build(**options)  # type: ignore[arg-type]
        arch = det.name.split(":")[0].removeprefix("maskrcnn-")  # a checkpoint's own architecture, not --arch
        cfg = merge_overrides(
            Config(),
            {
                "tiling.size_px": args.tile,
                "tiling.overlap_px": args.overlap,
                "detector.batch_size": args.batch,
                "detector.options": options,
                "dask.n_workers": 1,
                "dask.threads_per_worker": 1 if args.device.startswith("cuda") else args.threads,
                "dask.gpu": args.device.startswith("cuda"),
            },
        )
        plan = plan_raster(image, resolve_config(cfg, det.hints))
        with plan.reader() as reader:
            batches: list[list[TileImage]] = [b.images for b in read_batches(reader, plan.tiles, args.batch) if b.images]
        n_tiles = sum(len(b) for b in batches)
        det.detect(batches[0][:1])  # warm-up (allocator, MKL-DNN kernels, CUDA context)
        # Alternate the measurements and keep each one's best: other load on the machine then
        # inflates neither side more than the other.
        model_times, e2e_times = [], []
        for _ in range(args.repeat):
            gpu.phase = "model_only"
            t0 = time.perf_counter()
            n_inst = 0
            for batch in batches:
                n_inst += sum(len(r) for r in det.detect(batch))
            model_times.append(time.perf_counter() - t0)
            gpu.phase = "serial"
            t0 = time.perf_counter()
            summary = run_serial(image, Path(d) / "out.gpkg", cfg, detector=det)
            e2e_times.append(time.perf_counter() - t0)
            gpu.phase = "between"
        model_only, end_to_end = min(model_times), min(e2e_times)
        area_km2 = plan.grid.width * plan.grid.height * plan.grid.gsd_m**2 / 1e6  # the raster's extent, at the working GSD
        del det
        dask_s = None
        if args.dask:
            from dask_scaling import _run as run_on_local_cluster  # best job time, cluster start-up excluded

            gpu.phase = "dask"  # from the cluster's start: the worker's model build is in this phase too
            dask_s = run_on_local_cluster(Path(image), cfg, Path(d) / "dask.gpkg", args.repeat)[0]
            gpu.phase = "after"
    gpu.stop()
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    print(
        f"# pipeline overhead ({platform.node()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, {device})"
    )
    print(
        f"model {arch} ({'random weights' if args.weights is None else args.weights}), {n_tiles} tiles of {args.tile} px "
        f"(overlap {args.overlap}), batch {args.batch}, score ≥ {score:.3f}: {n_inst} raw instances, {summary.n_objects} output features"
    )
    print(f"all runs: model-only {[round(t, 2) for t in model_times]} s, serial end-to-end {[round(t, 2) for t in e2e_times]} s")
    print("| path | wall (s) | tiles/s | vs model-only |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| model forward only | {model_only:.2f} | {n_tiles / model_only:.2f} | 1.000 |")
    print(f"| serial end-to-end (`--serial`) | {end_to_end:.2f} | {n_tiles / end_to_end:.2f} | {end_to_end / model_only:.3f}× time |")
    if dask_s is not None:
        print(f"| Dask, 1 worker, end-to-end | {dask_s:.2f} | {n_tiles / dask_s:.2f} | {model_only / dask_s:.1%} of model tiles/s |")
    sys.stdout.flush()
    if args.json:
        paths = {"model_only": model_only, "serial": end_to_end, **({"dask": dask_s} if dask_s is not None else {})}
        figures = {
            name: {
                "seconds": round(sec, 3),
                "tiles_per_s": round(n_tiles / sec, 3),
                "km2_per_h": round(area_km2 / sec * 3600, 2),
                "share_of_model_only": round(model_only / sec, 4),
                "gpu_util_mean_pct": gpu.mean(name),
                "gpu_util_samples": len(gpu.samples.get(name, [])),
            }
            for name, sec in paths.items()
        }
        meta = {
            "device": device,
            "torch": torch.__version__,
            "host": platform.node(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "arch": arch,
            "weights": args.weights or "random",
            "amp": args.device.startswith("cuda"),  # the built-in detector autocasts to float16 on CUDA
            "tile_px": args.tile,
            "overlap_px": args.overlap,
            "batch": args.batch,
            "n_tiles": n_tiles,
            "gsd_m": round(plan.grid.gsd_m, 4),
            "area_km2": round(area_km2, 3),
            "raw_instances": n_inst,
            "output_features": summary.n_objects,
        }
        args.json.write_text(json.dumps({**meta, "paths": figures}, indent=1) + "\n")


if __name__ == "__main__":
    main()
