"""Peak memory of the serial pipeline on large rasters with a cheap detector (goal: flat, ≤ 2 GB).

Usage: python bench/pipeline_memory.py [--sides 4000 20000] [--tile 512] [--overlap 64] [--look] [--keep DIR]

Each size runs `geomask predict --serial` in a child process with the truth detector (reads a label
window per tile: cheap), and reports the child's peak RSS (ru_maxrss), wall time and object counts.
Predict writes the quick-look and the report by default, so they are inside that peak.

``--look`` also measures them on their own, each in a fresh child: `geomask preview OUT --image RASTER`
and the run report (``workflows.commands.preview.run_report_of``), on the raster as written (no
overviews: the overview is one decimated read of the full-resolution blocks) and again after AVERAGE
overviews were built beside it (``.ovr``; GDAL then serves the read from them).
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
import rasterio
import yaml
from rasterio.enums import Resampling

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import write_large_scene

# A fresh parent per run: RUSAGE_CHILDREN then holds this run's peak alone.
PROBE = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
REPORT = "import sys; from pathlib import Path; from workflows.commands.preview import run_report_of; run_report_of(Path(sys.argv[1]), [Path(sys.argv[2])], 1.0, 1, [])"


def peak(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd`` in a fresh child; return its peak RSS (MB) and wall time (s)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE, *cmd], check=True, capture_output=True, text=True)
    return int(proc.stdout.strip().splitlines()[-1]) / 1024, time.perf_counter() - t0


def look(image: Path, out: Path, side: int) -> list[dict[str, object]]:
    """Peak RSS and wall time of the quick-look and of the report alone, without and with overviews."""
    rows: list[dict[str, object]] = []
    ovr = image.with_name(image.name + ".ovr")
    ovr.unlink(missing_ok=True)
    for overviews in (False, True):
        if overviews:  # external (.ovr, TIFF_USE_OVR), so a re-run can start without them
            t0 = time.perf_counter()
            with rasterio.Env(GDAL_CACHEMAX=256 * 1024 * 1024, TIFF_USE_OVR=True), rasterio.open(image, "r+") as dst:
                factors = [f for f in (2, 4, 8, 16, 32, 64) if side // f >= 256]
                dst.build_overviews(factors, Resampling.average)
            rows.append({"side": side, "what": f"build overviews {factors}", "rss_mb": "", "wall_s": time.perf_counter() - t0})
        tag = "with overviews" if overviews else "no overviews"
        mb, s = peak([sys.executable, "-m", "workflows.cli", "-q", "preview", str(out), "--image", str(image), "-o", str(out) + ".p.png"])
        rows.append({"side": side, "what": f"`geomask preview` ({tag})", "rss_mb": mb, "wall_s": s})
        mb, s = peak([sys.executable, "-c", REPORT, str(out), str(image)])
        rows.append({"side": side, "what": f"report ({tag})", "rss_mb": mb, "wall_s": s})
    return rows


def run_one(
    side: int, tile: int, overlap: int, work: Path, with_look: bool = False, keep: bool = False
) -> tuple[dict[str, float], list[dict[str, object]]]:
    image, out = work / f"scene{side}.tif", work / f"out{side}.gpkg"
    if keep and out.is_file():  # a kept run: measure the quick-look and the report again, nothing else
        return {}, look(image, out, side)
    image, labels, n_truth = write_large_scene(work, side)
    cfg = work / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"detector": {"factory": "geomask.testing:truth_detector", "options": {"labels": str(labels)}}}))
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
    peak_mb, wall = peak(cmd)
    n_out = pyogrio.read_info(out, layer="instances")["features"]
    looks = look(image, out, side) if with_look else []
    for p in work.glob(f"scene{side}*") if not keep else []:
        p.unlink()
    return {"side": side, "peak_rss_mb": peak_mb, "wall_s": wall, "truth": n_truth, "features": n_out}, looks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sides", type=int, nargs="+", default=[4000, 20000])
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--look", action="store_true", help="also measure the quick-look and the report alone")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep the scenes; a second run only re-measures --look")
    args = ap.parse_args()
    rows, looks = [], []
    with tempfile.TemporaryDirectory(dir=".") as d:
        work = args.keep or Path(d)
        work.mkdir(parents=True, exist_ok=True)
        for side in sorted(args.sides):  # each in a fresh child: peak RSS of the larger run is its own
            row, more = run_one(side, args.tile, args.overlap, work, args.look, args.keep is not None)
            rows += [row] if row else []
            looks += more
    print(f"# pipeline memory ({platform.node()}, {time.strftime('%Y-%m-%d')}, tile {args.tile}, overlap {args.overlap})")
    print("| raster | peak RSS (MB) | wall (s) | truth objects | output features |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['side']}² | {r['peak_rss_mb']:.0f} | {r['wall_s']:.1f} | {r['truth']} | {r['features']} |")
    if looks:
        print("\n| raster | step | peak RSS (MB) | wall (s) |")
        print("| --- | --- | ---: | ---: |")
        for r in looks:
            mb = f"{r['rss_mb']:.0f}" if isinstance(r["rss_mb"], float) else ""
            print(f"| {r['side']}² | {r['what']} | {mb} | {r['wall_s']:.1f} |")


if __name__ == "__main__":
    main()
