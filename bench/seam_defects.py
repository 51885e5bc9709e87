"""Seam defects benchmark: fused touching neighbours, spurious holes and eroded small objects at tile seams.

Usage: python bench/seam_defects.py [--side 2048] [--configs 256:32,256:64,512:64] [--seed 0] [--out bench/results]

The scene is the seam benchmark's (``bench/seams.py``: buildings, rows sharing walls, courtyards, rotated
rectangles, crowns, long bars) with many more *touching* neighbours added: rows of terraced houses sharing
walls and clusters of crowns whose outlines touch. Per-tile instances come from the same oracles
(``bench/oracles.py``: exact, and noisy with 1–2 px of boundary jitter per tile) through the real
pipeline (``geomask.pipeline.detect_tiles``) and are merged by

* ``geomask`` — :func:`geomask.merge.merge_across_tiles`, the merge as it is in this checkout;
* ``perfect grouping`` — each instance assigned to the truth object it mostly covers, each group fused
  with geomask's own :func:`geomask.merge.fuse`: the best any grouping can do with the same fusion.

Measured in pixel space against the label raster:

* **fused**: outputs that cover at least half of each of two or more truth objects (distinct
  neighbours merged into one); **fused by the merge**: those of them where no single per-tile instance
  already covers half of two of the same objects (of the parts its tile sees) — the detector did not
  fuse them, the merge did;
* **holes**: holes of an output (background components enclosed by its mask) lying mostly inside the
  truth object it covers — holes no object has;
* **small IoU**: mean IoU of the outputs matched to truth objects under ``SMALL_PX`` (erosion shows here);
* F1 at IoU 0.5 (one-to-one, ``geomask.evaluate``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))  # seams, oracles
from seams import CRS, TRANSFORM, build_scene, oracle_config, truth_objects

from geomask.evaluate import Objects, evaluate
from geomask.instances import Instance
from geomask.merge import fuse, merge_across_tiles, split_private
from geomask.pipeline import build_detector, detect_tiles, plan_raster, resolve_config
from geomask.testing import write_scene
from geomask.tiling import Tile
from geomask.vectorize import mask_to_pixel_polygons

log = logging.getLogger("bench.seam_defects")
LabelArray = npt.NDArray[np.int32]
SMALL_PX = 400


def add_touching(labels: LabelArray, seed: int, n_rows: int, n_clusters: int) -> LabelArray:
    """Add rows of terraced houses (shared walls) and clusters of touching crowns into free space."""
    rng = np.random.default_rng(seed + 2000)
    out = labels.copy()
    next_id = int(out.max()) + 1
    height, width = out.shape

    def free(r: int, c: int, h: int, w: int) -> bool:
        r0, c0 = max(0, r - 2), max(0, c - 2)
        return r + h + 2 <= height and c + w + 2 <= width and not out[r0 : r + h + 2, c0 : c + w + 2].any()

    for _ in range(n_rows):
        n, h, w = int(rng.integers(3, 9)), int(rng.integers(14, 60)), int(rng.integers(10, 40))
        vertical = rng.random() < 0.5
        hh, ww = (n * w, h) if vertical else (h, n * w)
        for _try in range(40):
            r, c = int(rng.integers(0, height - hh)), int(rng.integers(0, width - ww))
            if free(r, c, hh, ww):
                for k in range(n):
                    if vertical:
                        out[r + k * w : r + (k + 1) * w, c : c + h] = next_id
                    else:
                        out[r : r + h, c + k * w : c + (k + 1) * w] = next_id
                    next_id += 1
                break
    for _ in range(n_clusters):
        k, radius = int(rng.integers(3, 8)), int(rng.integers(8, 30))
        side = int(radius * 5)
        for _try in range(40):
            r, c = int(rng.integers(0, height - side)), int(rng.integers(0, width - side))
            if not free(r, c, side, side):
                continue
            centres = rng.uniform(radius, side - radius, size=(k, 2))
            radii = radius * rng.uniform(0.7, 1.2, size=k)
            yy, xx = np.mgrid[:side, :side] + 0.5
            d = np.sqrt((yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2) / radii[:, None, None]
            owner, inside = d.argmin(axis=0), d.min(axis=0) <= 1.0
            view = out[r : r + side, c : c + side]
            for j in range(k):  # a Voronoi split of overlapping discs: crowns that touch along a line
                part = inside & (owner == j)
                lab, n_lab = ndimage.label(part)
                if n_lab == 0:
                    continue
                biggest = 1 + int(np.argmax(ndimage.sum(part, lab, range(1, n_lab + 1))))
                view[lab == biggest] = next_id
                next_id += 1
            break
    return out


def perfect_grouping(instances: list[Instance], tiles: Sequence[Tile], labels: LabelArray) -> list[Instance]:
    """Group border instances by the truth object each mostly covers; fuse each group with geomask's fusion."""
    private, border = split_private(instances, tiles)
    groups: dict[Any, list[Instance]] = defaultdict(list)
    for k, inst in enumerate(border):
        under = labels[inst.row_off : inst.row_off + inst.height, inst.col_off : inst.col_off + inst.width][inst.mask]
        ids = np.bincount(under)
        ids[0] = 0
        groups[int(ids.argmax()) if ids.any() else ("fp", k)].append(inst)
    return private + [fuse(g, tiles) for g in groups.values()]


def input_holes(instances: Sequence[Instance], shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
    """Pixels enclosed as a hole by some per-tile instance (holes the detector itself produced)."""
    out = np.zeros(shape, dtype=bool)
    for inst in instances:
        enclosed = ndimage.binary_fill_holes(inst.mask) & ~inst.mask
        if enclosed.any():
            out[inst.row_off : inst.row_off + inst.height, inst.col_off : inst.col_off + inst.width] |= enclosed
    return out


def fused_in_a_tile(covered: npt.NDArray[np.int64], instances: Sequence[Instance], tiles: Sequence[Tile], labels: LabelArray) -> bool:
    """Return whether one per-tile instance already covers half of two of ``covered``'s objects.

    "Half" counts the part of each object inside that tile's read window: the detector itself reported
    the two as one there, so the output's fusion is inherited, not made by the merge.
    """
    for inst in instances:
        under = labels[inst.row_off : inst.row_off + inst.height, inst.col_off : inst.col_off + inst.width]
        ids = np.bincount(under[inst.mask], minlength=int(covered.max()) + 1)[covered]
        if np.count_nonzero(ids) < 2:
            continue
        w = tiles[inst.tile_id].read
        seen = labels[int(w.row_off) : int(w.row_off + w.height), int(w.col_off) : int(w.col_off + w.width)]
        visible = np.bincount(seen.ravel(), minlength=int(covered.max()) + 1)[covered]
        if np.count_nonzero((ids > 0) & (ids * 2 >= visible)) >= 2:
            return True
    return False


def defects(
    merged: list[Instance],
    labels: LabelArray,
    truth_areas: npt.NDArray[np.int64],
    detector_holes: npt.NDArray[np.bool_],
    instances: Sequence[Instance],
    tiles: Sequence[Tile],
) -> dict[str, int]:
    """Count fused neighbours (all, and those no single tile's instance had) and spurious holes (inside an
    object, in no input mask) of merged instances."""
    fused = by_merge = holes = 0
    for inst in merged:
        under = labels[inst.row_off : inst.row_off + inst.height, inst.col_off : inst.col_off + inst.width]
        ids = np.bincount(under[inst.mask], minlength=len(truth_areas))
        covered = np.flatnonzero((ids[1:] > 0) & (ids[1:] * 2 >= truth_areas[1:])) + 1
        if covered.size >= 2:
            fused += 1
            by_merge += int(not fused_in_a_tile(covered, instances, tiles, labels))
        main = int(ids[1:].argmax()) + 1 if ids[1:].any() else 0
        enclosed = ndimage.binary_fill_holes(inst.mask) & ~inst.mask
        if main and enclosed.any():
            lab, n = ndimage.label(enclosed)
            had = detector_holes[inst.row_off : inst.row_off + inst.height, inst.col_off : inst.col_off + inst.width]
            inside = ndimage.sum((under == main) & ~had, lab, range(1, n + 1))
            size = ndimage.sum(enclosed, lab, range(1, n + 1))
            holes += int(np.count_nonzero(inside * 2 > size))
    return {"fused": fused, "fused_by_merge": by_merge, "holes": holes}


def small_iou(merged: list[Instance], labels: LabelArray, truth_areas: npt.NDArray[np.int64]) -> float:
    """Mean IoU of each small truth object with the output covering most of it (IoU ≥ 0.5 only)."""
    best: dict[int, float] = {}
    for inst in merged:
        under = labels[inst.row_off : inst.row_off + inst.height, inst.col_off : inst.col_off + inst.width]
        ids = np.bincount(under[inst.mask], minlength=len(truth_areas))
        for t in np.flatnonzero(ids[1:]) + 1:
            if truth_areas[t] >= SMALL_PX:
                continue
            iou = ids[t] / (truth_areas[t] + inst.area_px - ids[t])
            if iou >= 0.5:
                best[int(t)] = max(best.get(int(t), 0.0), float(iou))
    return float(np.mean(list(best.values()))) if best else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=2048)
    ap.add_argument("--configs", default="256:32,256:64,512:64")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label", default="", help="name of this run in the output file (e.g. before/after)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("geomask").setLevel(logging.WARNING)
    started = time.perf_counter()
    labels = add_touching(build_scene(args.side, args.seed), args.seed, n_rows=args.side**2 // 60000, n_clusters=args.side**2 // 90000)
    truth_areas = np.bincount(labels.ravel()).astype(np.int64)
    truth = truth_objects(labels)
    log.info("scene %d px, %d objects", args.side, len(truth))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as d:
        image, labels_path = write_scene(d, labels, TRANSFORM, CRS)
        for tile, overlap in (tuple(int(v) for v in c.split(":")) for c in args.configs.split(",")):
            for oracle in ("exact", "noisy"):
                cfg = oracle_config(labels_path, oracle, tile, overlap, args.seed)
                detector = build_detector(cfg)
                plan = plan_raster(image, resolve_config(cfg, detector.hints))
                instances = detect_tiles(plan, plan.tiles, detector, cfg.detector.batch_size).instances
                had = input_holes(instances, labels.shape)
                for name, merged in (
                    ("geomask", merge_across_tiles(instances, plan.tiles, 0.5)),
                    ("perfect grouping", perfect_grouping(instances, plan.tiles, labels)),
                ):
                    pred = Objects.of([mask_to_pixel_polygons(m) for m in merged], [m.score for m in merged])
                    ev = evaluate(pred, truth, compute_ap=False).overall
                    row = {"tile_px": tile, "overlap_px": overlap, "oracle": oracle, "merge": name, "f1": ev.f1}
                    row |= defects(merged, labels, truth_areas, had, instances, plan.tiles) | {
                        "small_iou": small_iou(merged, labels, truth_areas)
                    }
                    row |= {"duplicates": ev.duplicates, "splits": ev.splits}
                    rows.append(row)
                    log.info("%s", row)
    table = [
        "| tile / overlap | oracle | merge | F1 | fused | fused by the merge | holes | small IoU | dup | split |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        table.append(
            f"| {r['tile_px']} / {r['overlap_px']} | {r['oracle']} | {r['merge']} | {r['f1']:.4f} | {r['fused']} | {r['fused_by_merge']} | {r['holes']} | "
            f"{r['small_iou']:.3f} | {r['duplicates']} | {r['splits']} |"
        )
    head = (
        f"`python bench/seam_defects.py --side {args.side} --configs {args.configs} --seed {args.seed}` ({args.label or 'this checkout'}) — "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"{len(truth)} objects; {(time.perf_counter() - started) / 60:.1f} min."
    )
    text = head + "\n\n" + "\n".join(table)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = f"_{args.label}" if args.label else ""
    (args.out / f"seam_defects{suffix}.md").write_text(text + "\n")
    (args.out / f"seam_defects{suffix}.json").write_text(json.dumps({"head": head, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
