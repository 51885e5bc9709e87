"""ONNX Runtime vs torch for the built-in Mask R-CNN: ms per tile, cold start to the first tile, RSS, install size.

Usage: python bench/onnx_bench.py --onnx model.onnx [--weights buildings] [--tiles 8] [--threads 2] [--size 256]

Each back-end runs in its own fresh process (so cold start and RSS are a worker's): the child imports
what it needs, builds the detector, runs one tile (cold start = process start to that tile's result,
measured by the parent), then ``--tiles`` more tiles of the sample image one at a time (median ms).
The ONNX child never imports torch (checked). RSS is the child's peak (``ru_maxrss``). Install size is
``du`` of the back-end's site-packages folders in this venv. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[1] / "examples/sample_nairobi.tif"
TORCH_DIRS = ("torch", "torchvision", "triton", "nvidia", "functorch", "torchgen")
ONNX_DIRS = ("onnxruntime",)


def child(backend: str, weights: str, onnx_path: str, n_tiles: int, threads: int, size: int) -> None:
    """Run in the child process: build the detector, time tiles, print one JSON line."""
    import numpy as np
    import rasterio
    from rasterio.windows import Window

    from geomask.detect.base import TileImage, load_detector
    from geomask.tiling import Tile

    if backend == "torch":
        import torch

        torch.set_num_threads(threads)
        det = load_detector("geomask.detect.maskrcnn:build", {"weights": weights, "device": "cpu", "amp": False})
    else:
        det = load_detector("geomask.detect.onnxrt:build", {"weights": onnx_path, "device": "cpu", "threads": threads})
    with rasterio.open(SAMPLE) as src:
        data = src.read([1, 2, 3])
    step = (data.shape[1] - size) // max(1, n_tiles)
    tiles = []
    for k in range(n_tiles + 1):
        r = c = k * step
        win = Window(c, r, size, size)
        px = np.ascontiguousarray(data[:, r : r + size, c : c + size], dtype=np.float32) / 255
        tiles.append(TileImage(Tile(k, 0, 0, win, win, None), px, np.ones((size, size), bool)))
    first = det.detect(tiles[:1])
    first_done = time.time()
    times, found = [], len(first[0])
    for tile in tiles[1:]:
        t = time.perf_counter()
        found += len(det.detect([tile])[0])
        times.append((time.perf_counter() - t) * 1000)
    torch_loaded = "torch" in sys.modules and sys.modules["torch"] is not None
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"first_done": first_done, "ms": statistics.median(times), "rss_mb": rss_mb, "found": found, "torch": torch_loaded}))


def du_mb(names: tuple[str, ...]) -> float:
    """Return the size in MiB of this venv's site-packages folders whose name starts with one of ``names``."""
    site = next(Path(p) for p in sys.path if p.endswith("site-packages"))
    dirs = [p for p in site.iterdir() if p.is_dir() and p.name.split("-")[0].split(".")[0] in names]
    out = subprocess.run(["du", "-sk", *map(str, dirs)], capture_output=True, text=True, check=True).stdout
    return sum(int(line.split()[0]) for line in out.splitlines()) / 1024


def main() -> None:
    """Run both back-ends and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", required=True, help="model exported by `geomask export-model` from --weights")
    ap.add_argument("--weights", default="buildings")
    ap.add_argument("--tiles", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--child", choices=("torch", "onnx"))
    args = ap.parse_args()
    if args.child:
        child(args.child, args.weights, args.onnx, args.tiles, args.threads, args.size)
        return
    print("| back-end | install MiB | cold start to first tile s | ms per tile (median) | peak RSS MiB | instances | torch imported |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    sizes = {"torch": du_mb(TORCH_DIRS), "onnx": du_mb(ONNX_DIRS)}
    for backend in ("onnx", "torch"):
        start = time.time()
        cmd = [sys.executable, __file__, "--child", backend, "--onnx", args.onnx, "--weights", args.weights]
        cmd += ["--tiles", str(args.tiles), "--threads", str(args.threads), "--size", str(args.size)]
        done = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            check=True,
            env={"OMP_NUM_THREADS": str(args.threads), "PATH": "/usr/bin:/bin", **_pythonpath()},
        )
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"| {backend} | {sizes[backend]:.0f} | {r['first_done'] - start:.1f} | {r['ms']:.0f} | {r['rss_mb']:.0f} | {r['found']} | {r['torch']} |"
        )


def _pythonpath() -> dict[str, str]:
    import os

    return {"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}


if __name__ == "__main__":
    main()
