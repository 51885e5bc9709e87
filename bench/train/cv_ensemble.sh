#!/usr/bin/env bash
# Score an ensemble of cross-validation runs: for each held-out city, the fold models of MEMBERS (recipes
# run by bench/train/cv_buildings.sh, e.g. one recipe with two seeds) fused per tile by `predict --ensemble`,
# scored exactly as each member was (bench/train/eval_buildings.sh). Nothing is trained or chosen here: each
# member is still trained on the other three cities only.
# Usage: NAME=ens MEMBERS="f32s0 f32s1" [FOLDS="area5 area1 area3 area4"] [TTA=1] bench/train/cv_ensemble.sh
# Results: runs/cv/$NAME/$AREA/eval/scores.json (so bench/train/cv_summary.py $NAME summarises it).
set -euo pipefail
cd "$(dirname "$0")/../.."
NAME=${NAME:?name the ensemble, e.g. NAME=ens}
read -r -a members <<<"${MEMBERS:?list the member recipes, e.g. MEMBERS=\"f32s0 f32s1\"}"
for hold in ${FOLDS:-area5 area1 area3 area4}; do
  out=runs/cv/$NAME/$hold
  if [ -f "$out/eval/scores.json" ]; then echo "$hold: done"; continue; fi
  for m in "${members[@]}"; do
    [ -f "runs/cv/$m/$hold/trained" ] || { echo "$hold: runs/cv/$m/$hold is not trained yet; skipped"; continue 2; }
  done
  mkdir -p "$out"
  {
    echo "detector:"
    echo "  options:"
    echo "    tta: ${TTA:-1}"
    echo "    ensemble:"
    for m in "${members[@]:1}"; do echo "      - $PWD/runs/cv/$m/$hold/model.pt"; done
  } >"$out/config.yaml"
  CONFIG=$out/config.yaml AREA=$hold OUT=$out/eval bench/train/eval_buildings.sh "runs/cv/${members[0]}/$hold/model.pt" >"$out/eval.log" 2>&1
  echo "$hold: $(tail -3 "$out/eval.log" | tr '\n' ' ')"
done
