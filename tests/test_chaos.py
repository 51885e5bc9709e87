"""Chaos: the cluster or the job is killed, frozen or signalled mid-run, with real `dask` processes.

Each case must end in bounded time with one line on stderr and its documented exit code
(``workflows/exits.py``), write no output from unfinished work (a new output does not appear, an
existing one keeps its bytes), and leave a run folder that the same command resumes to exactly the
serial path's polygons. Scenes are tiny (3 × 3 tiles, one tile per task) so a case takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_cli_cluster import BIN, ENV, _free_port, _start, _stop, geomask
from tests.test_dask_support import SLOW, make_inputs, polygons, serial_polygons, write_config
from workflows.exits import EXIT_INTERRUPTED, EXIT_SCHEDULER_LOST, EXIT_STALLED, EXIT_TERMINATED

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]
STALL_S = 4  # the watchdog of these runs; a healthy task here takes 0.6 s
BOUND_S = 90  # how long a stopped job may take to exit (a frozen worker: the healthy one finishes its queue first, then the watchdog waits STALL_S, then the plugin unregister up to 10 s)


class Cluster:
    """A `dask scheduler` and ``n`` `dask worker` processes (each with its nanny, in its own session)."""

    def __init__(self, logs: Path, n: int):
        self.logs = logs
        self.address = f"tcp://127.0.0.1:{_free_port()}"
        port = self.address.rsplit(":", 1)[1]
        self.scheduler = _start(
            [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", port, "--dashboard-address", ":0"], logs / "s.log"
        )
        self.workers: list[subprocess.Popen[bytes]] = []
        self.add_workers(n)

    def add_workers(self, n: int) -> None:
        from distributed import Client

        for _ in range(n):
            k = len(self.workers)
            args = [str(BIN / "dask"), "worker", self.address, "--nthreads", "1", "--no-dashboard", "--name", f"w{k}"]
            self.workers.append(_start(args, self.logs / f"w{k}.log"))
        with Client(self.address, timeout="30s") as client:
            client.wait_for_workers(sum(w.poll() is None for w in self.workers), timeout=60)

    def stop(self) -> None:
        for proc in [*self.workers, self.scheduler]:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGCONT)  # a frozen worker cannot handle SIGTERM
            _stop(proc)


@pytest.fixture
def scene(tmp_path: Path) -> tuple[Path, list[tuple[object, ...]]]:
    """A 700 px scene (9 tiles), a slow truth config for it (``job.yaml``), and the serial polygons."""
    ((image, labels),) = make_inputs(tmp_path, size_px=700)
    write_config(tmp_path / "job.yaml", labels, SLOW, delay_s=0.6)
    return image, serial_polygons(image, write_config(tmp_path / "truth.yaml", labels), tmp_path / "serial.gpkg")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    logs = tmp_path / "dask-logs"
    logs.mkdir()
    c = Cluster(logs, 2)
    try:
        yield c
    finally:
        c.stop()


def _args(out: str, *extra: str) -> list[str]:
    return ["-q", "predict", "scene0.tif", "-o", out, "-c", "job.yaml", "--tiles-per-task", "1", "--run-dir", "run", *extra]


def _launch(tmp_path: Path, args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / "geomask"), *args],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for_results(tmp_path: Path, job: subprocess.Popen[str], n: int = 2) -> int:
    """Wait until the job stored ``n`` detect results (so it is mid-run), return how many there are."""
    results = tmp_path / "run" / "results" / "00000"
    deadline = time.monotonic() + 90
    while len(list(results.glob("L0-*.npz"))) < n:
        assert job.poll() is None, job.communicate()
        assert time.monotonic() < deadline, "the job stored no results"
        time.sleep(0.05)
    return len(list(results.glob("L0-*.npz")))


def _ends(job: subprocess.Popen[str], code: int) -> str:
    """Wait (bounded) for the job; check its exit code and that stderr is one line, no traceback; return it."""
    t0 = time.monotonic()
    try:
        _, err = job.communicate(timeout=BOUND_S)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        raise AssertionError(f"still running {BOUND_S} s after the fault: {job.communicate()[1][-2000:]}") from None
    lines = err.strip().splitlines()
    assert job.returncode == code, err[-3000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert time.monotonic() - t0 < BOUND_S
    return lines[0]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _resumed(tmp_path: Path, args: list[str], stored: int) -> dict[str, int]:
    """Re-run the same command; it must load what was stored and compute the rest."""
    done = geomask(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "still alive" not in done.stderr
    summary: dict[str, int] = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["tasks_loaded"] >= stored and summary["tasks_computed"] + summary["tasks_loaded"] == 9
    return summary


def test_scheduler_killed(tmp_path: Path, scene: tuple[Path, list[tuple[object, ...]]], cluster: Cluster) -> None:
    _, expected = scene
    existing = tmp_path / "serial.gpkg"  # a good earlier output at the path the job may replace
    before = _digest(existing)
    args = _args("serial.gpkg", "--overwrite", "--scheduler", cluster.address)
    job = _launch(tmp_path, args)
    stored = _wait_for_results(tmp_path, job)
    os.killpg(cluster.scheduler.pid, signal.SIGKILL)
    line = _ends(job, EXIT_SCHEDULER_LOST)
    assert line.startswith(f"geomask: lost the Dask scheduler at {cluster.address}; finished work is in run (--run-dir)"), line
    assert _digest(existing) == before
    assert not (tmp_path / "run" / "failures.jsonl").exists()  # cancelled tasks are no failed tiles
    cluster.stop()
    fresh = Cluster(tmp_path / "dask-logs", 1)
    try:
        _resumed(tmp_path, _args("serial.gpkg", "--overwrite", "--scheduler", fresh.address), stored)
    finally:
        fresh.stop()
    assert polygons(existing) == expected


def test_all_workers_killed(tmp_path: Path, scene: tuple[Path, list[tuple[object, ...]]], cluster: Cluster) -> None:
    _, expected = scene
    args = _args("out.gpkg", "--scheduler", cluster.address, "--stall-timeout", str(STALL_S))
    job = _launch(tmp_path, args)
    stored = _wait_for_results(tmp_path, job)
    for worker in cluster.workers:
        os.killpg(worker.pid, signal.SIGKILL)  # the nanny too: nothing restarts them
    line = _ends(job, EXIT_STALLED)
    assert line.startswith(f"geomask: stalled: no task finished for {STALL_S} s"), line
    assert f"no worker is connected to the scheduler at {cluster.address}" in line and "re-run" in line
    assert not (tmp_path / "out.gpkg").exists()
    cluster.add_workers(1)
    _resumed(tmp_path, args, stored)
    assert polygons(tmp_path / "out.gpkg") == expected


def test_frozen_worker(tmp_path: Path, scene: tuple[Path, list[tuple[object, ...]]], cluster: Cluster) -> None:
    _, expected = scene
    args = _args("out.gpkg", "--scheduler", cluster.address, "--stall-timeout", str(STALL_S))
    job = _launch(tmp_path, args)
    stored = _wait_for_results(tmp_path, job, n=1)
    os.killpg(cluster.workers[1].pid, signal.SIGSTOP)  # a hung node: connected, silent
    line = _ends(job, EXIT_STALLED)
    assert re.search(r"stuck tasks: \d on worker w1 \(tcp://[\d.:]+\): detect-0-L0-", line), line
    assert not (tmp_path / "out.gpkg").exists()
    os.killpg(cluster.workers[1].pid, signal.SIGCONT)
    _resumed(tmp_path, args, stored)
    assert polygons(tmp_path / "out.gpkg") == expected


@pytest.mark.parametrize(
    ("sig", "group", "code", "said"),
    [
        (signal.SIGTERM, False, EXIT_TERMINATED, "geomask: terminated (SIGTERM); finished work in --run-dir is kept"),
        (signal.SIGINT, True, EXIT_INTERRUPTED, "geomask: interrupted; finished work in --run-dir is kept"),
    ],
)
def test_signal_to_the_client(
    tmp_path: Path, scene: tuple[Path, list[tuple[object, ...]]], sig: signal.Signals, group: bool, code: int, said: str
) -> None:
    """SIGTERM to the driver (Kubernetes, Slurm) and Ctrl-C to the whole process group (a terminal), on a local cluster."""
    _, expected = scene
    args = _args("out.gpkg", "--workers", "1")
    job = _launch(tmp_path, args)
    stored = _wait_for_results(tmp_path, job)
    if group:
        os.killpg(job.pid, sig)  # the local cluster's worker processes get it too
    else:
        job.send_signal(sig)
    assert _ends(job, code).startswith(said)
    assert not (tmp_path / "out.gpkg").exists()
    _resumed(tmp_path, args, stored)
    assert polygons(tmp_path / "out.gpkg") == expected
