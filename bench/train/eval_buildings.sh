#!/usr/bin/env bash
# Score a buildings model on the held-out area (area5, Nairobi: both blocks) the way users would:
# `geomask predict` on the full GeoTIFFs (resampled on the fly to the model's GSD), then
# `geomask evaluate` against the OSM polygons inside each block, block-edge polygons ignored.
# Usage: [CONFIG=configs/buildings.yaml] bench/train/eval_buildings.sh [MODEL.pt]   (default: the bundled model)
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${1:-geomask/models/buildings_r18.pt}
DATA=${DATA:-../shared/data/buildings_fair}
AREA=${AREA:-area5}
OUT=${OUT:-runs/eval_$AREA}
EXTRA=()
if [ -n "${CONFIG:-}" ]; then EXTRA=(-c "$CONFIG"); fi
mkdir -p "$OUT"
for tif in "$DATA/$AREA"/*.tif; do
  name=$(basename "$tif" .tif)
  .venv/bin/geomask -q predict --serial --overwrite "$tif" -o "$OUT/$name.gpkg" --weights "$MODEL" "${EXTRA[@]}"
done
# One layer per role for the whole area (the blocks do not overlap), so one evaluate call scores it all.
.venv/bin/python - "$DATA/$AREA" "$OUT" <<'PY'
import sys
from pathlib import Path

import geopandas as gpd
import pandas as pd

data, out = Path(sys.argv[1]), Path(sys.argv[2])
def cat(paths):
    frames = [gpd.read_file(p) for p in paths]
    return gpd.GeoDataFrame(pd.concat([f.to_crs(frames[0].crs) for f in frames], ignore_index=True), crs=frames[0].crs)
blocks = sorted(p.stem for p in data.glob("*.tif"))
cat([out / f"{b}.gpkg" for b in blocks]).to_file(out / "pred.gpkg")
cat([data / f"{b}_labels_within.geojson" for b in blocks]).to_file(out / "truth.gpkg")
cat([data / f"{b}_labels_edge.geojson" for b in blocks]).to_file(out / "ignore.gpkg")
PY
.venv/bin/geomask evaluate "$OUT/pred.gpkg" "$OUT/truth.gpkg" --ignore "$OUT/ignore.gpkg" --iou 0.5 --json "$OUT/scores.json" --overwrite
