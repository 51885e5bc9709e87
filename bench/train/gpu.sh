#!/usr/bin/env bash
# Train a buildings model on a lent GPU (the `device` tool), in one call of about 8 minutes, and bring
# the checkpoint and logs back under $OUT. Recipe: the cross-validated one from MODEL_CARD.md (copy-paste,
# photometric jitter, weight average, last weights kept), at a larger model and batch with AMP.
#
#   here:   bench/train/gpu.sh --pack            # writes .gpu/ (ignored): 0.3 m copies of the shared cities
#   there:  run(command="bash bench/train/gpu.sh", carry=[".gpu"], timeout_s=560)
#   CPU check of the whole script (no device):  DEVICE=cpu ARCH=tiny_fpn ITERATIONS=2 BATCH=2 OUT=/tmp/gpu bench/train/gpu.sh
#
# Known blocker (2026-12-01): the device takes at most 64 MiB of working tree, and the tracked files
# alone are 63.4 MiB (the two shipped 32 MB models), so neither .gpu/ nor the wheels geomask needs there
# (rasterio, shapely, pyogrio, geopandas: the device image has torch but not these) fit. See BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
[ -x .venv/bin/python ] && PY=${PY_HERE:-.venv/bin/python}
if [ "${1:-}" = "--pack" ]; then
  # 0.3 m JPEG-compressed copies: what training reads anyway (it resamples to 0.3 m), ~1/16 of the pixels.
  "$PY" - <<'PY'
import shutil
from pathlib import Path

import rasterio
from rasterio.enums import Resampling

src_root, dst_root = Path("../shared/data/buildings_fair"), Path(".gpu/data")
for tif in sorted(src_root.glob("area*/*.tif")):
    dst = dst_root / tif.parent.name / tif.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(tif) as src:
        f = 0.3 / abs(src.transform.a)
        h, w = max(1, round(src.height / f)), max(1, round(src.width / f))
        data = src.read(out_shape=(src.count, h, w), resampling=Resampling.bilinear)
        mask = src.dataset_mask(out_shape=(h, w), resampling=Resampling.nearest)
        prof = src.profile | {"height": h, "width": w, "transform": src.transform * src.transform.scale(src.width / w, src.height / h),
                              "compress": "jpeg", "jpeg_quality": 90, "photometric": "ycbcr", "tiled": True, "blockxsize": 256, "blockysize": 256}
    with rasterio.open(dst, "w", **prof) as out:
        out.write(data)
        out.write_mask(mask)
    for lab in tif.parent.glob("labels_osm_buildings.geojson"):
        shutil.copy(lab, dst.parent / lab.name)
print(sum(p.stat().st_size for p in dst_root.rglob("*") if p.is_file()) / 2**20, "MiB in", dst_root)
PY
  exit 0
fi
OUT=${OUT:?set OUT (the device sets it)}
DATA=${DATA:-.gpu/data}
DEVICE=${DEVICE:-cuda}
ARCH=${ARCH:-resnet50_fpn}
ITERATIONS=${ITERATIONS:-4000}
BATCH=${BATCH:-16}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"; } > "$OUT/device.txt"
(while sleep 5; do nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader 2>/dev/null || break; done) > "$OUT/gpu_util.csv" &
SAMPLER=$!
trap 'kill $SAMPLER 2>/dev/null || true' EXIT
amp=()
[ "$DEVICE" = "cpu" ] && amp=(-c bench/train/fp32.yaml)  # bf16 autocast is 12x slower on AVX2-only CPUs
set -o pipefail
"$PY" -m workflows.cli train \
  --images "$DATA/area*/*.tif" --labels "$DATA/*/labels_osm_buildings.geojson" --val-images "$DATA/area5/*.tif" \
  -o "$OUT/model.pt" --arch "$ARCH" --gsd 0.3 --chip-size 256 --batch-size "$BATCH" --lr 1e-3 \
  --iterations "$ITERATIONS" --val-every "$(( ITERATIONS / 4 > 0 ? ITERATIONS / 4 : 1 ))" --max-minutes "${MAX_MINUTES:-7}" \
  --device "$DEVICE" --seed 0 --ema 0.998 --keep last --copy-paste 0.5 --hue-jitter 0.05 --saturation-jitter 0.3 \
  --blur 0.2 --noise 0.02 --jpeg 0.2 "${amp[@]}" --overwrite 2>&1 | tee "$OUT/train.log"
rm -f "$OUT/model.pt.last.pt"  # the resumable state is large; the model and its log are what come back
ls -la "$OUT"
