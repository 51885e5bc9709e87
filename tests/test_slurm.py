"""``geomask predict --cluster``: workers as jobs of a real single-node Slurm (slurmctld + slurmd on this machine).

``tests/slurm/start.sh`` starts munged, slurmctld and slurmd in a temporary folder (Debian's slurm-wlm and
munge; root). Without them the ``slurm`` tests skip, unless ``GEOMASK_REQUIRE_SLURM=1`` (set by ``.ci/run``,
which installs the packages) turns the skip into a failure. The cluster-file checks above the fixture need
no Slurm.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.test_dask_support import SLOW, make_inputs, polygons, serial_polygons, write_config

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
START, STOP = REPO / "tests" / "slurm" / "start.sh", REPO / "tests" / "slurm" / "stop.sh"
REQUIRE_SLURM = os.environ.get("GEOMASK_REQUIRE_SLURM") == "1"  # set by .ci/run, which installs slurm-wlm and munge
N_TASKS = 16  # make_inputs' 1500 px scene: 7 x 7 tiles of 256 px, 2 x 2 tiles per task


def _cluster_file(tmp_path: Path, jobs: int = 2, **options: object) -> Path:
    """A cluster file for the test Slurm: one core and one worker per job, logs under ``tmp_path/logs``."""
    path = tmp_path / "cluster.yaml"
    opts = {"cores": 1, "processes": 1, "memory": "1GB", "walltime": "00:10:00", "log_directory": str(tmp_path / "logs"), **options}
    path.write_text(yaml.safe_dump({"kind": "slurm", "jobs": jobs, "wait_s": 90, "options": opts}))
    return path


# -- the cluster file, without Slurm -------------------------------------------------------------------


def test_the_shipped_cluster_file_loads() -> None:
    from workflows.cluster import load_cluster_file

    spec = load_cluster_file(REPO / "configs" / "cluster-slurm.yaml")
    assert spec.kind == "slurm" and spec.jobs == 4
    assert spec.options["job_extra_directives"] == ["--gres=gpu:1"]


def test_geomask_adds_its_worker_arguments() -> None:
    from workflows.cluster import ClusterFile, _job_options

    spec = ClusterFile(kind="slurm", jobs=1, options={"worker_extra_args": ["--lifetime", "1h"], "cores": 2})
    gpu = _job_options(spec, gpu=True)
    assert gpu["worker_extra_args"] == ["--lifetime", "1h", "--preload", "workflows.worker_init", "--resources", "GPU=1"]
    assert gpu["cores"] == 2 and gpu["scheduler_options"] == {"dashboard_address": ":0"}
    assert "export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False" in gpu["job_script_prologue"]
    assert "--resources" not in _job_options(spec, gpu=False)["worker_extra_args"]
    mine = ClusterFile(kind="slurm", jobs=1, options={"worker_extra_args": ["--resources", "GPU=2"]})
    assert _job_options(mine, gpu=True)["worker_extra_args"].count("--resources") == 1  # the file's own slots are kept


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("kind: pbs\njobs: 2\n", "cluster file cluster.yaml: kind: Input should be 'slurm'"),
        ("kind: slurm\njobs: 0\n", "cluster file cluster.yaml: jobs: Input should be greater than or equal to 1"),
        ("kind: slurm\njobs: 2\nqueue: gpu\n", "cluster file cluster.yaml: queue: unknown key"),
        ("kind: slurm\njobs: '2'\n", "cluster file cluster.yaml: jobs: Input should be a valid integer"),
        ("- slurm\n", "cluster file cluster.yaml must hold a mapping"),
        ("kind: [slurm\n", "cluster.yaml is not valid YAML"),
    ],
)
def test_a_bad_cluster_file_is_one_line_and_exit_2(tmp_path: Path, text: str, said: str) -> None:
    ((image, labels),) = make_inputs(tmp_path, size_px=300)
    (tmp_path / "cluster.yaml").write_text(text)
    config = write_config(tmp_path / "job.yaml", labels)
    done = _geomask("predict", image.name, "-o", "out.gpkg", "-c", config, "--cluster", "cluster.yaml", "--run-dir", "run", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip()
    assert line.startswith("geomask: error: ") and len(line.splitlines()) == 1, done.stderr
    assert said in line.replace(str(tmp_path) + "/", "")
    assert not (tmp_path / "out.gpkg").exists() and not (tmp_path / "run").exists()


def test_cluster_excludes_scheduler_and_serial(tmp_path: Path) -> None:
    ((image, labels),) = make_inputs(tmp_path, size_px=300)
    config = write_config(tmp_path / "job.yaml", labels)
    cluster = _cluster_file(tmp_path)
    both = _geomask("predict", image.name, "-o", "o.gpkg", "-c", config, "--cluster", cluster, "--scheduler", "tcp://h:8786", cwd=tmp_path)
    assert both.returncode == 2 and "dask.address and dask.cluster both name a cluster" in both.stderr
    serial = _geomask("predict", image.name, "-o", "o.gpkg", "-c", config, "--cluster", cluster, "--serial", cwd=tmp_path)
    assert serial.returncode == 2 and "drop --scheduler/--cluster" in serial.stderr


def test_no_sbatch_is_one_line_and_exit_2(tmp_path: Path) -> None:
    ((image, labels),) = make_inputs(tmp_path, size_px=300)
    config = write_config(tmp_path / "job.yaml", labels)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": str(tmp_path / "empty")}  # no Slurm commands
    done = _geomask("predict", image.name, "-o", "o.gpkg", "-c", config, "--cluster", _cluster_file(tmp_path), cwd=tmp_path, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().endswith(
        "submits Slurm jobs but sbatch is not on PATH; run geomask where Slurm's commands are (a login node)"
    )
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


# -- on a real Slurm ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A single-node Slurm started for these tests; yields the environment that points Slurm's commands at it."""
    state = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(["bash", str(START), str(state)], capture_output=True, text=True, timeout=120, check=False)
    if started.returncode != 0:
        subprocess.run(["bash", str(STOP), str(state)], capture_output=True, timeout=60, check=False)
        reason = f"no single-node Slurm here: {(started.stderr.strip().splitlines() or ['start.sh failed'])[-1]}"
        if REQUIRE_SLURM:
            pytest.fail(f"GEOMASK_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    try:
        yield {**os.environ, "PYTHONPATH": str(REPO), "SLURM_CONF": str(state / "slurm.conf")}
    finally:
        subprocess.run(["bash", str(STOP), str(state)], capture_output=True, timeout=60, check=False)


def _geomask(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = env or {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([str(BIN / "geomask"), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=150)


def _launch(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    command = [str(BIN / "geomask"), *args]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _jobs(env: dict[str, str]) -> dict[str, str]:
    """The test Slurm's jobs in its queue: id -> state (PENDING, RUNNING, ...)."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %T"], env=env, capture_output=True, text=True, timeout=30, check=True).stdout
    return dict(line.split() for line in out.splitlines())


def _state(env: dict[str, str], job_id: str) -> str:
    """A job's final state from slurmctld's record (kept for MinJobAge after the job ended)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True, timeout=30).stdout
    return next((f.split("=", 1)[1] for f in out.split() if f.startswith("JobState=")), "?")


def _wait(what: str, until: object, job: subprocess.Popen[str] | None = None, within_s: float = 90.0) -> None:
    deadline = time.monotonic() + within_s
    while not until():  # type: ignore[operator]
        assert job is None or job.poll() is None, job.communicate() if job else ""
        assert time.monotonic() < deadline, f"waited {within_s:.0f} s for {what}"
        time.sleep(0.2)


def _queue_empties(env: dict[str, str]) -> None:
    _wait("the worker jobs to be cancelled", lambda: not _jobs(env), within_s=30)


@pytest.fixture
def scene(tmp_path: Path) -> tuple[Path, Path, list[tuple[object, ...]]]:
    """The 1500 px scene, its labels and the serial reference output."""
    ((image, labels),) = make_inputs(tmp_path)
    return image, labels, serial_polygons(image, write_config(tmp_path / "truth.yaml", labels), tmp_path / "serial.gpkg")


@pytest.mark.slurm
@pytest.mark.timeout(150)
def test_predict_submits_its_workers_to_slurm(tmp_path: Path, slurm: dict[str, str], scene: tuple[Path, Path, list[object]]) -> None:
    image, labels, expected = scene
    config = write_config(tmp_path / "job.yaml", labels)
    done = _geomask("predict", image.name, "-o", "out.gpkg", "-c", config, "--cluster", _cluster_file(tmp_path), cwd=tmp_path, env=slurm)
    assert done.returncode == 0, done.stderr
    assert polygons(tmp_path / "out.gpkg") == expected
    assert f"{N_TASKS} tasks computed" in done.stdout
    said = next(line for line in done.stderr.splitlines() if "Slurm worker jobs:" in line)
    ids = said.split("Slurm worker jobs: ")[1].split(" (")[0].split(", ")
    assert len(ids) == 2 and len(list((tmp_path / "logs").glob("dask-worker-*.err"))) == 2  # submitted through sbatch
    assert not _jobs(slurm)  # released at the end: cancelled, not left to run into their time limit
    assert {_state(slurm, i) for i in ids} == {"CANCELLED"}


@pytest.mark.slurm
@pytest.mark.timeout(150)
def test_a_cancelled_worker_job_is_replaced(tmp_path: Path, slurm: dict[str, str], scene: tuple[Path, Path, list[object]]) -> None:
    """``scancel`` ends a job as its time limit does (SIGTERM, then SIGKILL): its tasks move, a new job is submitted."""
    image, labels, expected = scene
    config = write_config(tmp_path / "job.yaml", labels, SLOW, delay_s=0.8)  # 49 tiles: ~40 s of work on 1 worker
    args = ["predict", image.name, "-o", "out.gpkg", "-c", str(config), "--cluster", str(_cluster_file(tmp_path)), "--run-dir", "run"]
    results = tmp_path / "run" / "results" / "00000"
    job = _launch(args, tmp_path, slurm)
    try:
        _wait("two running worker jobs", lambda: list(_jobs(slurm).values()) == ["RUNNING", "RUNNING"], job)
        first = set(_jobs(slurm))
        _wait("a stored result", lambda: any(results.glob("L0-*.npz")), job)  # mid-run: each worker is in a task
        victim = min(first, key=int)
        subprocess.run(["scancel", victim], env=slurm, check=True, timeout=30)
        _wait("a replacement job", lambda: len(set(_jobs(slurm)) - first) == 1, job)
        out, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, err[-3000:]
    assert polygons(tmp_path / "out.gpkg") == expected
    assert f"{N_TASKS} tasks computed" in out
    assert len(list(results.glob("L0-*.npz"))) == N_TASKS
    assert _state(slurm, victim) == "CANCELLED"
    victim_log = (tmp_path / "logs" / f"dask-worker-{victim}.err").read_text()
    assert "SIGTERM" in victim_log, victim_log[-2000:]  # the worker closed on SIGTERM, as at a time limit
    _queue_empties(slurm)


@pytest.mark.slurm
@pytest.mark.timeout(200)
def test_sigterm_to_the_client_cancels_the_jobs_and_keeps_finished_work(
    tmp_path: Path, slurm: dict[str, str], scene: tuple[Path, Path, list[object]]
) -> None:
    image, labels, expected = scene
    config = write_config(tmp_path / "job.yaml", labels, SLOW, delay_s=0.3)
    args = ["predict", image.name, "-o", "out.gpkg", "-c", str(config), "--cluster", str(_cluster_file(tmp_path)), "--run-dir", "run"]
    results = tmp_path / "run" / "results" / "00000"
    job = _launch(["-q", *args], tmp_path, slurm)
    try:
        _wait("two stored results", lambda: len(list(results.glob("L0-*.npz"))) >= 2, job)
        ids = set(_jobs(slurm))
        job.send_signal(signal.SIGTERM)  # what Slurm sends a client job at its time limit
        _, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 143, err[-3000:]
    assert err.strip() == "geomask: terminated (SIGTERM); finished work in --run-dir is kept; re-run the same command to resume"
    assert not (tmp_path / "out.gpkg").exists()
    _queue_empties(slurm)
    assert {_state(slurm, i) for i in ids} == {"CANCELLED"}
    stored = len(list(results.glob("L0-*.npz")))
    assert 2 <= stored < N_TASKS

    done = _geomask(*args, cwd=tmp_path, env=slurm)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["tasks_loaded"] == stored and summary["tasks_computed"] == N_TASKS - stored
    assert polygons(tmp_path / "out.gpkg") == expected
    _queue_empties(slurm)


@pytest.mark.slurm
@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    ("options", "wait_s", "said"),
    [
        (
            {"queue": "nope"},
            90,
            "Slurm refuses the worker job of cluster.yaml: sbatch: error: invalid partition specified: nope; fix its options",
        ),
        ({"job_extra_directives": ["--begin=now+1hour"]}, 8, "no worker job started within 8 s (Slurm jobs: "),  # queued, never started
    ],
)
def test_a_worker_job_slurm_refuses_or_never_starts(
    tmp_path: Path, slurm: dict[str, str], options: dict[str, object], wait_s: int, said: str
) -> None:
    ((image, labels),) = make_inputs(tmp_path, size_px=300)
    cluster = _cluster_file(tmp_path, **options)
    cluster.write_text(cluster.read_text().replace("wait_s: 90", f"wait_s: {wait_s}"))
    config = write_config(tmp_path / "job.yaml", labels)
    done = _geomask("-q", "predict", image.name, "-o", "out.gpkg", "-c", config, "--cluster", "cluster.yaml", cwd=tmp_path, env=slurm)
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip()
    assert len(line.splitlines()) == 1 and said in line.replace(str(tmp_path) + "/", ""), done.stderr
    assert not (tmp_path / "out.gpkg").exists()
    _queue_empties(slurm)  # a job that was queued is cancelled
