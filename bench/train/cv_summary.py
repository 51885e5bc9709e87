"""Summarise a leave-one-city-out cross-validation run (``bench/train/cv_buildings.sh``): F1 per fold, mean, spread.

Usage: python bench/train/cv_summary.py RECIPE [RECIPE ...] [--root runs/cv]

Reads ``ROOT/RECIPE/AREA/eval/scores.json`` (written by ``geomask evaluate --json``) and prints a
Markdown table: one row per recipe, one column per held-out city, then the mean and the spread
(max − min) over the folds that finished. A fold without scores is shown as "–" and left out of the mean,
and the row says how many folds it averages.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

AREAS = ("area1", "area3", "area4", "area5")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="+")
    ap.add_argument("--root", type=Path, default=Path("runs/cv"))
    args = ap.parse_args()
    print("| recipe | " + " | ".join(f"{a} F1 (P / R)" for a in AREAS) + " | mean F1 | spread | folds |")
    print("| --- |" + " ---: |" * (len(AREAS) + 3))
    for recipe in args.recipes:
        cells, f1s = [], []
        for area in AREAS:
            path = args.root / recipe / area / "eval" / "scores.json"
            if not path.is_file():
                cells.append("–")
                continue
            o = json.loads(path.read_text())["overall"]
            f1s.append(float(o["f1"] or 0.0))
            cells.append(f"{o['f1'] or 0:.3f} ({o['precision'] or 0:.2f} / {o['recall'] or 0:.2f})")
        mean = f"{statistics.mean(f1s):.3f}" if f1s else "–"
        spread = f"{max(f1s) - min(f1s):.3f}" if len(f1s) > 1 else "–"
        print(f"| {recipe} | " + " | ".join(cells) + f" | {mean} | {spread} | {len(f1s)} of {len(AREAS)} |")


if __name__ == "__main__":
    main()
