"""Print the compact seam tables of BENCHMARKS.md from ``bench/results/seams.json`` (written by seams.py).

Usage: python bench/seams_summary.py [bench/results/seams.json]

Tables: F1 (duplicates / splits) of every merge per tiling, for the exact and the noisy oracle; and the
buckets where geomask is not the best merge (all objects, and objects of 64 px or more).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

FULL = "geomask, full pipeline → GPKG"


def _rows(data: dict[str, Any], oracle: str) -> list[dict[str, Any]]:
    return [r for r in data["rows"] if r["oracle"] == oracle and r["merge"] != FULL]


def overall_table(data: dict[str, Any], oracle: str) -> list[str]:
    rows = _rows(data, oracle)
    merges = list(dict.fromkeys(r["merge"] for r in rows))
    lines = ["| tile / overlap | " + " | ".join(merges) + " |", "| --- |" + " --: |" * len(merges)]
    by_cfg: dict[tuple[int, int], dict[str, str]] = defaultdict(dict)
    for r in rows:
        o = r["evaluation"]["overall"]
        by_cfg[(r["tile_px"], r["overlap_px"])][r["merge"]] = f"{o['f1']:.3f} ({o['duplicates']}/{o['splits']})"
    for (tile, overlap), cells in by_cfg.items():
        lines.append(f"| {tile} / {overlap} | " + " | ".join(cells.get(m, "–") for m in merges) + " |")
    return lines


def behind_table(data: dict[str, Any], oracle: str = "noisy") -> list[str]:
    lines = ["| objects | tile / overlap | bucket | geomask | best other |", "| --- | --- | --- | --: | --: |"]
    for key, label in (("evaluation", "all"), ("evaluation_objects_from_64px", "≥ 64 px")):
        table: dict[tuple[int, int, str], dict[str, float]] = defaultdict(dict)
        for r in _rows(data, oracle):
            if r.get(key) is None:
                continue
            for s in r[key]["seams"]:
                table[(r["tile_px"], r["overlap_px"], s["name"])][r["merge"]] = s["f1"]
        for (tile, overlap, bucket), f1 in table.items():
            best_f1, best = max((v, m) for m, v in f1.items() if m != "geomask")
            if f1["geomask"] < best_f1 - 1e-9:
                lines.append(f"| {label} | {tile} / {overlap} | {bucket} | {f1['geomask']:.3f} | {best_f1:.3f} ({best}) |")
    return lines


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results" / "seams.json"
    data = json.loads(path.read_text())
    for oracle in ("exact", "noisy"):
        print(f"### {oracle} oracle, all objects: F1 (duplicates / splits)\n")
        print("\n".join(overall_table(data, oracle)) + "\n")
    print("### noisy oracle: buckets where geomask is not the best merge\n")
    print("\n".join(behind_table(data)))


if __name__ == "__main__":
    main()
