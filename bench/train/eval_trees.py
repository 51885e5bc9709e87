"""Score a tree-crown model on held-out NEON plots the way users would, with box IoU.

Usage: python bench/train/eval_trees.py MODEL.pt [--config configs/trees.yaml] [--out runs/eval_trees]
                                        [--plots HARV_026 ... | --plots train] [--json scores.json]
                                        [--sweep 0.3 0.4 ... --score-floor 0.3] [--reuse]

Runs ``geomask predict --serial`` on each plot GeoTIFF, then matches predicted crowns to the hand-drawn
boxes one to one at box IoU ≥ 0.5 (``geomask.evaluate`` in box mode), per site (each site's plots share
a CRS) and over all plots (counts summed; AP is per site only). Default plots: the validation plots of
``bench/train/train_trees.sh`` (never trained on); ``--plots train`` scores the training plots instead.

``--sweep`` also prints F1 over all plots for each score threshold (predictions below it dropped; the JSON
has it under ``sweep`` and the match counts under ``sweep_counts``):
run with ``--score-floor`` (or the config's threshold) at or below the lowest value swept. Each NEON plot is one tile with
``configs/trees.yaml``, so dropping low scores afterwards equals raising ``score_threshold``. Choose a
threshold on the training plots, not on the held-out ones, to keep the held-out score honest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import pandas as pd
import yaml

from geomask.evaluate import evaluate_frames, format_scores

SKIP = ["HARV_022", "HARV_024", "HARV_036", "HARV_040", "HARV_042", "TEAK_045", "TEAK_054", "TEAK_060"]  # under-annotated
VAL = ["HARV_026", "HARV_041", "SJER_006", "SJER_012", "SJER_045", "SJER_051", "SJER_056", "SJER_061", "TEAK_046", "TEAK_051", "TEAK_057"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--data", type=Path, default=Path("../shared/data/trees_neon"))
    ap.add_argument("--config")
    ap.add_argument("--out", type=Path, default=Path("runs/eval_trees"))
    ap.add_argument("--plots", nargs="+", default=VAL)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--score-floor", type=float, help="Predict with this score threshold instead of the config's (for --sweep).")
    ap.add_argument("--reuse", action="store_true", help="Score predictions already in --out made with the same model and options.")
    ap.add_argument("--sweep", type=float, nargs="+", help="Score thresholds to report F1 for (over all plots).")
    args = ap.parse_args()
    if args.plots == ["train"]:
        args.plots = sorted(p.stem for p in (args.data / "plots").glob("*.tif") if p.stem not in VAL + SKIP)
    args.out.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).with_name("geomask")
    cfg = (yaml.safe_load(Path(args.config).read_text()) or {}) if args.config else {}
    options = cfg.setdefault("detector", {}).setdefault("options", {})
    if args.score_floor is not None:
        options["score_threshold"] = args.score_floor
        args.config = str(args.out / "eval_config.yaml")
        Path(args.config).write_text(yaml.safe_dump(cfg))
    options = {**options, "weights": args.model}  # what predict's sidecar records
    threshold = float(options.get("score_threshold", 0.5))
    by_site: dict[str, tuple[list[gpd.GeoDataFrame], list[gpd.GeoDataFrame]]] = {}
    for plot in args.plots:
        out = args.out / f"{plot}.gpkg"
        cmd = [
            str(exe),
            "-q",
            "predict",
            "--serial",
            str(args.data / "plots" / f"{plot}.tif"),
            "-o",
            str(out),
            "--weights",
            args.model,
            "--overwrite",
        ]
        if args.config:
            cmd += ["-c", args.config]
        if not (args.reuse and _made_with(out, options)):
            subprocess.run(cmd, check=True)
        truth = gpd.read_file(args.data / "labels_geojson" / f"{plot}.geojson")
        pred = gpd.read_file(out).to_crs(truth.crs)
        preds, truths = by_site.setdefault(plot.split("_")[0], ([], []))
        preds.append(pred)
        truths.append(truth[["geometry"]])
    sites = {site: (_concat(preds), _concat(truths)) for site, (preds, truths) in sorted(by_site.items())}
    results = {}
    total = {"n_truth": 0, "n_pred": 0, "tp": 0}
    rows = []
    for site, (pred, truth) in sites.items():
        ev = evaluate_frames(pred, truth, box=True, iou_threshold=0.5)
        row = dataclasses.replace(ev.overall, name=site)
        rows.append(row)
        results[site] = {k: getattr(row, k) for k in ("n_truth", "n_pred", "tp", "precision", "recall", "f1", "ap", "ap50")}
        for k in total:
            total[k] += getattr(row, k)
    p = total["tp"] / total["n_pred"] if total["n_pred"] else 0.0
    r = total["tp"] / total["n_truth"] if total["n_truth"] else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    results["all"] = {
        **total,
        "fp": total["n_pred"] - total["tp"],
        "fn": total["n_truth"] - total["tp"],
        "precision": p,
        "recall": r,
        "f1": f1,
    }
    results["plots"] = args.plots
    print("box IoU >= 0.5, one-to-one")
    print(format_scores(rows))
    print(f"all plots: truth {total['n_truth']}, pred {total['n_pred']}, TP {total['tp']}, precision {p:.3f}, recall {r:.3f}, F1 {f1:.3f}")
    if args.sweep:
        if min(args.sweep) < threshold:
            print(f"warning: predictions stop at score {threshold}; sweep values below it all score as {threshold} (use --score-floor)")
        results["sweep_counts"] = sweep(sites, args.sweep)
        results["sweep"] = {t: 2 * c["tp"] / max(1, c["n_pred"] + c["n_truth"]) for t, c in results["sweep_counts"].items()}
        print("score threshold sweep (all plots): " + ", ".join(f"{t}: F1 {f:.3f}" for t, f in results["sweep"].items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def _made_with(out: Path, options: dict[str, object]) -> bool:
    """True when ``out`` exists and its predict sidecar records these detector options (same weights)."""
    sidecar = out.with_name(out.name + ".config.yaml")
    if not (out.exists() and sidecar.exists()):
        return False
    recorded = dict(yaml.safe_load(sidecar.read_text())["detector"]["options"])

    def weights(value: object) -> str:
        path = Path(str(value))
        return str(path.resolve()) if path.exists() else str(value)

    return weights(recorded.pop("weights", None)) == weights(options["weights"]) and recorded == {
        k: v for k, v in options.items() if k != "weights"
    }


def _concat(frames: list[gpd.GeoDataFrame]) -> gpd.GeoDataFrame:
    """One site's plots as one frame (a site's plots share a CRS)."""
    return gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=frames[0].crs)


def sweep(sites: dict[str, tuple[gpd.GeoDataFrame, gpd.GeoDataFrame]], thresholds: list[float]) -> dict[str, dict[str, int]]:
    """Match counts over all plots (summed over sites) with predictions below each threshold dropped."""
    out = {}
    for t in thresholds:
        tp = n_pred = n_truth = 0
        for pred, truth in sites.values():
            ev = evaluate_frames(pred[pred["score"] >= t], truth, box=True, iou_threshold=0.5).overall
            tp, n_pred, n_truth = tp + ev.tp, n_pred + ev.n_pred, n_truth + ev.n_truth
        out[f"{t:g}"] = {"tp": tp, "n_pred": n_pred, "n_truth": n_truth}
    return out


if __name__ == "__main__":
    main()
