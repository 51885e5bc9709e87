"""Cost of test-time augmentation: milliseconds per tile of the detector for ``tta`` 1, 4 and 8.

Usage: python bench/tta.py [--image RASTER] [--weights buildings] [--ensemble B.pt ...] [--tiles 12] [--threads 2] [--device cpu]

With ``--ensemble`` (repeatable), two more rows time ``tta`` 1 and 4 with those members beside ``--weights``.

Tiles are the pipeline's own (the model's tile size and GSD from its checkpoint, e.g. 256 px at 0.3 m
for the bundled buildings model), read into memory first; each is passed to ``detect`` alone (batch 1),
so the time covers the forward passes, the fusion of views and mask cropping, not reading. fp32
(``amp`` off); one warm-up tile per setting. Prints a Markdown table: median and mean ms per tile
and the mean number of instances per tile.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from geomask.config import Config
from geomask.detect.base import TileImage
from geomask.detect.maskrcnn import build
from geomask.detect.tta import TTA_CHOICES
from geomask.pipeline import plan_raster, resolve_config

DEFAULT_IMAGE = (
    Path(__file__).resolve().parents[2] / "shared/data/buildings_fair/area4/area4_z21_block0_x1772464-1772471_y966380-966383.tif"
)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    ap.add_argument("--weights", default="buildings")
    ap.add_argument("--ensemble", action="append", default=[], help="An ensemble member (repeatable).")
    ap.add_argument("--tiles", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = [(t, ()) for t in TTA_CHOICES] + [(t, tuple(args.ensemble)) for t in (1, 4) if args.ensemble]
    detectors = {(t, m): build(args.weights, device=args.device, amp=False, tta=t, ensemble=list(m)) for t, m in settings}
    plan = plan_raster(args.image, resolve_config(Config(), detectors[(1, ())].hints))
    images = []
    with plan.reader() as reader:
        for tile in plan.tiles:
            pixels, valid = reader.read(tile.read)
            if valid.mean() > 0.9:
                images.append(TileImage(tile, pixels, valid))
            if len(images) == args.tiles + 1:
                break
    side = plan.config.tiling.size_px
    where = _cpu_name() if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"{args.image.name}: {len(images) - 1} tiles of {side} px at {plan.grid.gsd_m:.2f} m; {where}, {args.threads} threads, fp32")
    print("| tta | models | ms/tile (median) | ms/tile (mean) | instances/tile | × tta 1 |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    base = None
    for (t, members), det in detectors.items():
        det.detect(images[:1])  # warm-up
        times, counts = [], []
        for image in images[1:]:
            t0 = time.perf_counter()
            (found,) = det.detect([image])
            times.append((time.perf_counter() - t0) * 1e3)
            counts.append(len(found))
        median = statistics.median(times)
        base = base or median
        row = f"| {t} | {1 + len(members)} | {median:.0f} | {statistics.mean(times):.0f} | {statistics.mean(counts):.1f} | {median / base:.1f} |"
        print(row)


if __name__ == "__main__":
    main()
