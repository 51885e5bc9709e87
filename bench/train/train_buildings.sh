#!/usr/bin/env bash
# Train the bundled buildings model (resnet18_fpn, 128-ch FPN) on CPU from scratch.
# Data: ../shared/data/buildings_fair (HOT fAIr sample). area5 (Nairobi) is held out for validation.
# Outputs: runs/buildings_r18/buildings_r18.pt (best by validation F1), .last.pt (resumable), .log.jsonl.
# Add --resume to continue a stopped run (same settings; ITERATIONS/MAX_MINUTES may change).
# CPU cost per iteration is dominated by the mask head, which grows with the RoIs sampled per chip:
# batch 4 with 128 RoIs per chip makes many more optimiser steps per CPU-second than batch 8 with 256.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data/buildings_fair}
OUT=${OUT:-runs/buildings_r18}
mkdir -p "$OUT"
# Passive OpenMP waits: on a shared 2-core machine, spinning threads burn the CPU the other thread needs.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec .venv/bin/geomask train \
  --images "$DATA/area1/*.tif" --images "$DATA/area3/*.tif" --images "$DATA/area4/*.tif" \
  --labels "$DATA/*/labels_osm_buildings.geojson" \
  --val-images "$DATA/area5/*.tif" \
  -o "$OUT/buildings_r18.pt" \
  --arch resnet18_fpn --gsd 0.3 --chip-size 256 --batch-size 4 --rois-per-image 128 --lr 1e-3 \
  --iterations "${ITERATIONS:-1000}" --val-every 100 --max-minutes "${MAX_MINUTES:-100}" \
  --threads 2 --device cpu --seed 0 \
  --attribution "Imagery: OpenAerialMap contributors (CC BY 4.0). Labels: (c) OpenStreetMap contributors (ODbL 1.0). Via the HOT fAIr training sample (hotosm/fAIr-utilities)." \
  "$@"
