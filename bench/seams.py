"""Seam benchmark: geomask's cross-tile merge against the merges other tools ship, on identical predictions.

Usage: python bench/seams.py [--side 3072] [--configs 256:32,256:64,512:64,512:128] [--seed 0] [--out bench/results]

For each tile size × overlap, a seeded synthetic scene (buildings, rows sharing walls, courtyards,
rotated rectangles, tree-like blobs, long bars; 8–1500 px) goes through the real geomask pipeline
with an oracle detector plugged in through ``detector.factory`` (``bench/oracles.py``): *exact*
(truth clipped to each tile) and *noisy* (1–2 px boundary jitter per tile, small cut fragments
dropped, score noise, false positives). The per-tile instances are captured once
(``geomask.pipeline.detect_tiles``) and every merge is applied to the same list:

* geomask — ``geomask.merge.merge_across_tiles`` (IoS 0.5 in the shared zone, core-based fusion);
* SAHI GREEDYNMM / NMM / NMS — the installed ``sahi`` package's postprocess classes with its sliced
  prediction defaults (IOS, 0.5, per class);
* box NMS as geoai (IoU 0.3) and DeepForest (IoU 0.15, class-agnostic) — ``torchvision.ops.nms``;
* keep-the-centre (ArcGIS) — an instance is kept when its mask centroid lies in its tile's core.

Every merge's output masks are traced with the same vectorizer (``mask_to_pixel_polygons``) and
scored with ``geomask.evaluate`` in pixel space against the truth: one-to-one matches at mask
IoU 0.5, duplicates and splits, per bucket of how many tiles see an object (1, 2, 3–4, ≥5). The
geomask row is also checked end to end: ``run_serial`` writes a GeoPackage in the map CRS and
``evaluate_frames`` scores it there. Merge wall time excludes the adapters that convert geomask
instances to and from another tool's representation; peak memory is tracemalloc's peak during the
merge alone (Python and numpy allocations; torch's allocator is not traced).
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
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import shapely
from affine import Affine
from oracles import dilate  # bench/ is on sys.path when this file runs as a script

from geomask.config import Config, merge_overrides
from geomask.evaluate import Evaluation, Objects, evaluate, evaluate_frames, read_layer, tile_polygons
from geomask.instances import Instance, from_mask
from geomask.merge import merge_across_tiles
from geomask.pipeline import build_detector, detect_tiles, plan_raster, resolve_config, run_serial
from geomask.testing import instances_from_labels, make_scene, write_scene
from geomask.tiling import Tile
from geomask.vectorize import mask_to_pixel_polygons, pixel_to_map

log = logging.getLogger("bench.seams")

BoolArray = npt.NDArray[np.bool_]
LabelArray = npt.NDArray[np.int32]
TRANSFORM = Affine(0.3, 0.0, 500_000.0, 0.0, -0.3, 5_000_000.0)
CRS = "EPSG:32633"
BUCKETS = ("seen by 1 tile", "seen by 2 tiles", "seen by 3-4 tiles", "seen by >=5 tiles")
BUCKET_HEAD = ("1 tile", "2 tiles", "3-4 tiles", "≥5 tiles")
# Objects under this area (px) are 4×4-ish: ±1 px of noise alone decides whether IoU reaches 0.5.
LARGE_PX = 64

# --------------------------------------------------------------------------------------------------
# Scene: geomask.testing.make_scene plus rotated rectangles, tree-like blobs and long bars
# --------------------------------------------------------------------------------------------------


def rotated_rectangle(h: float, w: float, angle_deg: float) -> BoolArray:
    """Rasterise a ``h`` × ``w`` rectangle rotated by ``angle_deg`` (pixel centres inside)."""
    side = int(np.ceil(np.hypot(h, w))) + 2
    yy, xx = np.mgrid[:side, :side] + 0.5 - side / 2
    a = np.deg2rad(angle_deg)
    u = xx * np.cos(a) + yy * np.sin(a)
    v = -xx * np.sin(a) + yy * np.cos(a)
    m = (np.abs(u) <= w / 2) & (np.abs(v) <= h / 2)
    return _crop(m)


def tree_blob(rng: np.random.Generator, radius: int) -> BoolArray:
    """A crown-like blob: the union of a few overlapping discs."""
    side = 4 * radius + 1
    yy, xx = np.mgrid[:side, :side]
    m = np.zeros((side, side), dtype=bool)
    for _ in range(int(rng.integers(3, 8))):
        r = max(2.0, radius * rng.uniform(0.4, 0.8))
        cy, cx = side / 2 + rng.uniform(-radius, radius) * 0.6, side / 2 + rng.uniform(-radius, radius) * 0.6
        m |= (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= r * r
    return _crop(m)


def _crop(m: BoolArray) -> BoolArray:
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    return m[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def add_shapes(labels: LabelArray, seed: int, n_rotated: int, n_blobs: int, n_bars: int) -> LabelArray:
    """Add long bars, rotated rectangles and tree-like blobs to a scene, 1 px apart from other objects.

    Bars (600–1500 px long: roads of row houses, hedges) are what spans five or more tiles, but a dense
    scene has no free lane that long, so a bar clears the small objects under it (whole objects, never
    parts of one); it is moved if it would hit a big one. The others only go into free space.
    """
    rng = np.random.default_rng(seed + 1000)
    out = labels.copy()
    next_id = int(out.max()) + 1
    height, width = out.shape
    # Objects added here are never cleared: they count as big.
    sizes = np.concatenate([np.bincount(out.ravel()), np.full(n_bars + n_rotated + n_blobs, 1 << 40)])

    def place(shape: BoolArray, clear_below_px: int = 0) -> None:
        nonlocal next_id
        h, w = shape.shape
        if h >= height or w >= width:
            return
        for _ in range(30):
            r, c = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
            r0, c0 = max(0, r - 1), max(0, c - 1)
            halo = dilate(np.pad(shape, 1))[r - r0 :, c - c0 :][: min(h + 2, height - r0), : min(w + 2, width - c0)]
            hit = np.unique(out[r0 : r0 + halo.shape[0], c0 : c0 + halo.shape[1]][halo])
            hit = hit[hit > 0]
            if hit.size and (not clear_below_px or sizes[hit].max() >= clear_below_px):
                continue
            if hit.size:
                out[np.isin(out, hit)] = 0
            out[r : r + h, c : c + w][shape] = next_id
            next_id += 1
            return

    for k in range(n_bars):
        length, thick = float(rng.uniform(600, 1500)), float(rng.uniform(12, 30))
        place(rotated_rectangle(thick, length, [0.0, 90.0, float(rng.uniform(20, 70))][k % 3]), clear_below_px=40_000)
    for _ in range(n_rotated):
        h, w = (float(v) for v in rng.uniform(10, 200, size=2))
        place(rotated_rectangle(h, w, float(rng.uniform(0, 180))))
    for _ in range(n_blobs):
        place(tree_blob(rng, int(rng.integers(4, 40))))
    return out


def build_scene(side: int, seed: int) -> LabelArray:
    """The benchmark scene: dense buildings and crowns, 8–1500 px, some spanning many tiles."""
    base = make_scene(side, side, n_objects=side * side // 9000, seed=seed, max_size_px=1500, n_big=3)
    return add_shapes(base, seed, n_rotated=side * side // 40000, n_blobs=side * side // 30000, n_bars=16)


# --------------------------------------------------------------------------------------------------
# Merges: prepare (adapter, untimed) → run (timed) → finish (adapter, untimed)
# --------------------------------------------------------------------------------------------------


@dataclass
class Merge:
    """A merge under test, split so that only the merge itself is timed."""

    name: str
    run: Callable[[Any, Sequence[Tile]], Any]
    prepare: Callable[[list[Instance], tuple[int, int]], Any] = lambda insts, shape: insts
    finish: Callable[[Any], list[Instance]] = lambda out: list(out)
    note: str = ""


def geomask_merge(instances: list[Instance], tiles: Sequence[Tile]) -> list[Instance]:
    return merge_across_tiles(instances, tiles, ios_threshold=0.5)


def keep_centre(instances: list[Instance], tiles: Sequence[Tile]) -> list[Instance]:
    """ArcGIS-style: keep an instance when its mask centroid lies in its own tile's core."""
    kept = []
    for inst in instances:
        rows, cols = np.nonzero(inst.mask)
        cy, cx = inst.row_off + rows.mean() + 0.5, inst.col_off + cols.mean() + 0.5
        core = tiles[inst.tile_id].core
        if core.row_off <= cy < core.row_off + core.height and core.col_off <= cx < core.col_off + core.width:
            kept.append(inst)
    return kept


def box_nms(iou: float, class_agnostic: bool) -> Callable[[list[Instance], Sequence[Tile]], list[Instance]]:
    """Box NMS over all tiles' instances (torchvision), keeping each survivor's mask as it is."""
    import torch
    from torchvision.ops import batched_nms, nms

    def run(instances: list[Instance], tiles: Sequence[Tile]) -> list[Instance]:
        if not instances:
            return []
        boxes = torch.tensor([inst.bounds() for inst in instances], dtype=torch.float32)
        scores = torch.tensor([inst.score for inst in instances], dtype=torch.float32)
        if class_agnostic:
            keep = nms(boxes, scores, iou)
        else:
            keep = batched_nms(boxes, scores, torch.tensor([inst.class_id for inst in instances]), iou)
        return [instances[i] for i in sorted(keep.tolist())]

    return run


def sahi_merges() -> list[Merge]:
    """SAHI's GREEDYNMM, NMM and NMS with its sliced-prediction defaults (IOS 0.5, per class)."""
    from sahi.postprocess.backends import set_postprocess_backend
    from sahi.postprocess.combine import GreedyNMMPostprocess, NMMPostprocess, NMSPostprocess
    from sahi.prediction import ObjectPrediction
    from sahi.utils.cv import get_bool_mask_from_coco_segmentation, get_coco_segmentation_from_bool_mask

    set_postprocess_backend("numpy")  # what SAHI picks without numba or a GPU

    def to_sahi(instances: list[Instance], shape: tuple[int, int]) -> list[ObjectPrediction]:
        # As a SAHI model adapter does: the mask as COCO polygons in slice coordinates, then shifted.
        out = []
        for inst in instances:
            segmentation = get_coco_segmentation_from_bool_mask(inst.mask)
            if not segmentation:
                continue  # under 3 contour points (1-px slivers): SAHI's detectron2 adapter drops these too
            pred = ObjectPrediction(
                bbox=None,
                category_id=inst.class_id,
                category_name=str(inst.class_id),
                segmentation=segmentation,
                score=inst.score,
                shift_amount=[inst.col_off, inst.row_off],
                full_shape=list(shape),
            )
            out.append(pred.get_shifted_object_prediction())
        return out

    def from_sahi(preds: list[ObjectPrediction]) -> list[Instance]:
        out = []
        for p in preds:
            seg = p.mask.segmentation if p.mask is not None else []
            seg = [s for s in seg if len(s) >= 6]
            if seg:
                pts = np.concatenate([np.asarray(s, dtype=np.float64).reshape(-1, 2) for s in seg])
                x0, y0 = np.floor(pts.min(axis=0)).astype(int)
                x1, y1 = np.ceil(pts.max(axis=0)).astype(int) + 1
                local = [(np.asarray(s, dtype=np.float64).reshape(-1, 2) - (x0, y0)).ravel().tolist() for s in seg]
                mask = get_bool_mask_from_coco_segmentation(local, width=int(x1 - x0), height=int(y1 - y0))
            else:  # no polygon survived (slivers): SAHI keeps a box-only prediction
                bx0, by0, bx1, by1 = (round(v) for v in p.bbox.to_xyxy())
                x0, y0 = bx0, by0
                mask = np.ones((max(1, by1 - by0), max(1, bx1 - bx0)), dtype=bool)
            inst = from_mask(mask, row_off=int(y0), col_off=int(x0), score=float(p.score.value), class_id=int(p.category.id))
            if inst is not None:
                out.append(inst)
        return out

    merges = []
    for name, cls in (("SAHI GREEDYNMM", GreedyNMMPostprocess), ("SAHI NMM", NMMPostprocess), ("SAHI NMS", NMSPostprocess)):
        post = cls(match_threshold=0.5, match_metric="IOS", class_agnostic=False)
        merges.append(Merge(name, lambda preds, tiles, post=post: post(preds), to_sahi, from_sahi, "IOS 0.5"))
    return merges


def all_merges() -> tuple[list[Merge], list[str]]:
    """Every merge that can run here, and notes on the ones that cannot."""
    merges = [Merge("geomask", geomask_merge, note="IoS 0.5 in shared zone")]
    notes: list[str] = []
    try:
        merges += sahi_merges()
    except ImportError as err:
        notes.append(f"SAHI not installed ({err}); its rows are missing, nothing stands in for them")
    try:
        merges += [
            Merge("box NMS (geoai)", box_nms(0.3, class_agnostic=False), note="IoU 0.3"),
            Merge("box NMS (DeepForest)", box_nms(0.15, class_agnostic=True), note="IoU 0.15, class-agnostic"),
        ]
    except ImportError as err:
        notes.append(f"torchvision not importable ({err}); box NMS rows are missing")
    merges.append(Merge("keep-the-centre (ArcGIS)", keep_centre, note="mask centroid in tile core"))
    return merges, notes


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One merge on one configuration and oracle."""

    tile: int
    overlap: int
    oracle: str
    merge: str
    n_in: int
    seconds: float
    peak_mib: float
    result: Evaluation
    large: Evaluation | None = None  # objects of at least LARGE_PX only (smaller truth as ignore regions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tile_px": self.tile,
            "overlap_px": self.overlap,
            "oracle": self.oracle,
            "merge": self.merge,
            "instances_in": self.n_in,
            "merge_seconds": self.seconds,
            "merge_peak_mib": self.peak_mib,
            "evaluation": self.result.to_dict(),
            f"evaluation_objects_from_{LARGE_PX}px": self.large.to_dict() if self.large else None,
        }


def truth_objects(labels: LabelArray) -> Objects:
    truth = instances_from_labels(labels, 0, 0)
    return Objects.of([mask_to_pixel_polygons(t) for t in truth])


class Tracer:
    """``mask_to_pixel_polygons`` with a cache: most merges hand back many of their input instances."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple[Instance, Any]] = {}

    def __call__(self, inst: Instance) -> Any:
        hit = self._cache.get(id(inst))
        if hit is None or hit[0] is not inst:
            hit = (inst, mask_to_pixel_polygons(inst))
            self._cache[id(inst)] = hit
        return hit[1]


def score_merge(
    merged: list[Instance],
    truth: Objects,
    tiles_px: np.ndarray,
    tracer: Callable[[Instance], Any] = mask_to_pixel_polygons,
    ignore: Any = None,
) -> Evaluation:
    pred = Objects.of([tracer(m) for m in merged], [m.score for m in merged])
    return evaluate(pred, truth, tiles=tiles_px, ignore=ignore, compute_ap=False)


def time_merge(
    merge: Merge, instances: list[Instance], tiles: Sequence[Tile], shape: tuple[int, int]
) -> tuple[list[Instance], float, float]:
    """Run a merge twice on fresh inputs: once timed, once under tracemalloc for its peak memory."""
    data = merge.prepare(instances, shape)
    t0 = time.perf_counter()
    out = merge.run(data, tiles)
    seconds = time.perf_counter() - t0
    data = merge.prepare(instances, shape)
    tracemalloc.start()
    tracemalloc.reset_peak()
    merge.run(data, tiles)
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return merge.finish(out), seconds, peak


def oracle_config(labels_path: Path, oracle: str, tile: int, overlap: int, seed: int) -> Config:
    options: dict[str, Any] = {"labels": str(labels_path)}
    if oracle == "noisy":
        options["seed"] = seed
    return merge_overrides(
        Config(),
        {
            "detector.factory": f"oracles:{oracle}_truth_detector",
            "detector.options": options,
            "tiling.size_px": tile,
            "tiling.overlap_px": overlap,
            "detector.batch_size": 8,
        },
    )


def run_config(
    image: Path,
    labels_path: Path,
    truth: Objects,
    truth_map: Any,
    shape: tuple[int, int],
    tile: int,
    overlap: int,
    merges: list[Merge],
    seed: int,
    work: Path,
) -> list[Row]:
    rows: list[Row] = []
    small = truth.geometry[shapely.area(truth.geometry) < LARGE_PX]
    for oracle in ("exact", "noisy"):
        cfg = oracle_config(labels_path, oracle, tile, overlap, seed)
        detector = build_detector(cfg)
        plan = plan_raster(image, resolve_config(cfg, detector.hints))
        instances = detect_tiles(plan, plan.tiles, detector, cfg.detector.batch_size).instances
        tiles_px = tile_polygons(plan.tiles, Affine.identity())
        tracer = Tracer()
        for merge in merges:
            t0 = time.perf_counter()
            merged, seconds, peak = time_merge(merge, instances, plan.tiles, shape)
            ev = score_merge(merged, truth, tiles_px, tracer)
            large = score_merge(merged, truth, tiles_px, tracer, ignore=small) if oracle == "noisy" else None
            rows.append(Row(tile, overlap, oracle, merge.name, len(instances), seconds, peak, ev, large))
            log.info(
                "%4d/%3d %-5s %-26s F1 %.4f dup %3d split %3d  merge %.2fs (%.1fs with scoring)",
                tile, overlap, oracle, merge.name, ev.overall.f1 or 0, ev.overall.duplicates, ev.overall.splits, seconds,
                time.perf_counter() - t0,
            )  # fmt: skip
        # The same geomask merge end to end: the real pipeline writes a GeoPackage in the map CRS.
        t0 = time.perf_counter()
        out = work / f"{oracle}_{tile}_{overlap}.gpkg"
        run_serial(image, out, cfg, overwrite=True)  # a re-run of the benchmark replaces its own outputs
        seconds = time.perf_counter() - t0
        import geopandas as gpd

        tiles_map = gpd.GeoSeries(tile_polygons(plan.tiles, TRANSFORM), crs=CRS)
        ev = evaluate_frames(read_layer(out), truth_map, tiles=tiles_map, compute_ap=False)
        rows.append(Row(tile, overlap, oracle, "geomask, full pipeline → GPKG", len(instances), seconds, float("nan"), ev))
        log.info("%4d/%3d %-5s %-26s F1 %.4f dup %3d split %3d  (whole run %.1fs)", tile, overlap, oracle, "pipeline", ev.overall.f1 or 0,
                 ev.overall.duplicates, ev.overall.splits, seconds)  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------


def _f(v: float | None, d: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{d}f}"


def overall_table(rows: list[Row]) -> list[str]:
    out = ["| tile / overlap | merge | in | out | P | R | F1 | mean IoU | dup | split | merge s | peak MiB |"]
    out.append("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        o = r.result.overall
        secs = _f(r.seconds, 2) + (" (whole run)" if "pipeline" in r.merge else "")
        out.append(
            f"| {r.tile} / {r.overlap} | {r.merge} | {r.n_in} | {o.n_pred} | {_f(o.precision)} | {_f(o.recall)} | {_f(o.f1)} | "
            f"{_f(o.mean_iou)} | {o.duplicates} | {o.splits} | {secs} | {_f(r.peak_mib, 1)} |"
        )
    return out


def bucket_table(rows: list[Row], pick: Callable[[Row], Evaluation | None]) -> list[str]:
    out = ["| tile / overlap | merge | " + " | ".join(BUCKET_HEAD) + " | crosses a tile edge |"]
    out.append("|---|---|" + "--:|" * (len(BUCKET_HEAD) + 1))
    for r in rows:
        ev = pick(r)
        if ev is None:
            continue
        seams = {s.name: s for s in ev.seams}
        cells = [f"{_f(seams[b].f1)} ({seams[b].duplicates}/{seams[b].splits})" for b in (*BUCKETS, "crosses a tile edge")]
        out.append(f"| {r.tile} / {r.overlap} | {r.merge} | " + " | ".join(cells) + " |")
    first = pick(rows[0]) if rows else None
    if first is not None:
        by_name = {x.name: x for x in first.seams}
        counts = ", ".join(f"{h}: {by_name[b].n_truth}" for h, b in zip((*BUCKET_HEAD, "crossing"), (*BUCKETS, "crosses a tile edge")))
        out.append("")
        out.append(f"Objects per bucket at {rows[0].tile} / {rows[0].overlap}: {counts} (they change with the tiling).")
    return out


def tables(rows: list[Row]) -> str:
    """Markdown: per oracle, the overall table and the per-bucket table; for noisy, also objects ≥ LARGE_PX."""
    out: list[str] = []
    for oracle in ("exact", "noisy"):
        sel = [r for r in rows if r.oracle == oracle]
        out += [f"### {oracle} oracle — all objects", "", *overall_table(sel), ""]
        out += [f"### {oracle} oracle — by how many tiles see an object: F1 (duplicates / splits)", ""]
        for tile, overlap in dict.fromkeys((r.tile, r.overlap) for r in sel):
            out += [*bucket_table([r for r in sel if (r.tile, r.overlap) == (tile, overlap)], lambda r: r.result), ""]
        if oracle == "noisy":
            out += [f"### noisy oracle — objects of {LARGE_PX} px or more (smaller truth objects ignored): F1 (duplicates / splits)", ""]
            for tile, overlap in dict.fromkeys((r.tile, r.overlap) for r in sel):
                out += [*bucket_table([r for r in sel if (r.tile, r.overlap) == (tile, overlap)], lambda r: r.large), ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=3072, help="scene side in pixels")
    ap.add_argument("--configs", default="256:32,256:64,512:64,512:128", help="tile:overlap pairs in pixels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the oracles module, for detector.factory
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("geomask").setLevel(logging.WARNING)
    configs = [tuple(int(v) for v in c.split(":")) for c in args.configs.split(",")]
    started = time.perf_counter()
    merges, notes = all_merges()
    labels = build_scene(args.side, args.seed)
    truth = truth_objects(labels)
    import geopandas as gpd

    truth_map = gpd.GeoDataFrame(geometry=[pixel_to_map(g, TRANSFORM) for g in truth.geometry], crs=CRS)
    log.info("scene %d px, %d objects", args.side, len(truth))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as d:
        image, labels_path = write_scene(d, labels, TRANSFORM, CRS)
        for tile, overlap in configs:
            rows += run_config(image, labels_path, truth, truth_map, labels.shape, tile, overlap, merges, args.seed, Path(d))
    total = time.perf_counter() - started
    areas = shapely.area(truth.geometry)
    b = shapely.bounds(truth.geometry)
    sides = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
    head = [
        "## Seam benchmark",
        "",
        f"`python bench/seams.py --side {args.side} --configs {args.configs} --seed {args.seed}` — "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, no GPU, Python {platform.python_version()}; whole run {total / 60:.1f} min.",
        "",
        f"Scene: {args.side}×{args.side} px, {len(truth)} objects, {areas.min():.0f}–{areas.max():.0f} px in area, "
        f"{sides.min():.0f}–{sides.max():.0f} px long. Matching: one-to-one at mask IoU ≥ 0.5 in pixel space (`geomask.evaluate`). "
        "A duplicate is a matched object with another prediction mostly inside it; a split is an unmatched object "
        "covered by ≥ 2 predictions mostly inside it. Merge seconds exclude format adapters; peak MiB is tracemalloc's "
        "peak during the merge (torch allocations not traced).",
        "",
        *([f"Note: {n}" for n in notes]),
        "",
    ]
    text = "\n".join(head) + tables(rows)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seams.md").write_text(text + "\n")
    meta = {"side_px": args.side, "seed": args.seed, "configs": configs, "n_objects": len(truth), "minutes": total / 60, "notes": notes}
    (args.out / "seams.json").write_text(json.dumps({"meta": meta, "rows": [r.to_dict() for r in rows]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
