"""What the torch-free install saves: install size and time, cold start to the first tile, RSS per worker.

Usage: python bench/torch_free.py [--work DIR] [--image examples/sample_nairobi.tif] [--reuse]

Builds two fresh virtual environments from this checkout, the way the README says to install them:

- ``full``: ``pip install .`` (torch, torchvision and the rest of the core dependencies);
- ``onnx``: ``pip install --no-deps . && pip install -r requirements/onnx-runtime.txt`` (no torch at all).

Each install is timed (wall, with pip's cache as this machine has it) and measured (``du`` of the
environment). The bundled buildings model is exported to ONNX with the full environment. Then, in each
environment, in fresh processes:

- *cold start to first tile*: a child interpreter that imports geomask, builds the detector and runs it on
  the first 256-px tile of the image; the child's wall time from its start, and its peak RSS;
- *predict*: ``geomask predict --serial`` on the image (wall, peak RSS of the one process), and
  ``geomask predict --workers 1`` (the peak RSS of the Dask worker process, sampled every 0.2 s with psutil).

The full environment runs the torch detector with the ONNX graph's settings (``tta: 1``) and, for
reference, the ONNX file too (onnxruntime is installed into it for that). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]

FIRST_TILE = r"""
import time, sys
t0 = time.perf_counter()
import numpy as np, rasterio
from rasterio.windows import Window
from geomask.detect.base import TileImage, load_detector
from geomask.tiling import Tile
det = load_detector("geomask.detect.maskrcnn:build", json.loads(json_options))
with rasterio.open(image) as src:
    data = src.read(window=Window(0, 0, 1024, 1024), out_shape=(3, 256, 256)).astype(np.float32) / 255
win = Window(0, 0, 256, 256)
found = det.detect([TileImage(Tile(0, 0, 0, win, win, None), data, np.ones((256, 256), bool))])
import resource
print(json.dumps({"s": time.perf_counter() - t0, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "n": len(found[0]), "torch": "torch" in sys.modules}))
"""


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True)


def install(venv: Path, torch_free: bool) -> dict[str, float]:
    if venv.exists():
        shutil.rmtree(venv)
    t0 = time.perf_counter()
    run([sys.executable, "-m", "venv", str(venv)])
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    if torch_free:
        run([*pip, "--no-deps", str(ROOT)])
        run([*pip, "-r", str(ROOT / "requirements" / "onnx-runtime.txt")])
    else:
        run([*pip, str(ROOT)])
    seconds = time.perf_counter() - t0
    mb = int(subprocess.run(["du", "-sm", str(venv)], capture_output=True, text=True, check=True).stdout.split()[0])
    return {"install_s": seconds, "size_mb": mb}


def first_tile(venv: Path, options: dict[str, object], image: Path) -> dict[str, float]:
    code = f"import json\njson_options = {json.dumps(options)!r}\nimage = {str(image)!r}\n" + FIRST_TILE
    wall0 = time.perf_counter()
    done = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True, cwd="/")
    out: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - wall0
    return out


def predict(venv: Path, args: list[str], out: Path, workers: bool) -> dict[str, float]:
    cmd = [str(venv / "bin" / "geomask"), "-q", "predict", *args, "-o", str(out), "--overwrite", "--no-preview"]
    cmd += ["--workers", "1"] if workers else ["--serial"]
    t0 = time.perf_counter()
    proc = psutil.Popen(cmd, cwd="/")
    peak_main = peak_child = 0
    while proc.poll() is None:
        try:
            peak_main = max(peak_main, proc.memory_info().rss)
            for child in proc.children(recursive=True):  # --workers 1: the nanny and its worker (--serial: none)
                peak_child = max(peak_child, child.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.2)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with {proc.returncode}")
    return {"wall_s": time.perf_counter() - t0, "main_rss_mb": peak_main / 2**20, "worker_rss_mb": peak_child / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "geomask-torch-free")
    ap.add_argument("--image", type=Path, default=ROOT / "examples" / "sample_nairobi.tif")
    ap.add_argument("--reuse", action="store_true", help="Keep environments that exist (skips the install figures).")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    image = args.image.resolve()
    envs = {"full": args.work / "full", "onnx": args.work / "onnx"}
    installs = {}
    for name, venv in envs.items():
        if args.reuse and (venv / "bin" / "geomask").exists():
            continue
        installs[name] = install(venv, torch_free=name == "onnx")
    if subprocess.run([str(envs["onnx"] / "bin" / "python"), "-c", "import torch"], capture_output=True).returncode == 0:
        raise SystemExit("the torch-free environment can import torch")
    onnx_file = args.work / "buildings.onnx"
    full = envs["full"]
    subprocess.run([str(full / "bin" / "python"), "-m", "pip", "install", "-q", "onnx", "onnxruntime"], check=True)
    run([str(full / "bin" / "geomask"), "-q", "export-model", "buildings", "-o", str(onnx_file), "--overwrite"])
    tta1 = args.work / "tta1.yaml"
    tta1.write_text("detector:\n  options:\n    tta: 1\n")
    rows = {
        "torch-free, ONNX weights": (envs["onnx"], {"weights": str(onnx_file), "device": "cpu"}, ["--weights", str(onnx_file)]),
        "full, ONNX weights": (full, {"weights": str(onnx_file), "device": "cpu"}, ["--weights", str(onnx_file)]),
        "full, torch weights (tta 1)": (full, {"weights": "buildings", "device": "cpu", "tta": 1}, ["-c", str(tta1)]),
    }
    results = {}
    for label, (venv, options, extra) in rows.items():
        first = first_tile(venv, options, image)
        serial = predict(venv, [str(image), *extra], args.work / "serial.gpkg", workers=False)
        dask = predict(venv, [str(image), *extra], args.work / "dask.gpkg", workers=True)
        results[label] = {"first_tile": first, "serial": serial, "dask": dask}
        print(label, json.dumps(results[label]), flush=True)
    print(f"\n{platform.processor() or platform.machine()}, {psutil.cpu_count()} CPUs; image {image.name}\n")
    for name, fig in installs.items():
        print(f"install {name}: {fig['install_s']:.0f} s, {fig['size_mb']} MB")
    print(
        "\n| environment, weights | first tile from process start (s) | its peak RSS (MB) | predict --serial (s) | its peak RSS (MB) | predict --workers 1: worker peak RSS (MB) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, r in results.items():
        f, s, d = r["first_tile"], r["serial"], r["dask"]
        print(f"| {label} | {f['s']:.2f} | {f['rss_mb']:.0f} | {s['wall_s']:.1f} | {s['main_rss_mb']:.0f} | {d['worker_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
