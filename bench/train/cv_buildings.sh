#!/usr/bin/env bash
# Leave-one-city-out cross-validation of a buildings training recipe (issue 12's protocol).
# For each held-out city: train on the other three with the recipe (fixed schedule, --keep last, so no
# checkpoint is picked on the held-out city), then score the held-out city the way a user would
# (bench/train/eval_buildings.sh: `geomask predict` on the full GeoTIFFs + `geomask evaluate`).
# Usage: RECIPE=name [FOLDS="area5 area1 area3 area4"] [ITERATIONS=400] [SEED=0] bench/train/cv_buildings.sh [extra train args]
# EVAL_CONFIG=bench/train/eval_shipped.yaml scores each fold with the shipped model's NMS and minimum area (without it:
# the fold checkpoint's own defaults, as every row before 2026-12-04 was scored).
# (extra args come last, so they override the fixed ones: e.g. --arch resnet18_gn_fpn, --batch-size 8)
# Results: runs/cv/$RECIPE/$AREA/{model.pt,train.log,eval/scores.json}; summary: bench/train/cv_summary.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data/buildings_fair}
RECIPE=${RECIPE:?name the recipe, e.g. RECIPE=base}
FOLDS=${FOLDS:-area5 area1 area3 area4}
ALL="area1 area3 area4 area5"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
for hold in $FOLDS; do
  out=runs/cv/$RECIPE/$hold
  mkdir -p "$out"
  if [ -f "$out/eval/scores.json" ]; then echo "$hold: done"; continue; fi
  imgs=()
  for a in $ALL; do [ "$a" = "$hold" ] || imgs+=(--images "$DATA/$a/*.tif"); done
  if [ ! -f "$out/trained" ]; then
    resume=(); [ -f "$out/model.pt.last.pt" ] && resume=(--resume)
    .venv/bin/geomask train "${imgs[@]}" --labels "$DATA/*/labels_osm_buildings.geojson" \
      --val-images "$DATA/$hold/*.tif" -o "$out/model.pt" \
      --arch resnet18_fpn --gsd 0.3 --chip-size 256 --batch-size 4 --lr 1e-3 \
      --iterations "${ITERATIONS:-400}" --val-every "${ITERATIONS:-400}" --threads 2 --device cpu --seed "${SEED:-0}" \
      --keep last "${resume[@]}" "$@" >>"$out/train.log" 2>&1
    touch "$out/trained"
  fi
  CONFIG=${EVAL_CONFIG:-} AREA=$hold OUT=$out/eval bench/train/eval_buildings.sh "$out/model.pt" >"$out/eval.log" 2>&1
  echo "$hold: $(tail -3 "$out/eval.log" | tr '\n' ' ')"
done
