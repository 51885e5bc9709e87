"""A local cluster that cannot start (issue 11): one line, exit code 6, nothing written, no hang.

Each case runs the console script, so that the Dask settings come from the environment as a user's
would, and the real LocalCluster (scheduler, nannies, worker processes) fails for a real reason.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import workflows.cluster
from geomask.config import DaskConfig
from geomask.testing import write_scene
from tests.helpers import UTM, UTM_TRANSFORM
from tests.test_bad_input import assert_clean_failure, run_cli
from tests.test_cli_cluster import _free_port, _start, _stop
from workflows.exits import EXIT_CLUSTER_START

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[1]
GEOMASK = Path(sys.executable).parent / "geomask"


@pytest.fixture
def scene(tmp_path: Path) -> tuple[Path, Path]:
    labels = np.zeros((120, 120), np.int32)
    labels[20:60, 30:90] = 1
    image, label_path = write_scene(tmp_path, labels, UTM_TRANSFORM, UTM)
    cfg = tmp_path / "truth.yaml"
    cfg.write_text(yaml.safe_dump({"detector": {"factory": "geomask.testing:truth_detector", "options": {"labels": str(label_path)}}}))
    return image, cfg


def _predict(tmp_path: Path, scene: tuple[Path, Path], **env: str) -> subprocess.CompletedProcess[str]:
    args = [str(GEOMASK), "-q", "predict", str(scene[0]), "-o", str(tmp_path / "out.gpkg"), "-c", str(scene[1]), "--workers", "2"]
    return subprocess.run(
        args, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO), **env}, capture_output=True, text=True, timeout=90
    )


def _assert_one_line(done: subprocess.CompletedProcess[str], needle: str, tmp_path: Path) -> str:
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert done.returncode == EXIT_CLUSTER_START, done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("geomask: the local Dask cluster could not start"), lines[0]
    assert needle in lines[0], lines[0]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))]
    return lines[0]


def test_an_unusable_dask_temporary_directory_is_one_line(tmp_path: Path, scene: tuple[Path, Path]) -> None:
    # A file where a folder must be: refused for root too (an unwritable folder is not, when tests run as root).
    blocker = tmp_path / "scratch-is-a-file"
    blocker.write_text("")
    done = _predict(tmp_path, scene, DASK_TEMPORARY_DIRECTORY=str(blocker / "dask"))
    line = _assert_one_line(done, str(blocker / "dask"), tmp_path)
    assert "DASK_TEMPORARY_DIRECTORY" in line and "--serial" in line


def test_worker_processes_that_fail_while_starting_are_one_line_not_a_traceback_each(tmp_path: Path, scene: tuple[Path, Path]) -> None:
    # Read by each worker process only (the scheduler and the nannies start): the nanny path of a failed start.
    done = _predict(tmp_path, scene, DASK_DISTRIBUTED__WORKER__LIFETIME__DURATION="soon")
    line = _assert_one_line(done, "a worker process failed while starting", tmp_path)
    assert "Invalid time unit: soon" in line and "dask config list" in line


def test_an_unreadable_memory_limit_is_a_config_error_before_any_process_starts(
    tmp_path: Path, scene: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = yaml.safe_load(scene[1].read_text()) | {"dask": {"memory_limit": "plenty"}}
    scene[1].write_text(yaml.safe_dump(cfg))
    code, err = run_cli(["-q", "predict", str(scene[0]), "-o", str(tmp_path / "out.gpkg"), "-c", str(scene[1])], capsys)
    assert_clean_failure(code, err, "dask.memory_limit: cannot read 'plenty'", tmp_path)


def test_a_running_worker_shows_its_nanny_warnings_again() -> None:
    from workflows.cluster import connect

    with connect(DaskConfig(n_workers=1)) as client:
        levels = client.run(lambda: logging.getLogger("distributed.nanny").level)
    assert list(levels.values()) == [logging.WARNING]


def test_a_scheduler_no_worker_joins_is_one_line_not_a_silent_wait(
    tmp_path: Path, scene: tuple[Path, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker started with a wrong --listen-address never joins; the job says so instead of waiting."""
    monkeypatch.setattr(workflows.cluster, "WAIT_FOR_WORKERS_S", 5.0)
    bindir = Path(sys.executable).parent
    address = f"tcp://127.0.0.1:{_free_port()}"
    port = address.rsplit(":", 1)[1]
    scheduler = _start(
        [str(bindir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", port, "--dashboard-address", ":0"], tmp_path / "s.log"
    )
    worker = None
    try:
        # 203.0.113.1 (TEST-NET-3) is no address of this machine: the worker cannot listen and exits.
        worker_args = [str(bindir / "dask"), "worker", address, "--listen-address", "tcp://203.0.113.1:0", "--no-dashboard"]
        worker = _start(worker_args, tmp_path / "w.log")
        assert worker.wait(60) != 0
        args = ["-q", "predict", str(scene[0]), "-o", str(tmp_path / "out.gpkg"), "-c", str(scene[1]), "--scheduler", address]
        code, err = run_cli(args, capsys)
    finally:
        if worker is not None:
            _stop(worker)
        _stop(scheduler)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == EXIT_CLUSTER_START and len(lines) == 1 and "Traceback" not in err, err
    assert f"no worker joined the scheduler at {address} within 5 s" in lines[0] and "--listen-address" in lines[0]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))]
