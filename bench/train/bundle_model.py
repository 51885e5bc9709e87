"""Write the bundled model: float16, no optimizer state, held-out scores stored in its metadata.

Usage: .venv/bin/python bench/train/bundle_model.py CHECKPOINT [--scores runs/eval_area5/scores.json]
       [-o geomask/models/buildings_r18.pt]

Training-time chip metrics are kept only when they were measured at the checkpoint's own iteration.
``--cv-scores`` takes one such JSON per cross-validation fold (each scored on a place its fold's model
never saw) and stores their mean precision/recall/F1 as ``cv_mean_*`` plus ``cv_folds``: the expected
accuracy on a new place of a model trained with the same recipe on all the data.
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
    parser.add_argument("--cv-scores", nargs="+", default=[], help="one scores JSON per cross-validation fold")
    args = parser.parse_args()
    meta = load_checkpoint(args.checkpoint).meta
    metrics = dict(meta.metrics) if meta is not None else {}
    if meta is not None and metrics.get("iteration") != meta.training.get("iterations"):
        metrics = {}  # chip metrics of another iteration (older .last.pt files stored the best model's): drop them
    if args.scores:
        scores = json.loads(Path(args.scores).read_text())
        overall = _overall(scores)
        for key in ("precision", "recall", "f1", "ap", "ap50", "ap75"):
            if overall.get(key) is not None:
                metrics[f"heldout_{key}"] = float(overall[key])
        for key in ("n_truth", "n_pred", "tp", "fp", "fn"):
            metrics[f"heldout_{key}"] = float(overall[key])
    folds = [_overall(json.loads(Path(p).read_text())) for p in args.cv_scores]
    if folds:
        for key in ("precision", "recall", "f1"):
            metrics[f"cv_mean_{key}"] = sum(float(f[key] or 0.0) for f in folds) / len(folds)
        metrics["cv_folds"] = float(len(folds))
    out = export_half(args.checkpoint, args.output, metrics)
    print(f"{out}: {out.stat().st_size / 1e6:.1f} MB, metrics {metrics}")


def _overall(scores: dict) -> dict:
    """The overall counts and scores of a geomask evaluate --json or eval_trees.py --json file."""
    return scores["overall"] if "overall" in scores else scores["all"]


if __name__ == "__main__":
    main()
