"""Peak memory of the serial pipeline on large rasters with a cheap detector (goal: flat, ≤ 2 GB).

Usage: python bench/pipeline_memory.py [--sides 4000 20000] [--tile 512] [--overlap 64]

Each size runs `geomask predict --serial` in a child process with the truth detector (reads a label
window per tile: cheap), and reports the child's peak RSS (ru_maxrss), wall time and object counts.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyogrio
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import write_large_scene


def run_one(side: int, tile: int, overlap: int, work: Path) -> dict[str, float]:
    image, labels, n_truth = write_large_scene(work, side)
    cfg = work / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"detector": {"factory": "geomask.testing:truth_detector", "options": {"labels": str(labels)}}}))
    out = work / f"out{side}.gpkg"
    cmd = [
        sys.executable,
        "-m",
        "workflows.cli",
        "-q",
        "predict",
        str(image),
        "-o",
        str(out),
        "-c",
        str(cfg),
        "--serial",
        "--overwrite",
        "--tile-size",
        str(tile),
        "--overlap",
        str(overlap),
    ]
    # A fresh parent per run: RUSAGE_CHILDREN then holds this run's peak alone.
    probe = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak_kib = int(proc.stdout.strip().splitlines()[-1])
    n_out = pyogrio.read_info(out)["features"]
    for p in work.glob(f"scene{side}*"):
        p.unlink()
    return {"side": side, "peak_rss_mb": peak_kib / 1024, "wall_s": wall, "truth": n_truth, "features": n_out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sides", type=int, nargs="+", default=[4000, 20000])
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=".") as d:
        for side in sorted(args.sides):  # each in a fresh child: peak RSS of the larger run is its own
            rows.append(run_one(side, args.tile, args.overlap, Path(d)))
    print(f"# pipeline memory ({platform.node()}, {time.strftime('%Y-%m-%d')}, tile {args.tile}, overlap {args.overlap})")
    print("| raster | peak RSS (MB) | wall (s) | truth objects | output features |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['side']}² | {r['peak_rss_mb']:.0f} | {r['wall_s']:.1f} | {r['truth']} | {r['features']} |")


if __name__ == "__main__":
    main()
