"""``geomask predict`` as a user runs it: on `dask scheduler` + `dask worker` processes, and killed mid-run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_dask_support import SLOW, make_inputs, polygons, serial_polygons, write_config

pytestmark = pytest.mark.timeout(150)
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}  # workers import tests.test_dask_support


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(args: list[str], log: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=ENV, cwd=cwd, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def geomask(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "geomask"), *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A `dask scheduler` and two `dask worker` processes on 127.0.0.1; yields the scheduler address."""
    from distributed import Client

    logs = tmp_path_factory.mktemp("dask-logs")
    address = f"tcp://127.0.0.1:{_free_port()}"
    procs = [
        _start(
            [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--dashboard-address", ":0"],
            logs / "s.log",
        )
    ]
    try:
        for k in range(2):
            procs.append(
                _start([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--no-dashboard", "--name", f"w{k}"], logs / f"w{k}.log")
            )
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for proc in reversed(procs):
            _stop(proc)


def test_predict_on_an_existing_cluster(scheduler: str, tmp_path: Path) -> None:
    scenes = make_inputs(tmp_path, n=2)
    (tmp_path / "list.txt").write_text("# two scenes\nscene0.tif\n\nscene1.tif\n")
    for k, (image, labels) in enumerate(scenes):
        config = write_config(tmp_path / f"c{k}.yaml", labels)
        expected = serial_polygons(image, config, tmp_path / f"serial{k}.gpkg")
        done = geomask("predict", image.name, "-o", f"out{k}/", "-c", config, "--scheduler", scheduler, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert polygons(tmp_path / f"out{k}" / f"scene{k}.gpkg") == expected
        assert "16 tasks computed" in done.stdout
    # a list file of inputs into one file with a `source` field (scene 0's truth applied to both)
    done = geomask("predict", "list.txt", "-o", "both.gpkg", "-c", tmp_path / "c0.yaml", "--scheduler", scheduler, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert polygons(tmp_path / "both.gpkg", source="scene0.tif") == polygons(tmp_path / "serial0.gpkg")
    # a tile that fails for a data reason: output written, failure reported, exit code 3
    flag = tmp_path / "broken"
    flag.mkdir()
    bad = write_config(tmp_path / "bad.yaml", scenes[0][1], SLOW, fail_tiles=[24], fail_while=str(flag))
    done = geomask("predict", "scene0.tif", "-o", "bad.gpkg", "-c", bad, "--scheduler", scheduler, "--run-dir", "runs/bad", cwd=tmp_path)
    assert done.returncode == 3, done.stderr
    assert "1 tile(s) failed" in done.stderr and "runs/bad/failures.jsonl" in done.stderr
    assert json.loads((tmp_path / "runs/bad/failures.jsonl").read_text())["tile"] == 24


def test_killed_job_resumes_from_its_run_dir(tmp_path: Path) -> None:
    ((image, labels),) = make_inputs(tmp_path)
    config = write_config(tmp_path / "slow.yaml", labels, SLOW, delay_s=0.15)
    expected = serial_polygons(image, write_config(tmp_path / "truth.yaml", labels), tmp_path / "serial.gpkg")
    args = ["predict", image.name, "-o", "out.gpkg", "-c", config, "--workers", "2", "--run-dir", "run"]
    job = _start([str(BIN / "geomask"), *map(str, args)], tmp_path / "killed.log", cwd=tmp_path)
    results = tmp_path / "run" / "results" / "00000"
    try:
        deadline = time.monotonic() + 90
        while len(list(results.glob("L0-*.npz"))) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the driver, the local scheduler and its workers, mid-run
        job.wait(10)
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in results.glob("L0-*.npz")}
    assert 4 <= len(finished) < 16, (tmp_path / "killed.log").read_text()[-2000:]
    assert not (tmp_path / "out.gpkg").exists()

    done = geomask(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["tasks_computed"] == 16 - len(finished)
    assert summary["tasks_loaded"] == len(finished)
    assert {p: (Path(results / p).stat().st_ino, Path(results / p).stat().st_mtime_ns) for p in finished} == finished
    assert polygons(tmp_path / "out.gpkg") == expected

    changed = geomask(*args, "--overlap", "40", cwd=tmp_path)
    assert changed.returncode == 2
    assert "geomask: error: run dir run was made with another config" in changed.stderr
    assert "--fresh" in changed.stderr
    fresh = geomask(*args, "--overlap", "40", "--fresh", cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["tasks_computed"] == 16
