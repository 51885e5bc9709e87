"""Worker jobs that reach their Slurm time limit mid-run: the job still finishes, with the serial output.

Slurm's shortest time limit is one minute, longer than a test may take, so this runs as a bench (about
3 minutes): a single-node Slurm from ``tests/slurm/start.sh`` (root, Debian's slurm-wlm and munge),
``geomask predict --cluster`` with 2 worker jobs of ``walltime: 00:01:00`` and a detector slow enough
(5 s per tile, 49 tiles: ~2 minutes per worker) that both jobs are stopped by the limit mid-task (Slurm
enforces it 60-90 s after the start); their replacements finish.

    nice -n 10 python bench/slurm_time_limit.py --out bench/results/slurm_time_limit.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.test_dask_support import SLOW, make_inputs, polygons, serial_polygons, write_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "slurm_time_limit.md")
    ap.add_argument("--delay", type=float, default=5.0, help="detector seconds per tile")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="geomask-slurm-bench-"))
    load = os.getloadavg()[0]  # the 2 cores are shared: slower worker starts mean more time-limit rounds
    state = work / "slurm"
    started = subprocess.run(["bash", str(REPO / "tests/slurm/start.sh"), str(state)], capture_output=True, text=True, check=False)
    if started.returncode != 0:
        sys.exit(f"no single-node Slurm: {started.stderr.strip()}")
    env = {**os.environ, "PYTHONPATH": str(REPO), "SLURM_CONF": str(state / "slurm.conf")}
    try:
        ((image, labels),) = make_inputs(work)
        expected = serial_polygons(image, write_config(work / "truth.yaml", labels), work / "serial.gpkg")
        write_config(work / "slow.yaml", labels, SLOW, delay_s=args.delay)
        opts = {"cores": 1, "processes": 1, "memory": "1GB", "walltime": "00:01:00", "log_directory": str(work / "logs")}
        (work / "cluster.yaml").write_text(yaml.safe_dump({"kind": "slurm", "jobs": 2, "wait_s": 90, "options": opts}))
        t0 = time.perf_counter()
        geomask = Path(sys.executable).parent / "geomask"
        command = [
            str(geomask),
            "predict",
            image.name,
            "-o",
            "out.gpkg",
            "-c",
            "slow.yaml",
            "--cluster",
            "cluster.yaml",
            "--run-dir",
            "run",
        ]
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600, check=False)
        wall = time.perf_counter() - t0
        equal = done.returncode == 0 and polygons(work / "out.gpkg") == expected
        ends, n_limit = [], 0
        for err in sorted((work / "logs").glob("dask-worker-*.err"), key=lambda p: int(re.findall(r"\d+", p.name)[-1])):
            text = err.read_text()
            said = re.search(r"CANCELLED AT \S+( DUE TO TIME LIMIT)?", text)
            n_limit += bool(said and said.group(1))
            ends.append(f"| {err.stem.split('-')[-1]} | {said.group(0) if said else 'ended'} | {'yes' if 'SIGTERM' in text else 'no'} |")
    finally:
        subprocess.run(["bash", str(REPO / "tests/slurm/stop.sh"), str(state)], capture_output=True, check=False)
    summary = next((line for line in done.stdout.splitlines() if " objects from " in line), done.stdout.strip()[-300:])
    text = "\n".join(
        [
            "# Slurm worker jobs stopped by their time limit mid-run",
            "",
            f"`{' '.join(['python', 'bench/slurm_time_limit.py'])}` on {platform.node()} ({os.cpu_count()} CPUs, "
            f"{platform.platform()}, load average {load:.1f} at the start), {datetime.date.today()}; slurm-wlm "
            f"{subprocess.run(['slurmd', '-V'], capture_output=True, text=True, check=False).stdout.split()[-1]}.",
            "",
            f"Detector: the truth, {args.delay} s per tile; 1500 px scene, 49 tiles of 256 px in 16 tasks; 2 worker jobs, "
            "`walltime: 00:01:00`.",
            "",
            f"- exit code {done.returncode}, wall {wall:.0f} s; output equal to `--serial`: **{equal}**",
            f"- geomask said: `{summary}`",
            "",
            "| Slurm job | how it ended | worker got SIGTERM |",
            "| --- | --- | --- |",
            *ends,
            "",
            f"{n_limit} of {len(ends)} worker jobs ended by their time limit while the job ran; their tasks were rescheduled,",
            f"geomask submitted {len(ends) - 2} replacement job(s), and cancelled those still running at the end.",
            "",
        ]
    )
    args.out.write_text(text)
    print(text)
    sys.exit(0 if equal and n_limit >= 1 and len(ends) > 2 else 1)


if __name__ == "__main__":
    main()
