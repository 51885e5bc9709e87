#!/usr/bin/env bash
# Pipeline throughput on one GPU, end to end against model-only, in one call of about 8 minutes, with
# every figure written under $OUT: bench/pipeline_overhead.py --device cuda --dask (read, normalise,
# detect with batch + AMP, merge, vectorise, write; a local Dask cluster of one worker with
# resources={"GPU": 1}), 1024-px tiles, for R50-FPN (seeded random weights, score threshold set for ~20
# instances per tile) and for the bundled model (buildings R18-FPN, 0.3 m), on a synthetic 0.3 m scene.
#
#   on a GPU machine with geomask installed:   OUT=/tmp/gpu bench/gpu.sh
#   the device tool (issue 15):                bench/gpu.sh --pack   (here: the wheels the device lacks, into .whl/)
#                                              run(command="OUT=$OUT bash bench/gpu.sh", carry=[".whl"], timeout_s=560)
#   CPU check of the whole script:             DEVICE=cpu ARCH=tiny_fpn SIDE=1024 TILE=256 OVERLAP=32 BATCH=2 REPEAT=1 \
#                                                OUT=/tmp/gpu-cpu nice -n 10 bench/gpu.sh
#
# $OUT gets: device.txt, gpu_util.csv (nvidia-smi every second, the raw trace), r50.json/.md and
# bundled.json/.md (tiles/s, km²/h at the working GSD, share of model-only throughput, mean GPU
# utilisation per path sampled through NVML), summary.md (the table for BENCHMARKS.md), gpu.log.
#
# Known blocker (2026-12-02): the device copies at most 64 MiB of working tree and the tracked files alone
# are 64.2 MiB (the two shipped 32 MB models, geomask/models/*.pt), so no call from this repository can
# start, let alone carry the wheels. The device image has torch, torchvision, numpy, scipy, pyyaml, click,
# matplotlib, pyarrow and nvidia-ml-py, but not rasterio, shapely, pyproj, pyogrio, geopandas, affine,
# dask, distributed, tornado or pydantic: `--pack` fetches those (87 MiB for CPython 3.12, measured
# 2026-12-02: rasterio 37 MiB and pyogrio 32 MiB, each with its own GDAL), more than the whole limit
# even with no model tracked. Ways out, none cheap: ship the models outside git (a release asset or Git LFS, so they are
# not tracked files), or a device image with GDAL's Python stack. BENCHMARKS.md says what ran.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
[ -x .venv/bin/python ] && PY=${PY_HERE:-.venv/bin/python}

if [ "${1:-}" = "--pack" ]; then
  # What the device image lacks (KINDS.md's package list), for its CPython 3.12 on x86-64, without dependencies.
  mkdir -p .whl
  exclude="$(git rev-parse --git-common-dir)/info/exclude"
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >>"$exclude"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    rasterio affine cligj click-plugins shapely pyproj pyogrio geopandas dask distributed tornado partd locket zict tblib \
    pydantic pydantic-core annotated-types typing-inspection
  du -sm .whl
  exit 0
fi

OUT=${OUT:?set OUT (the device sets it)}
DEVICE=${DEVICE:-cuda}
ARCH=${ARCH:-resnet50_fpn}
BUNDLED=${BUNDLED:-buildings}   # a shipped model's name; empty: skip that run
SIDE=${SIDE:-12288}             # synthetic scene side (px): 14 x 14 tiles of 1024 px at overlap 128
TILE=${TILE:-1024}
OVERLAP=${OVERLAP:-128}
BATCH=${BATCH:-8}
REPEAT=${REPEAT:-2}
mkdir -p "$OUT"
if [ -d .whl ] && ! "$PY" -c "import rasterio, distributed" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec > >(tee "$OUT/gpu.log") 2>&1

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
  nproc; } >"$OUT/device.txt"
cat "$OUT/device.txt"
SAMPLER=
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -l 1 >"$OUT/gpu_util.csv" 2>/dev/null &
  SAMPLER=$!
else
  echo "no nvidia-smi on this machine" >"$OUT/gpu_util.csv"
fi
trap '[ -n "$SAMPLER" ] && kill $SAMPLER 2>/dev/null || true' EXIT

common=(--device "$DEVICE" --synthetic-side "$SIDE" --tile "$TILE" --overlap "$OVERLAP" --batch "$BATCH" --repeat "$REPEAT" --dask)
echo "== $ARCH, random weights"
timeout "${LIMIT_A:-330}" "$PY" bench/pipeline_overhead.py "${common[@]}" --arch "$ARCH" --json "$OUT/r50.json" | tee "$OUT/r50.md"
if [ -n "$BUNDLED" ]; then
  echo "== bundled model: $BUNDLED"
  timeout "${LIMIT_B:-150}" "$PY" bench/pipeline_overhead.py "${common[@]}" --weights "$BUNDLED" --json "$OUT/bundled.json" | tee "$OUT/bundled.md"
fi

"$PY" - "$OUT" <<'PY'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
rows = ["| model | path | tiles/s | km²/h | vs model-only | GPU util (mean %) |", "| --- | --- | ---: | ---: | ---: | ---: |"]
for name in ("r50", "bundled"):
    f = out / f"{name}.json"
    if not f.exists():
        continue
    r = json.loads(f.read_text())
    label = f"{r['arch']}{'' if r['weights'] == 'random' else ' ' + r['weights']} ({r['tile_px']} px, batch {r['batch']}, {r['gsd_m']} m, {r['n_tiles']} tiles)"
    for path, p in r["paths"].items():
        util = "n/a" if p["gpu_util_mean_pct"] is None else f"{p['gpu_util_mean_pct']:.0f}"
        rows.append(f"| {label} | {path} | {p['tiles_per_s']:.2f} | {p['km2_per_h']:.1f} | {p['share_of_model_only']:.1%} | {util} |")
    device = r["device"]
head = f"# GPU pipeline throughput: {device}\n\nGoal (issue 3/15): Dask end to end ≥ 85 % of model-only tiles/s.\n\n"
(out / "summary.md").write_text(head + "\n".join(rows) + "\n")
print((out / "summary.md").read_text())
PY
