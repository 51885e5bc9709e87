"""Summarise a cross-validation run: F1 per held-out fold, mean, spread.

Usage: python bench/train/cv_summary.py RECIPE [RECIPE ...] [--root runs/cv]           (buildings)
       python bench/train/cv_summary.py --trees RECIPE [RECIPE ...] [--root runs/cv_trees]

Buildings (``bench/train/cv_buildings.sh``, leave one city out): reads ``ROOT/RECIPE/AREA/eval/scores.json``
(``geomask evaluate --json``). Trees (``bench/train/cv_trees.sh``, leave one NEON site out): reads
``ROOT/RECIPE/SITE/scores.json`` (``bench/train/eval_trees.py --json``, box IoU) and the score threshold
the fold chose on its training plots. Prints a Markdown table: one row per recipe, one column per held-out
fold, then the mean and the spread (max − min) over the folds that finished. A fold without scores is shown
as "–" and left out of the mean, and the row says how many folds it averages.

Trees, when every fold also has ``held_sweep.json`` (its held-out site scored at each swept threshold): a
second table chooses the score threshold by cross-validation over sites — fold s is scored at the
threshold with the best mean F1 over the *other* folds' held-out sites (nested: s never picks its own
threshold) — and the last line gives the threshold with the best mean over all folds, the one to ship.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

AREAS = ("area1", "area3", "area4", "area5")
SITES = ("HARV", "SJER", "TEAK")


def fold_scores(root: Path, recipe: str, fold: str, trees: bool) -> tuple[dict[str, float], str] | None:
    """The fold's overall counts and scores, and a note (the chosen threshold for trees), or None."""
    path = root / recipe / fold / ("scores.json" if trees else "eval/scores.json")
    if not path.is_file():
        return None
    scores = json.loads(path.read_text())
    if not trees:
        return scores["overall"], ""
    threshold = root / recipe / fold / "threshold"
    return scores["all"], f", t {threshold.read_text().strip()}" if threshold.is_file() else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="+")
    ap.add_argument("--trees", action="store_true", help="Leave-one-site-out tree runs (box F1).")
    ap.add_argument("--root", type=Path)
    args = ap.parse_args()
    folds = SITES if args.trees else AREAS
    root = args.root or Path("runs/cv_trees" if args.trees else "runs/cv")
    print("| recipe | " + " | ".join(f"{f} F1 (P / R)" for f in folds) + " | mean F1 | spread | folds |")
    print("| --- |" + " ---: |" * (len(folds) + 3))
    for recipe in args.recipes:
        cells, f1s = [], []
        for fold in folds:
            found = fold_scores(root, recipe, fold, args.trees)
            if found is None:
                cells.append("–")
                continue
            o, note = found
            f1s.append(float(o["f1"] or 0.0))
            cells.append(f"{o['f1'] or 0:.3f} ({o['precision'] or 0:.2f} / {o['recall'] or 0:.2f}{note})")
        mean = f"{statistics.mean(f1s):.3f}" if f1s else "–"
        spread = f"{max(f1s) - min(f1s):.3f}" if len(f1s) > 1 else "–"
        print(f"| {recipe} | " + " | ".join(cells) + f" | {mean} | {spread} | {len(f1s)} of {len(folds)} |")
    if args.trees:
        for recipe in args.recipes:
            nested_thresholds(root, recipe)


def _prf(c: dict[str, int]) -> tuple[float, float, float]:
    p = c["tp"] / c["n_pred"] if c["n_pred"] else 0.0
    r = c["tp"] / c["n_truth"] if c["n_truth"] else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def best_threshold(sweeps: list[dict[str, dict[str, int]]]) -> str:
    """The swept threshold with the best mean F1 over these sites (ties: the lower threshold)."""
    return max(sweeps[0], key=lambda t: (statistics.mean(_prf(s[t])[2] for s in sweeps), -float(t)))


def nested_thresholds(root: Path, recipe: str) -> None:
    """Print each fold scored at the threshold the other folds' held-out sweeps choose (see module doc)."""
    paths = {site: root / recipe / site / "held_sweep.json" for site in SITES}
    if not all(p.is_file() for p in paths.values()):
        return
    sweeps = {site: json.loads(p.read_text())["sweep_counts"] for site, p in paths.items()}
    print(f"\n{recipe}, score threshold chosen on the other sites' held-out sweeps:\n")
    print("| recipe | " + " | ".join(f"{s} F1 (P / R, t)" for s in SITES) + " | mean F1 | spread |")
    print("| --- |" + " ---: |" * (len(SITES) + 2))
    cells, f1s = [], []
    for site in SITES:
        t = best_threshold([sweeps[o] for o in SITES if o != site])
        p, r, f1 = _prf(sweeps[site][t])
        f1s.append(f1)
        cells.append(f"{f1:.3f} ({p:.2f} / {r:.2f}, t {t})")
    print(f"| {recipe} | " + " | ".join(cells) + f" | {statistics.mean(f1s):.3f} | {max(f1s) - min(f1s):.3f} |")
    print(f"\nthreshold for a new site (best mean F1 over all {len(SITES)} held-out sites): {best_threshold(list(sweeps.values()))}")


if __name__ == "__main__":
    main()
