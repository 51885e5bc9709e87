"""Where a buildings fold model's errors are: missed, partly found, merged clusters, or no labelled building at all.

Usage: python bench/train/error_breakdown.py runs/cv/RECIPE/AREA/eval [...]

Reads the ``truth.gpkg`` and ``pred.gpkg`` that ``bench/train/eval_buildings.sh`` leaves in each eval folder and
prints, per folder, one Markdown row: for the labelled buildings, how many are matched (a prediction with IoU ≥ 0.5),
partly found (predictions cover ≥ 30 % of it, none at IoU 0.5) or missed (< 30 % covered); for the predictions,
how many touch no labelled building, one, or several (a blob over a cluster of small houses); and the median
ground area of labels and predictions (m², in the area's UTM zone). Block-edge labels are not in ``truth.gpkg``,
so a prediction on a building cut by the block edge counts as touching none. OpenStreetMap does not map every
building, so "touches none" is an upper bound on false positives. The IoU ≥ 0.5 count is a per-building
criterion, not ``geomask evaluate``'s one-to-one matching, so it can differ from its TP by a few.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import geopandas as gpd
import numpy as np


def breakdown(folder: Path) -> str:
    truth = gpd.read_file(folder / "truth.gpkg")
    utm = truth.estimate_utm_crs()
    truth = truth.to_crs(utm)
    truth["geometry"] = truth.geometry.make_valid()
    pred = gpd.read_file(folder / "pred.gpkg").to_crs(utm)
    matched = partial = missed = 0
    for building in truth.geometry:
        hits = pred.geometry[pred.intersects(building)]
        best = max((building.intersection(h).area / building.union(h).area for h in hits), default=0.0)
        covered = building.intersection(hits.union_all()).area / building.area if len(hits) else 0.0
        if best >= 0.5:
            matched += 1
        elif covered >= 0.3:
            partial += 1
        else:
            missed += 1
    touched = np.array([int(truth.intersects(g).sum()) for g in pred.geometry], dtype=int)
    none, one, several = int((touched == 0).sum()), int((touched == 1).sum()), int((touched >= 2).sum())
    return (
        f"| {folder} | {len(truth)} | {matched} / {partial} / {missed} | {len(pred)} | {none} / {one} / {several} | "
        f"{truth.area.median():.0f} | {pred.area.median():.0f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    args = ap.parse_args()
    print(
        "| eval | labels | matched / partly found / missed | predictions | touching 0 / 1 / ≥2 labels | label m² (median) | prediction m² (median) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for folder in args.folders:
        print(breakdown(folder))


if __name__ == "__main__":
    main()
