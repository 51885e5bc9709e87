#!/usr/bin/env bash
# Train a tree-crown model (resnet18_fpn) on CPU, starting from the bundled buildings model's weights
# (an aerial-imagery backbone: no ImageNet/COCO weights can be downloaded on the build machine).
# Data: ../shared/data/trees_neon (NEON AOP 10 cm RGB plots, hand-drawn crown boxes, 3 sites).
# Box-only labels: trained on the ellipse inscribed in each box (--boxes, geomask/labels.py).
# Split by plot (whole 40 m plots held out, per site, not random chips): VAL below.
# The 8 plots the data README calls under-annotated are left out of training and validation:
# their unlabelled crowns would teach the model that crowns are background.
# Outputs: runs/trees_r18/trees_r18.pt (best by validation F1), .last.pt (resumable), .log.jsonl.
# The shipped model took three steps (MODEL_CARD_trees.md):
#   bench/train/train_trees.sh                                             # iterations 0-1000
#   ITERATIONS=2000 MAX_MINUTES=40 bench/train/train_trees.sh --resume     # to 2000
#   OUT=runs/trees_ft INIT=runs/trees_r18/trees_r18.pt.last.pt ITERATIONS=1500 MAX_MINUTES=95 \
#     bench/train/train_trees.sh --lr 3e-4 --ema 0.998 --keep last --seed 2  # fine-tune, weight average, final weights
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data/trees_neon}
OUT=${OUT:-runs/trees_r18}
mkdir -p "$OUT"
VAL="HARV_026 HARV_041 SJER_006 SJER_012 SJER_045 SJER_051 SJER_056 SJER_061 TEAK_046 TEAK_051 TEAK_057"
SKIP="HARV_022 HARV_024 HARV_036 HARV_040 HARV_042 TEAK_045 TEAK_054 TEAK_060"
TRAIN_ARGS=() VAL_ARGS=()
for tif in "$DATA"/plots/*.tif; do
  plot=$(basename "$tif" .tif)
  case " $SKIP " in *" $plot "*) continue ;; esac
  case " $VAL " in *" $plot "*) VAL_ARGS+=(--val-images "$tif") ;; *) TRAIN_ARGS+=(--images "$tif") ;; esac
done
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec .venv/bin/geomask train "${TRAIN_ARGS[@]}" "${VAL_ARGS[@]}" \
  --labels "$DATA/labels_geojson/*.geojson" --boxes --classes tree \
  -o "$OUT/trees_r18.pt" \
  --arch resnet18_fpn --gsd 0.1 --chip-size 256 --batch-size 4 --rois-per-image 128 --lr 1e-3 \
  --init "${INIT:-geomask/models/buildings_r18.pt}" \
  --iterations "${ITERATIONS:-1000}" --val-every 100 --max-minutes "${MAX_MINUTES:-70}" \
  --threads 2 --device cpu --seed 0 \
  --attribution "Imagery: NEON Airborne Observation Platform (NEON open data). Crown boxes: weecology/DeepForest repository (MIT), 2018 data folders." \
  "$@"
