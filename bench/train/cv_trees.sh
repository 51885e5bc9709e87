#!/usr/bin/env bash
# Leave-one-site-out cross-validation of a tree-crown training recipe (issue 12's protocol) over the three
# NEON sites. For each held-out site: fine-tune from the bundled buildings model on the other two sites'
# plots with the recipe (fixed schedule, --keep last: no checkpoint is picked on the held-out site), choose
# the score threshold by box F1 on the TRAINING plots (bench/train/eval_trees.py --sweep), then score the
# held-out site's plots the way a user would (`geomask predict -c configs/trees.yaml` with that threshold).
# The 8 under-annotated plots (data README) are used for nothing.
# Usage: RECIPE=name [FOLDS="TEAK SJER HARV"] [ITERATIONS=600] bench/train/cv_trees.sh [extra train args]
# Results: runs/cv_trees/$RECIPE/$SITE/{model.pt,train.log,threshold,scores.json,held_sweep.json}; summary:
# python bench/train/cv_summary.py --trees $RECIPE
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data/trees_neon}
RECIPE=${RECIPE:?name the recipe, e.g. RECIPE=base}
FOLDS=${FOLDS:-TEAK SJER HARV}
SKIP="HARV_022 HARV_024 HARV_036 HARV_040 HARV_042 TEAK_045 TEAK_054 TEAK_060"
SWEEP="0.3 0.4 0.5 0.6 0.7 0.8 0.9"
PY=.venv/bin/python
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
for hold in $FOLDS; do
  out=runs/cv_trees/$RECIPE/$hold
  mkdir -p "$out"
  if [ -f "$out/held_sweep.json" ]; then echo "$hold: done"; continue; fi
  train=() held=() train_args=() val_args=()
  for tif in "$DATA"/plots/*.tif; do
    plot=$(basename "$tif" .tif)
    case " $SKIP " in *" $plot "*) continue ;; esac
    if [ "${plot%%_*}" = "$hold" ]; then held+=("$plot"); val_args+=(--val-images "$tif")
    else train+=("$plot"); train_args+=(--images "$tif"); fi
  done
  if [ ! -f "$out/trained" ]; then
    resume=(); [ -f "$out/model.pt.last.pt" ] && resume=(--resume)
    .venv/bin/geomask train "${train_args[@]}" "${val_args[@]}" \
      --labels "$DATA/labels_geojson/*.geojson" --boxes --classes tree -o "$out/model.pt" \
      --arch resnet18_fpn --gsd 0.1 --chip-size 256 --batch-size 4 --lr 1e-3 \
      --init geomask/models/buildings_r18.pt \
      --iterations "${ITERATIONS:-600}" --val-every "${ITERATIONS:-600}" --threads 2 --device cpu --seed 0 \
      --keep last "${resume[@]}" "$@" >>"$out/train.log" 2>&1
    touch "$out/trained"
  fi
  # The score threshold, chosen on the training plots only.
  $PY bench/train/eval_trees.py "$out/model.pt" --config configs/trees.yaml --score-floor 0.3 --sweep $SWEEP \
    --plots "${train[@]}" --out "$out/pred_train" --json "$out/train_sweep.json" >"$out/train_sweep.log" 2>&1
  best=$($PY -c "import json,sys; s=json.load(open(sys.argv[1]))['sweep']; print(max(s, key=lambda t: (s[t], -float(t))))" "$out/train_sweep.json")
  echo "$best" >"$out/threshold"
  sed "s/^\(    score_threshold:\) [0-9.]*/\1 $best/" configs/trees.yaml >"$out/config.yaml"
  $PY bench/train/eval_trees.py "$out/model.pt" --config "$out/config.yaml" --plots "${held[@]}" \
    --out "$out/pred_held" --json "$out/scores.json" >"$out/eval.log" 2>&1
  echo "$hold: threshold $best; $(tail -1 "$out/eval.log")"
  # F1 at every swept threshold on the held-out site, for choosing the threshold by cross-validation over
  # sites (bench/train/cv_summary.py --trees: each fold's threshold comes from the other folds' sweeps).
  $PY bench/train/eval_trees.py "$out/model.pt" --config configs/trees.yaml --score-floor 0.3 --sweep $SWEEP \
    --plots "${held[@]}" --out "$out/pred_held_sweep" --json "$out/held_sweep.json" >"$out/held_sweep.log" 2>&1
done
