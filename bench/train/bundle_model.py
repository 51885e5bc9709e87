"""Write the bundled model: float16, no optimizer state, held-out scores stored in its metadata.

Usage: .venv/bin/python bench/train/bundle_model.py CHECKPOINT [--scores runs/eval_area5/scores.json]
       [-o geomask/models/buildings_r18.pt]

Training-time chip metrics are kept only when they were measured at the checkpoint's own iteration.
``--scores`` is the JSON written by ``geomask evaluate --json`` (bench/train/eval_buildings.sh) or by
bench/train/eval_trees.py --json; its overall precision/recall/F1/AP are stored as ``heldout_*`` metrics beside the training-time chip metrics.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from geomask.detect.checkpoint import export_half, load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--scores", help="geomask evaluate --json (or eval_trees.py --json) output for the held-out data")
    parser.add_argument("-o", "--output", default="geomask/models/buildings_r18.pt")
    args = parser.parse_args()
    meta = load_checkpoint(args.checkpoint).meta
    metrics = dict(meta.metrics) if meta is not None else {}
    if meta is not None and metrics.get("iteration") != meta.training.get("iterations"):
        metrics = {}  # chip metrics of another iteration (older .last.pt files stored the best model's): drop them
    if args.scores:
        scores = json.loads(Path(args.scores).read_text())
        overall = scores["overall"] if "overall" in scores else scores["all"]  # geomask evaluate / eval_trees.py
        for key in ("precision", "recall", "f1", "ap", "ap50", "ap75"):
            if overall.get(key) is not None:
                metrics[f"heldout_{key}"] = float(overall[key])
        for key in ("n_truth", "n_pred", "tp", "fp", "fn"):
            metrics[f"heldout_{key}"] = float(overall[key])
    out = export_half(args.checkpoint, args.output, metrics)
    print(f"{out}: {out.stat().st_size / 1e6:.1f} MB, metrics {metrics}")


if __name__ == "__main__":
    main()
