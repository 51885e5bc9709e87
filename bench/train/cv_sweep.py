"""Inference settings chosen by cross-validation: score threshold, minimum area and TTA over CV folds.

Usage: python bench/train/cv_sweep.py RECIPE [--thresholds 0.5 0.7] [--tta 1 4] [--config configs/buildings.yaml]
                                      [--mask-thresholds 0.4 0.5] [--nms-thresholds 0.3 0.5]
                                      [--ensemble RECIPE2 ...] [--folds area1 ...] [--root runs/cv]

For each fold of a leave-one-city-out run (``bench/train/cv_buildings.sh``: ``ROOT/RECIPE/AREA/model.pt``,
trained without the held-out city), predicts the held-out city's full GeoTIFFs once per score threshold and
TTA setting with the config (the threshold set in the config, not applied afterwards: dropping low scores
from a run at a lower threshold is NOT the same, because the merge has already grouped the low-scoring
fragments with their neighbours and the detector's per-tile cap counted them — measured here, it cost up
to 0.08 F1 on a fold), then scores each with every minimum area of the grid (applied afterwards, which is
exact: the minimum area is the last filter). ``--mask-thresholds`` / ``--nms-thresholds`` add the mask
probability and the box NMS IoU to the grid (without them, the checkpoint's own). The setting with the best **mean F1 over the folds** is the one
to ship in the checkpoint's inference defaults; that mean is the cross-validation estimate for the choice
(optimistic by the choice among a small grid, which the card says). Predictions are kept per setting, so a
rerun only predicts what is new. Writes ``ROOT/RECIPE/sweep_CONFIG.json`` and prints a Markdown table.

``--ensemble RECIPE2 ...`` scores, per fold, RECIPE's fold model fused per tile with the same fold's models of
the other recipes (``detector.options.ensemble``; e.g. one recipe's seeds): every member is trained without
the held-out city, so nothing is chosen on it. Results go to ``ROOT/RECIPE+RECIPE2.../``.

The best mean is optimistic by the choice itself, so the last line gives the **nested** estimate: each fold
scored at the setting with the best mean over the *other* folds (the fold never picks its own setting) — the
honest number for "choose the setting by cross-validation, then use it at a new city".
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import pandas as pd
import yaml

from geomask.evaluate import evaluate_frames

AREAS = ("area1", "area3", "area4", "area5")
MIN_AREAS = (0.0, 4.0, 10.0)


def cat(paths: list[Path]) -> gpd.GeoDataFrame:
    frames = [gpd.read_file(p, layer="instances" if p.suffix == ".gpkg" else None) for p in paths]  # our GeoPackages also hold layer_styles
    return gpd.GeoDataFrame(pd.concat([f.to_crs(frames[0].crs) for f in frames], ignore_index=True), crs=frames[0].crs)


def predict_fold(
    model: Path, area_dir: Path, out: Path, config: Path, options_set: dict[str, float], members: list[Path]
) -> gpd.GeoDataFrame:
    out.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load(config.read_text()) or {}
    options = cfg.setdefault("detector", {}).setdefault("options", {})
    options.update(options_set)
    if members:
        options["ensemble"] = [str(m.resolve()) for m in members]
    cfg.setdefault("vectorize", {})["min_area_m2"] = 0.0
    cfg_path = out / "sweep_config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    exe = Path(sys.executable).with_name("geomask")
    preds = []
    for tif in sorted(area_dir.glob("*.tif")):
        gpkg = out / f"{tif.stem}.gpkg"
        if not gpkg.exists():
            cmd = [str(exe), "-q", "predict", "--serial", "--overwrite", str(tif), "-o", str(gpkg)]
            subprocess.run([*cmd, "--weights", str(model), "-c", str(cfg_path), "--no-preview"], check=True)
        preds.append(gpkg)
    return cat(preds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--root", type=Path, default=Path("runs/cv"))
    ap.add_argument("--data", type=Path, default=Path("../shared/data/buildings_fair"))
    ap.add_argument("--config", type=Path, default=Path("configs/buildings.yaml"))
    ap.add_argument("--tta", type=int, nargs="+", default=[1])
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--mask-thresholds", type=float, nargs="+", default=[None])
    ap.add_argument("--nms-thresholds", type=float, nargs="+", default=[None])
    ap.add_argument("--folds", nargs="+", default=list(AREAS))
    ap.add_argument("--ensemble", nargs="+", default=[], metavar="RECIPE", help="Fuse with these recipes' fold models.")
    args = ap.parse_args()
    name = "+".join([args.recipe, *args.ensemble])
    results: dict[str, dict[str, float]] = {}
    for area in args.folds:
        model, *members = (args.root / r / area / "model.pt" for r in [args.recipe, *args.ensemble])
        if not all(m.is_file() for m in [model, *members]):
            print(f"{area}: a fold model is missing, skipped")
            continue
        data = args.data / area
        blocks = sorted(p.stem for p in data.glob("*.tif"))
        truth = cat([data / f"{b}_labels_within.geojson" for b in blocks])
        ignore = cat([data / f"{b}_labels_edge.geojson" for b in blocks])
        for tta, t, mask, nms in itertools.product(args.tta, args.thresholds, args.mask_thresholds, args.nms_thresholds):
            opts: dict[str, float] = {"score_threshold": t, "tta": tta}
            tag, label = f"tta{tta}_score{t:g}", f"tta {tta}, score {t:g}"
            for key, short, value in (("mask_threshold", "mask", mask), ("nms_threshold", "nms", nms)):
                if value is not None:  # named only when swept, so earlier runs' folders and keys still match
                    opts[key], tag, label = value, f"{tag}_{short}{value:g}", f"{label}, {short} {value:g}"
            pred = predict_fold(model, data, args.root / name / area / f"sweep_{args.config.stem}_{tag}", args.config, opts, members)
            for a in MIN_AREAS:
                kept = pred[pred["area_m2"] >= a]
                ev = evaluate_frames(kept, truth, ignore=ignore, iou_threshold=0.5, compute_ap=False).overall
                setting = f"{args.config.stem}, {label}, min area {a:g}"
                results.setdefault(setting, {})[area] = ev.f1 or 0.0
    folds = [a for a in args.folds if all(a in r for r in results.values())]
    rows = sorted(results.items(), key=lambda kv: -statistics.mean(kv[1][a] for a in folds))
    print("| setting | " + " | ".join(folds) + " | mean F1 |")
    print("| --- |" + " ---: |" * (len(folds) + 1))
    for setting, f1 in rows[:12]:
        print(f"| {setting} | " + " | ".join(f"{f1[a]:.3f}" for a in folds) + f" | {statistics.mean(f1[a] for a in folds):.3f} |")
    if len(folds) > 1:
        print(nested(results, folds))
    path = args.root / name / f"sweep_{args.config.stem}.json"
    merged: dict[str, dict[str, float]] = json.loads(path.read_text())["f1"] if path.is_file() else {}
    for setting, per_fold in results.items():  # a run over some folds keeps the other folds' scores
        merged.setdefault(setting, {}).update(per_fold)
    path.write_text(json.dumps({"folds": sorted({f for r in merged.values() for f in r}), "f1": merged}, indent=2))


def nested(results: dict[str, dict[str, float]], folds: list[str]) -> str:
    """Each fold scored at the setting with the best mean F1 over the other folds, as one Markdown row."""
    cells, f1s = [], []
    for fold in folds:
        others = [f for f in folds if f != fold]
        chosen = max(results, key=lambda s: statistics.mean(results[s][f] for f in others))
        f1s.append(results[chosen][fold])
        cells.append(f"{results[chosen][fold]:.3f} ({chosen.split(', ', 1)[1]})")
    return "| nested: each fold at the setting best on the others | " + " | ".join(cells) + f" | {statistics.mean(f1s):.3f} |"


if __name__ == "__main__":
    main()
