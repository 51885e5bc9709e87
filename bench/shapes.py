"""Shape benchmark: what each outline method does to building footprints, measured against the truth.

Usage: python bench/shapes.py [--per-type 40] [--seed 0] [--real ../shared/data/buildings_fair --pred DIR]

(a) **Synthetic**: rectangles, rotated rectangles, L-shapes, courtyards, rows of touching houses and
round tanks, drawn as polygons, rasterised at 0.3 m (pixel centres) and perturbed by 1–2 px of smooth
mask noise; the masks go through the real vectorizer and then through each method. Scored against
the *true polygons*: F1@0.5, mean IoU, C-IoU, PoLiS (m), max tangent angle error, vertex ratio, plus
invalid outputs and new overlaps (the masks are disjoint, so any overlap between outputs is new).
``buildingregulariser`` (PyPI) runs on the same pixel outlines when installed.

(b) **Real**: the bundled model's pixel outlines on the shared buildings areas (``--pred``: one
GeoPackage per block, written by ``geomask predict --serial`` with ``shape.method: pixel``), reshaped
offline by exactly the stage the pipeline runs (``geomask.pipeline.shape_plan``'s inner call) on each
block's working grid, and scored against the OSM footprints inside each block (edge footprints ignored).

(c) **Time** of each method per 1 000 polygons (the synthetic set, this process, one core).

(d) **Seams**: the seam benchmark's scene through the full pipeline with the exact oracle, ``pixel`` vs
``orthogonal``: F1 must not change.
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from affine import Affine
from pyproj import CRS as ProjCRS
from rasterio import features
from scipy import ndimage
from shapely import affinity
from shapely.geometry import MultiPolygon, Polygon, box

from geomask.config import load_config, merge_overrides
from geomask.evaluate import Evaluation, Objects, evaluate, evaluate_frames, read_layer
from geomask.instances import Instance
from geomask.pipeline import config_sidecar, run_serial
from geomask.raster import inspect_raster, working_grid
from geomask.shape import ShapeRule, shape_features
from geomask.vectorize import Feature, pixel_to_map, vectorize_instances

log = logging.getLogger("bench.shapes")
GSD = 0.3
TRANSFORM = Affine(GSD, 0.0, 500_000.0, 0.0, -GSD, 5_000_000.0)
CRS = "EPSG:32633"
CELL = 110  # px per scene cell: one building (or one row of houses) each
TYPES = ("rectangle", "rotated", "L-shape", "courtyard", "row", "tank")
METHODS: dict[str, ShapeRule] = {
    "pixel": ShapeRule("pixel"),
    "simplify": ShapeRule("simplify"),
    "orthogonal": ShapeRule("orthogonal"),
    "orthogonal+45°": ShapeRule("orthogonal", diagonals=True),
}


# --------------------------------------------------------------------------------------------------
# (a) synthetic buildings
# --------------------------------------------------------------------------------------------------


def building(kind: str, rng: np.random.Generator) -> list[Polygon]:
    """One building (or a row of touching houses) in cell pixel coordinates, centred at (55, 55)."""
    w, h = rng.uniform(25, 70), rng.uniform(20, 45)  # 7.5–21 m × 6–13.5 m
    angle = float(rng.uniform(0, 90)) if kind != "rectangle" else 0.0
    if kind in ("rectangle", "rotated"):
        polys = [box(-w / 2, -h / 2, w / 2, h / 2)]
    elif kind == "L-shape":
        a, b = w * rng.uniform(0.35, 0.6), h * rng.uniform(0.35, 0.6)
        polys = [
            Polygon(
                [(-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, -h / 2 + b), (-w / 2 + a, -h / 2 + b), (-w / 2 + a, h / 2), (-w / 2, h / 2)]
            )
        ]
    elif kind == "courtyard":
        s = max(w, h) * 0.9
        polys = [box(-s / 2, -s / 2, s / 2, s / 2).difference(box(-s / 5, -s / 5, s / 5, s / 5))]
    elif kind == "row":
        n = int(rng.integers(3, 5))
        hw, hh = rng.uniform(18, 24), rng.uniform(22, 32)
        polys = [box(-n * hw / 2 + k * hw, -hh / 2, -n * hw / 2 + (k + 1) * hw, hh / 2) for k in range(n)]
    else:
        return [shapely.Point(55, 55).buffer(float(rng.uniform(8, 25)), quad_segs=16)]
    return [affinity.translate(affinity.rotate(p, angle, origin=(0, 0)), 55, 55) for p in polys]


def noisy(poly: Polygon, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise at pixel centres and move the boundary by a smooth random field (σ 3 px, 1 px RMS: 1–2 px)."""
    clean = features.rasterize([poly], out_shape=shape).astype(bool)
    signed = ndimage.distance_transform_edt(clean) - ndimage.distance_transform_edt(~clean)
    field = ndimage.gaussian_filter(rng.normal(size=shape), 3)
    return signed + field / field.std() > 0.5


def synthetic_scene(per_type: int, seed: int) -> tuple[list[Instance], list[Polygon], list[str]]:
    """Masks (one per building, disjoint) and true polygons (pixel space) with their types."""
    rng = np.random.default_rng(seed)
    kinds = [k for k in TYPES for _ in range(per_type)]
    side = math.ceil(math.sqrt(len(kinds)))
    instances: list[Instance] = []
    truth: list[Polygon] = []
    types: list[str] = []
    for n, kind in enumerate(kinds):
        r0, c0 = (n // side) * CELL, (n % side) * CELL
        taken = np.zeros((CELL, CELL), bool)
        for poly in building(kind, rng):
            mask = noisy(poly, rng, (CELL, CELL)) & ~taken  # a row's houses share walls: first come, first served
            labels, count = ndimage.label(mask)
            if count == 0:
                continue
            mask = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
            taken |= mask
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            crop = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
            instances.append(Instance(r0 + int(rows[0]), c0 + int(cols[0]), crop, 1.0, 0))
            truth.append(affinity.translate(poly, c0, r0))
            types.append(kind)
    return instances, truth, types


def buildingregulariser_method() -> Callable[[list[Feature]], list[Any]] | None:
    """``buildingregulariser.regularize_geodataframe`` at this GSD, or ``None`` when it is not installed."""
    try:
        from buildingregulariser import regularize_geodataframe
    except ImportError:
        return None

    def run(feats: list[Feature]) -> list[Any]:
        frame = gpd.GeoDataFrame(geometry=[f.geometry for f in feats], crs=CRS)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = regularize_geodataframe(frame, simplify_tolerance=GSD, parallel_threshold=3 * GSD, num_cores=1)
        return list(out.geometry)

    return run


def outline_counts(geoms: list[Any]) -> tuple[int, int]:
    """Invalid outputs and overlapping pairs (intersection > 0.01 m²)."""
    arr = np.asarray(geoms, dtype=object)
    invalid = int((~shapely.is_valid(arr) | shapely.is_empty(arr)).sum())
    tree = shapely.STRtree(arr)
    a, b = tree.query(arr, predicate="intersects")
    keep = a < b
    inter = shapely.area(shapely.intersection(arr[a[keep]], arr[b[keep]])) if keep.any() else np.zeros(0)
    return invalid, int((inter > 0.01).sum())


def row(name: str, ev: Evaluation, invalid: int, overlaps: int, seconds: float, n: int, extra: str = "") -> str:
    s, o = ev.shape, ev.overall
    assert s is not None
    return (
        f"| {name} | {o.f1:.3f} | {s.mean_iou:.3f} | {s.c_iou:.3f} | {s.polis:.3f} | {s.max_angle_deg:.1f} | {s.vertex_ratio:.2f} "
        f"| {invalid} | {overlaps} | {1000 * seconds / n:.2f} |{extra}"
    )


def synthetic(per_type: int, seed: int) -> list[str]:
    instances, truth_px, types = synthetic_scene(per_type, seed)
    crs = ProjCRS.from_user_input(CRS)
    feats = vectorize_instances(instances, TRANSFORM, crs, GSD)
    truth = [pixel_to_map(MultiPolygon([p]), TRANSFORM) for p in truth_px]
    truth_objs = Objects.of(truth, label=types)
    lines = [
        f"(a) synthetic: {len(truth)} buildings ({per_type} of each type; rows give 3–4 houses each), 0.3 m, 1–2 px mask noise, seed {seed}",
        "",
        "| method | F1@0.5 | IoU to truth | C-IoU | PoLiS (m) | max angle (°) | vertices / truth | invalid | new overlaps | s per 1000 polygons |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    per_type_iou: dict[str, list[str]] = {}
    methods: dict[str, Callable[[list[Feature]], list[Any]]] = {
        name: (lambda fs, r=rule: [f.geometry for f in shape_features(fs, TRANSFORM, crs, {}, r)]) for name, rule in METHODS.items()
    }
    br = buildingregulariser_method()
    if br is not None:
        methods["buildingregulariser 0.2.5"] = br
    for name, method in methods.items():
        t0 = time.perf_counter()
        geoms = method(feats)
        seconds = time.perf_counter() - t0
        labels = [types[k] for k in range(len(geoms))]
        ev = evaluate(Objects.of(geoms, label=labels), truth_objs, shape_metrics=True, compute_ap=False)
        invalid, overlaps = outline_counts(geoms)
        lines.append(row(name, ev, invalid, overlaps, seconds, len(geoms)))
        for kind in TYPES:
            sel = [k for k, t in enumerate(types) if t == kind]
            e = evaluate(Objects.of([geoms[k] for k in sel]), Objects.of([truth[k] for k in sel]), shape_metrics=True, compute_ap=False)
            assert e.shape is not None
            per_type_iou.setdefault(name, []).append(f"{e.shape.mean_iou:.3f} / {e.shape.c_iou:.3f}")
        log.info("synthetic %s done in %.1f s", name, seconds)
    lines += [
        "",
        "IoU to truth / C-IoU per building type:",
        "",
        "| method | " + " | ".join(TYPES) + " |",
        "| --- |" + " --- |" * len(TYPES),
    ]
    lines += [f"| {name} | " + " | ".join(vals) + " |" for name, vals in per_type_iou.items()]
    return lines


# --------------------------------------------------------------------------------------------------
# (b) real model output
# --------------------------------------------------------------------------------------------------


def real(data: Path, pred: Path, areas: list[str]) -> list[str]:
    lines = [
        "(b) bundled buildings model (`configs/buildings.yaml`, shape pixel) on the shared fAIr areas, reshaped offline by the same stage; "
        "truth: OSM footprints inside each block, edge footprints ignored. PoLiS in EPSG:3857 metres (nominal; < 3 % long at these latitudes).",
        "",
        "| area | method | F1@0.5 | mean IoU | C-IoU | PoLiS (m) | max angle (°) | vertices / truth | shape labels |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    br = buildingregulariser_method()
    for area in areas:
        blocks = sorted((data / area).glob("*.tif"))
        per_method: dict[str, list[gpd.GeoDataFrame]] = {}
        for tif in blocks:
            out = pred / area / f"{tif.stem}.gpkg"
            frame = read_layer(out)
            cfg = load_config(config_sidecar(out))
            info = inspect_raster(tif)
            grid = working_grid(info, cfg.raster.gsd_m)
            feats = [
                Feature(MultiPolygon(list(getattr(g, "geoms", [g]))), 0, s, 0.0, 0.0)
                for g, s in zip(frame.geometry, frame["score"], strict=True)
            ]
            for name, rule in METHODS.items():
                shaped = shape_features(feats, grid.transform, info.crs, {}, ShapeRule(rule.method, 3.0, 1.0, rule.diagonals))
                per_method.setdefault(name, []).append(
                    gpd.GeoDataFrame(
                        {"score": [f.score for f in shaped], "shape": [f.shape for f in shaped]},
                        geometry=[f.geometry for f in shaped],
                        crs=info.crs,
                    )
                )
            if br is not None:
                geoms = gpd.GeoDataFrame({"score": frame["score"].to_numpy()}, geometry=frame.geometry.to_numpy(), crs=info.crs)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = __import__("buildingregulariser").regularize_geodataframe(
                        geoms, simplify_tolerance=grid.gsd_m, parallel_threshold=3 * grid.gsd_m, num_cores=1
                    )
                per_method.setdefault("buildingregulariser 0.2.5", []).append(
                    gpd.GeoDataFrame({"score": res["score"].to_numpy(), "shape": "br"}, geometry=res.geometry.to_numpy(), crs=info.crs)
                )
        truth = _cat([gpd.read_file(data / area / f"{t.stem}_labels_within.geojson") for t in blocks])
        ignore = _cat([gpd.read_file(data / area / f"{t.stem}_labels_edge.geojson") for t in blocks])
        truth["geometry"] = shapely.make_valid(truth.geometry.to_numpy())
        for name, frames in per_method.items():
            pf = _cat(frames)
            ev = evaluate_frames(pf, truth, ignore=ignore, shape_metrics=True, compute_ap=False)
            s, o = ev.shape, ev.overall
            assert s is not None
            counts = ", ".join(f"{k} {v}" for k, v in pf["shape"].value_counts().items()) if name != "buildingregulariser 0.2.5" else "-"
            lines.append(
                f"| {area} | {name} | {o.f1:.3f} | {o.mean_iou:.3f} | {s.c_iou:.3f} | {s.polis:.3f} | {s.max_angle_deg:.1f} | {s.vertex_ratio:.2f} | {counts} |"
            )
        log.info("real %s done", area)
    return lines


def _cat(frames: list[gpd.GeoDataFrame]) -> gpd.GeoDataFrame:
    crs = frames[0].crs
    return gpd.GeoDataFrame(pd.concat([f.to_crs(crs) for f in frames], ignore_index=True), crs=crs)


# --------------------------------------------------------------------------------------------------
# (d) the seam scene, pixel vs orthogonal
# --------------------------------------------------------------------------------------------------


def seams(side: int, seed: int) -> list[str]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from seams import CRS as SEAM_CRS
    from seams import TRANSFORM as SEAM_TRANSFORM
    from seams import build_scene, oracle_config, truth_objects

    from geomask.testing import write_scene

    labels = build_scene(side, seed)
    truth = truth_objects(labels)
    truth_map = gpd.GeoDataFrame(geometry=[pixel_to_map(g, SEAM_TRANSFORM) for g in truth.geometry], crs=SEAM_CRS)
    lines = [f"(d) seam scene ({side} px, seed {seed}, exact oracle, tiles 256/32) through the full pipeline:", ""]
    with tempfile.TemporaryDirectory() as d:
        image, labels_path = write_scene(d, labels, SEAM_TRANSFORM, SEAM_CRS)
        for method in ("pixel", "orthogonal"):
            cfg = merge_overrides(oracle_config(labels_path, "exact", 256, 32, seed), {"vectorize.shape.method": method})
            out = Path(d) / f"{method}.gpkg"
            run_serial(image, out, cfg)
            ev = evaluate_frames(read_layer(out), truth_map, compute_ap=False)
            o = ev.overall
            exact = ""
            if method == "pixel":
                got = sorted(g.wkb for g in shapely.normalize(read_layer(out).geometry.to_numpy()))
                want = sorted(g.wkb for g in shapely.normalize(truth_map.geometry.to_numpy()))
                exact = f", outlines identical to the truth's: {got == want}"
            lines.append(f"- {method}: F1 {o.f1:.4f}, TP {o.tp}/{o.n_truth}, mean IoU {o.mean_iou:.4f}{exact}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-type", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--real", type=Path, help="the shared buildings_fair folder")
    ap.add_argument("--pred", type=Path, help="predictions: PRED/areaN/<block>.gpkg with their .config.yaml")
    ap.add_argument("--areas", default="area1,area3,area4,area5")
    ap.add_argument("--seam-side", type=int, default=1536)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("geomask").setLevel(logging.WARNING)
    lines = [f"machine: {platform.processor() or platform.machine()}; python {platform.python_version()}", ""]
    lines += synthetic(args.per_type, args.seed)
    if args.real and args.pred:
        lines += ["", *real(args.real, args.pred, args.areas.split(","))]
    if args.seam_side:
        lines += ["", *seams(args.seam_side, args.seed)]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
