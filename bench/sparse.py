"""Empty regions cost nothing: time and memory of mostly-nodata rasters, with and without tile skipping.

Usage: python bench/sparse.py [--side 100000] [--mosaic 12000] [--collar 8000] [--before-timeout 120] [--dask]
                              [--scenes sparse sparse+ovr mosaic collar] [--no-preview]

Scenes (written block by block, empty blocks never written, so they stay small on disk):

* ``sparse``: a ``side``² RGB GeoTIFF (512 px deflate blocks) with six 2048² written areas (< 1 % valid),
  without overviews, and the same with AVERAGE overviews (``sparse+ovr``).
* ``mosaic``: a ``mosaic``² drone-style mosaic whose valid area is a rotated rectangle (about 40 %).
* ``collar``: the same footprint in a ``collar``² *striped* GeoTIFF written in full (the collar is stored
  nodata): no sparse blocks, no overviews. Run without and with ``tiling.scan_mask`` (the exact
  full-resolution mask scan), to see whether the scan pays for itself.

Each runs ``geomask predict`` (``--serial``, and the Dask path with ``--dask``) in a child process with
the truth detector, ``tiling.skip_empty`` on ("after") and off ("before", as the previous commit
planned every tile; stopped after ``--before-timeout`` s; ``--before-timeout 0`` skips them). Reported: wall time, peak RSS of the largest
process (``RUSAGE_CHILDREN``), tiles planned, tiles holding valid pixels (from the scene's geometry),
objects written.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyogrio
import rasterio
import shapely
import yaml
from affine import Affine
from rasterio.features import rasterize
from rasterio.windows import Window

from geomask.testing import make_scene, write_sparse_scene
from geomask.tiling import plan_tiles

TILE, OVERLAP, BLOCK = 512, 64, 512
CRS = "EPSG:32633"
SCENES = ("sparse", "sparse+ovr", "mosaic", "collar")


def sparse_scene(work: Path, side: int, overviews: bool) -> tuple[Path, Path, list[shapely.Polygon]]:
    rng = np.random.default_rng(0)
    parts, areas = [], []
    for k in range(6):
        r = int(rng.integers(0, side // BLOCK - 4)) * BLOCK
        c = int(rng.integers(0, side // BLOCK - 4)) * BLOCK
        labels = make_scene(2048, 2048, 120, seed=k, max_size_px=400, n_big=1)
        parts.append((r, c, labels, np.ones((2048, 2048), bool)))
        areas.append(shapely.box(c, r, c + 2048, r + 2048))
    transform = Affine(0.3, 0, 500_000, 0, -0.3, 5_200_000)
    name = "sparse_ovr" if overviews else "sparse"
    image, labels = write_sparse_scene(work, side, side, transform, CRS, parts, BLOCK, name, overviews=(16, 64, 256) if overviews else ())
    return image, labels, areas


def mosaic_scene(work: Path, side: int) -> tuple[Path, Path, list[shapely.Polygon]]:
    foot = shapely.affinity.rotate(shapely.box(0.22 * side, 0.3 * side, 0.78 * side, 0.7 * side), 33, origin="center")
    parts = []
    for r in range(0, side, 2048):  # in bands, so memory stays small however large the mosaic
        h = min(2048, side - r)
        valid = rasterize([shapely.affinity.translate(foot, 0, -r)], out_shape=(h, side), transform=Affine.identity()).astype(bool)
        if valid.any():
            parts.append((r, 0, make_scene(h, side, side // 40, seed=r, max_size_px=300, n_big=0), valid))
    transform = Affine(0.1, 0, 500_000, 0, -0.1, 5_200_000)
    image, labels = write_sparse_scene(work, side, side, transform, CRS, parts, BLOCK, "mosaic")
    return image, labels, [foot]


def collar_scene(work: Path, side: int) -> tuple[Path, Path, list[shapely.Polygon]]:
    """A striped RGB GeoTIFF whose every strip is written: the nodata collar is stored, no block is sparse."""
    foot = shapely.affinity.rotate(shapely.box(0.22 * side, 0.3 * side, 0.78 * side, 0.7 * side), 33, origin="center")
    image, labels = work / "collar.tif", work / "collar_labels.tif"
    rng = np.random.default_rng(3)
    profile = {"driver": "GTiff", "width": side, "height": side, "crs": CRS, "transform": Affine(0.1, 0, 500_000, 0, -0.1, 5_200_000)}
    profile |= {"tiled": False, "compress": "deflate"}
    with (
        rasterio.open(image, "w", count=3, dtype="uint8", nodata=0, **profile) as img,
        rasterio.open(labels, "w", count=1, dtype="int32", **profile) as lab,
    ):
        for r in range(0, side, 1024):  # in bands of rows, so memory stays small however large the raster
            h = min(1024, side - r)
            valid = rasterize([shapely.affinity.translate(foot, 0, -r)], out_shape=(h, side), transform=Affine.identity()).astype(bool)
            ids = np.where(valid, make_scene(h, side, side // 80, seed=r, max_size_px=300, n_big=0), 0)
            pixels = rng.integers(40, 90, size=(3, h, side)).astype(np.uint8)  # texture: compresses like imagery, not like a flat fill
            pixels[:, ids > 0] = (200 + ids[ids > 0] % 40).astype(np.uint8)
            pixels[:, ~valid] = 0
            win = Window(0, r, side, h)
            img.write(pixels, window=win)
            lab.write(ids.astype(np.int32), 1, window=win)
    return image, labels, [foot]


def holding_valid(side: int, areas: list[shapely.Polygon]) -> tuple[int, int]:
    tiles = plan_tiles(side, side, TILE, OVERLAP)
    valid = shapely.union_all(areas)
    boxes = shapely.box(
        *np.array([(t.read.col_off, t.read.row_off, t.read.col_off + t.read.width, t.read.row_off + t.read.height) for t in tiles]).T
    )
    inside = shapely.intersection(boxes, valid)
    return len(tiles), int(np.count_nonzero(shapely.area(inside) > 0))


def run(
    image: Path, labels: Path, work: Path, skip: bool, dask: bool, timeout: float, scan: bool = False, preview: bool = True
) -> dict[str, object]:
    cfg = work / f"cfg_{skip}_{scan}.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "detector": {"factory": "geomask.testing:truth_detector", "options": {"labels": str(labels)}, "batch_size": 4},
                "tiling": {"size_px": TILE, "overlap_px": OVERLAP, "skip_empty": skip, "scan_mask": scan},
                "dask": {"n_workers": 2, "threads_per_worker": 1, "tiles_per_task": 16, "dashboard": False},
            }
        )
    )
    out = work / "out.gpkg"
    cmd = [sys.executable, "-m", "workflows.cli", "-v", "predict", str(image), "-o", str(out), "-c", str(cfg), "--overwrite"]
    cmd += ([] if dask else ["--serial"]) + ([] if preview else ["--no-preview"])
    probe = (
        "import resource, subprocess, sys; p = subprocess.run(sys.argv[2:], timeout=float(sys.argv[1]), capture_output=True, text=True); "
        "sys.stderr.write(p.stderr[-3000:]); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", probe, str(timeout), *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {
            "wall_s": f"> {timeout:.0f} (stopped)" if "TimeoutExpired" in proc.stderr else "failed",
            "rss_mb": "",
            "planned": "",
            "coverage_s": "",
            "features": "",
        }
    planned = [line for line in proc.stderr.splitlines() if "tiles of" in line and "planned" in line]
    n_planned = planned[-1].split(" planned")[0].split(", ")[-1].split(" of ")[0] if planned else "?"
    coverage_s = planned[-1].split(" in ")[-1].split(" s,")[0] if planned and " s, " in planned[-1] else "?"
    return {
        "wall_s": f"{wall:.1f}",
        "rss_mb": f"{int(proc.stdout.strip().splitlines()[-1]) / 1024:.0f}",
        "planned": n_planned,
        "coverage_s": coverage_s,
        "features": pyogrio.read_info(out, layer="instances")["features"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--side", type=int, default=100_000)
    ap.add_argument("--mosaic", type=int, default=12_000)
    ap.add_argument("--collar", type=int, default=8000)
    ap.add_argument("--before-timeout", type=float, default=120.0)
    ap.add_argument("--dask", action="store_true", help="also run the Dask path (2 workers)")
    ap.add_argument("--no-preview", action="store_true", help="predict without the quick-look (the tile skipping alone)")
    ap.add_argument("--scenes", nargs="+", default=list(SCENES), choices=SCENES, help="which scenes to write and run")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=".") as d:
        work = Path(d)
        scenes = []
        makers = {
            "sparse": lambda: sparse_scene(work, args.side, False),
            "sparse+ovr": lambda: sparse_scene(work, args.side, True),
            "mosaic": lambda: mosaic_scene(work, args.mosaic),
            "collar": lambda: collar_scene(work, args.collar),
        }
        for name in args.scenes:
            make = makers[name]
            t0 = time.perf_counter()
            image, labels, areas = make()
            side = {"mosaic": args.mosaic, "collar": args.collar}.get(name, args.side)
            total, holding = holding_valid(side, areas)
            scenes.append((name, image, labels, total, holding, time.perf_counter() - t0, image.stat().st_size))
        for name, image, labels, total, holding, t_write, size in scenes:
            for path in ["serial", "dask"] if args.dask else ["serial"]:
                modes = [("before", False, False)] if args.before_timeout > 0 else []
                modes += [("after", True, False)] + ([("after + mask scan", True, True)] if name == "collar" else [])
                for label, skip, scan in modes:
                    r = run(image, labels, work, skip, path == "dask", args.before_timeout if not skip else 1800, scan, not args.no_preview)
                    rows.append({"scene": name, "path": path, "skip": label, "total": total, "holding": holding, **r})
                    print(json.dumps(rows[-1]), file=sys.stderr)
            print(f"# {name}: written in {t_write:.1f} s, {size / 1e6:.1f} MB on disk", file=sys.stderr)
    print(f"# sparse rasters ({time.strftime('%Y-%m-%d')}, tile {TILE}, overlap {OVERLAP}, truth detector)")
    print(
        "| scene | path | skipping | wall (s) | of which coverage (s) | peak RSS (MB) | tiles in grid | tiles planned | tiles holding valid pixels | objects |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        planned = r["planned"] if r["skip"] != "before" else r["total"]
        print(
            f"| {r['scene']} | {r['path']} | {r['skip']} | {r['wall_s']} | {r['coverage_s']} | {r['rss_mb']} | {r['total']} | {planned} | "
            f"{r['holding']} | {r['features']} |"
        )


if __name__ == "__main__":
    main()
