"""Getting a Dask client: a local cluster sized to the machine, workers as batch jobs, or a cluster by address.

Three ways, one per job (``connect``):

- no address and no cluster file: a ``LocalCluster`` of worker processes, closed at the end;
- ``dask.cluster`` (``--cluster FILE``): a dask-jobqueue cluster (Slurm) that geomask starts itself. The
  scheduler runs in this process; each worker is a batch job submitted with ``sbatch``, kept at the file's
  ``jobs`` (a job that ends, by ``scancel``, its time limit or a node failure, is replaced) and cancelled
  when the job ends, also on an error or a signal;
- ``dask.address`` (``--scheduler``): an existing cluster, used as it is: nothing is scaled, and the
  plugins this job registers (the detector, and the environment for remote inputs) are removed again at
  the end.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, cast

import dask
from distributed import Client, LocalCluster, WorkerPlugin
from distributed.worker_memory import parse_memory_limit
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tornado.ioloop import PeriodicCallback

from geomask.config import DaskConfig, read_yaml
from geomask.errors import ConfigError, GeomaskError, first_line, quiet_logger
from geomask.remote import configure_gdal, forwarded_environ
from workflows.exits import ClusterStartFailed

log = logging.getLogger(__name__)
WAIT_FOR_WORKERS_S = 120.0
KEEP_JOBS_EVERY_S = 5.0  # how often lost worker jobs are resubmitted (after distributed.deploy.lost-worker-timeout, 15 s)
WORKER_PRELOAD = "workflows.worker_init"  # workers ignore Ctrl-C (the driver handles it) and exit at once when closed
UNREGISTER_S = 10.0  # how long the end of a job waits for the workers to drop its remote-access plugin


class ClusterError(GeomaskError, OSError):
    """The Dask cluster cannot be reached or cannot run the job."""


def local_workers(cfg: DaskConfig) -> int:
    """Return how many worker processes a local cluster gets: ``dask.n_workers``, else one per core(s).

    On GPU (``dask.gpu``) without ``n_workers``: one worker, because every local worker would share one device.
    """
    if cfg.n_workers is not None:
        return cfg.n_workers
    if cfg.gpu:
        return 1
    return max(1, (os.cpu_count() or 1) // cfg.threads_per_worker)


def _local_cluster(cfg: DaskConfig) -> LocalCluster:
    resources = {"GPU": 1} if cfg.gpu else None
    n = local_workers(cfg)
    _check_memory_limit(cfg)
    log.info("starting a local Dask cluster: %d worker process(es) x %d thread(s)", n, cfg.threads_per_worker)
    # The workers' statistical profiler samples every thread every 10 ms; with a detector that holds the GIL
    # (Python-heavy pre/post-processing) it cost ~20% of the job (bench/results/dask.md). It only feeds the
    # dashboard's profile page, so the clusters geomask starts go without it (the nannies pass this on).
    verbose = logging.getLogger("workflows").isEnabledFor(logging.DEBUG)  # -v: Dask's own log as it comes
    try:
        with dask.config.set({"distributed.worker.profile.enabled": False}), _quiet_start(verbose):
            return cast(
                "LocalCluster",
                cast(Any, LocalCluster)(
                    n_workers=n,
                    threads_per_worker=cfg.threads_per_worker,
                    processes=True,
                    memory_limit=cfg.memory_limit,
                    dashboard_address=":0",  # the scheduler's HTTP server runs anyway; a free port never collides
                    resources=resources,
                    preload=[WORKER_PRELOAD],  # workers ignore Ctrl-C (the driver handles it) and exit at once when closed
                    # A worker process that fails while starting logs its traceback from its own nanny logger, once
                    # per worker (~150 lines); the failure is reported below in one line. worker_init restores
                    # the level once a worker is up, so a running worker's warnings are still shown.
                    silence_logs=logging.WARNING if verbose else logging.CRITICAL,
                ),
            )
    except Exception as err:  # noqa: BLE001 - whatever stopped the start, the user gets one line and exit 6
        raise ClusterStartFailed(_start_failure(err)) from None


def _check_memory_limit(cfg: DaskConfig) -> None:
    """Refuse a ``dask.memory_limit`` Dask cannot read here, in one line, before any process starts."""
    try:
        parse_memory_limit(cfg.memory_limit, cfg.threads_per_worker, logger=log)
    except (ValueError, TypeError) as err:
        raise ConfigError(
            f"dask.memory_limit: cannot read {cfg.memory_limit!r} ({first_line(err)}); write a size per worker such as '4GiB', or 'auto'"
        ) from None


@contextmanager
def _quiet_start(verbose: bool) -> Iterator[None]:
    """Hold back Dask's own log while the cluster starts: a failed start is one line (-v shows it all)."""
    if verbose:
        yield
        return
    with quiet_logger("distributed", logging.CRITICAL):
        yield


def _start_failure(err: BaseException) -> str:
    """Say in one line why the local cluster did not start, from the innermost cause, and what to do."""
    cause = err
    while cause.__cause__ is not None or (cause.__context__ is not None and not cause.__suppress_context__):
        cause = cause.__cause__ or cast(BaseException, cause.__context__)
    if isinstance(cause, OSError) and cause.filename is not None:
        scratch = dask.config.get("temporary-directory") or tempfile.gettempdir()
        return (
            f"the local Dask cluster could not start: {cause.strerror or first_line(cause)}: {cause.filename}; Dask keeps its "
            f"scratch files under {scratch} (DASK_TEMPORARY_DIRECTORY or the temporary-directory setting): point it at a "
            "folder you can write, or run with --serial"
        )
    who = "a worker process" if "Nanny failed to start" in str(err) else "the cluster"
    return (
        f"the local Dask cluster could not start: {who} failed while starting ({first_line(cause, max_chars=160, with_type=True)}); check "
        "the Dask settings (DASK_* variables, ~/.config/dask; `dask config list` shows them), -v shows Dask's own log, "
        "or run with --serial"
    )


def check_resources(client: Client, cfg: DaskConfig) -> None:
    """Fail now, not after an endless wait, when GPU tasks are asked for and no worker offers a GPU."""
    if not cfg.gpu:
        return
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    if not any(w.get("resources", {}).get("GPU", 0) >= 1 for w in workers):
        raise ClusterError(
            "dask.gpu is true but no worker offers resources GPU; start workers with `dask worker ADDRESS --resources GPU=1` "
            "(see docs/cluster.md) or set dask.gpu: false"
        )


class ClusterFile(BaseModel):
    """A cluster file (``--cluster``, ``dask.cluster``): which batch system runs the workers, and how many.

    Not part of the job's config (``-c``): where a job runs changes no result, so a run folder resumes on
    another cluster, and the config sidecar does not carry site details (accounts, partitions).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    kind: Literal["slurm"] = Field(description="the batch system; slurm: dask_jobqueue.SLURMCluster")
    jobs: int = Field(ge=1, description="worker jobs kept running; one that ends (scancel, time limit, node failure) is resubmitted")
    wait_s: float = Field(600.0, gt=0, description="how long to wait for the first worker job to start (the queue's wait)")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="keyword arguments of SLURMCluster (cores, memory, processes, queue, walltime, job_extra_directives, ...); "
        "those not given come from dask-jobqueue's config (~/.config/dask/jobqueue.yaml)",
    )


def load_cluster_file(path: str | Path) -> ClusterFile:
    """Read and validate a cluster file, raising :class:`~geomask.errors.ConfigError` with one line."""
    p = Path(path)
    data = read_yaml(p, "cluster file")
    if not isinstance(data, dict):
        raise ConfigError(f"cluster file {p} must hold a mapping (kind, jobs, options); see configs/cluster-slurm.yaml")
    try:
        return ClusterFile.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        what = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise ConfigError(f"cluster file {p}: {where}: {what}; see configs/cluster-slurm.yaml") from None


def _job_options(spec: ClusterFile, gpu: bool) -> dict[str, Any]:
    """``spec.options`` plus what every geomask worker needs: the preload, no profiler, ``GPU=1`` when ``gpu``.

    Lists the file does not give come from dask-jobqueue's config, so geomask's additions extend them.
    """
    options = dict(spec.options)
    args = list(options.get("worker_extra_args", dask.config.get("jobqueue.slurm.worker-extra-args", None)) or [])
    if WORKER_PRELOAD not in args:
        args += ["--preload", WORKER_PRELOAD]
    if gpu and "--resources" not in args:
        args += ["--resources", "GPU=1"]
    prologue = list(options.get("job_script_prologue", dask.config.get("jobqueue.slurm.job-script-prologue", None)) or [])
    prologue.append("export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False")  # as on local clusters (see _local_cluster)
    scheduler = {"dashboard_address": ":0", **dict(options.get("scheduler_options", {}))}
    return {**options, "worker_extra_args": args, "job_script_prologue": prologue, "scheduler_options": scheduler}


def _slurm_cluster(spec: ClusterFile, cfg: DaskConfig, source: str) -> Any:
    """Start a ``SLURMCluster`` (its scheduler, in this process) after ``sbatch --test-only`` accepted its job script."""
    try:
        from dask_jobqueue.slurm import SLURMCluster
    except ImportError:
        raise ClusterError(f"{source} needs dask-jobqueue; pip install 'geomask[cluster]'") from None
    if shutil.which("sbatch") is None:
        raise ClusterError(f"{source} submits Slurm jobs but sbatch is not on PATH; run geomask where Slurm's commands are (a login node)")
    try:
        cluster: Any = SLURMCluster(**_job_options(spec, cfg.gpu))
    except (TypeError, ValueError) as err:  # an unknown or malformed option
        raise ClusterError(f"cluster file {source}: options: {first_line(err)}; see dask_jobqueue.SLURMCluster's arguments") from None
    try:
        _test_submit(cluster.job_script(), source)
    except BaseException:
        cluster.close()
        raise
    return cluster


def _test_submit(script: str, source: str) -> None:
    """Let Slurm check the job script (partition, account, resources) without submitting it."""
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="geomask-job-") as f:
        f.write(script)
        f.flush()
        done = subprocess.run(["sbatch", "--test-only", f.name], capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        said = [line for line in done.stderr.splitlines() if "error" in line.lower()] or done.stderr.splitlines() or ["no message"]
        raise ClusterError(f"Slurm refuses the worker job of {source}: {said[-1].strip()}; fix its options")


def _job_ids(cluster: Any) -> list[str]:
    return [str(job.job_id) for job in list(cluster.workers.values()) if getattr(job, "job_id", None)]


@contextmanager
def _batch_cluster(cfg: DaskConfig, source: str) -> Iterator[Client]:
    """Yield a client of a cluster whose workers are Slurm jobs; cancel every job on exit, however it is left."""
    spec = load_cluster_file(source)
    cluster = _slurm_cluster(spec, cfg, source)
    try:
        with cast(Client, cast(Any, Client)(cluster)) as client:
            cluster.scale(jobs=spec.jobs)
            # A worker job that ended stays in the cluster's plan; scaling to the same size resubmits it.
            keeper = PeriodicCallback(lambda: cluster.scale(jobs=spec.jobs), KEEP_JOBS_EVERY_S * 1000)
            cluster.periodic_callbacks["geomask-keep-jobs"] = keeper  # stopped when the cluster closes
            cluster.loop.add_callback(keeper.start)
            try:
                client.wait_for_workers(1, timeout=spec.wait_s)
            except TimeoutError:
                ids = ", ".join(_job_ids(cluster)) or "none submitted"
                raise ClusterError(
                    f"no worker job started within {spec.wait_s:.0f} s (Slurm jobs: {ids}); see `squeue` and the jobs' logs "
                    f"(options.log_directory), or raise wait_s in {source}"
                ) from None
            log.info("Slurm worker jobs: %s (kept at %d)", ", ".join(_job_ids(cluster)), spec.jobs)
            _log_dashboard(client, cfg.dashboard)
            check_resources(client, cfg)
            yield client
    finally:
        _release(cluster)


def _release(cluster: Any) -> None:
    """Cancel the worker jobs (``scancel`` through the cluster, each job id directly if that fails)."""
    ids = _job_ids(cluster)
    try:
        cluster.close(timeout=60)
    except Exception as err:  # noqa: BLE001 - a job that never started makes close() fail; the jobs must go anyway
        log.warning("closing the Slurm cluster failed (%s); cancelling jobs %s directly", first_line(err, with_type=True), ids)
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True, timeout=60, check=False)
    if ids:
        log.info("cancelled Slurm worker jobs %s", ", ".join(ids))


@contextmanager
def connect(cfg: DaskConfig) -> Iterator[Client]:
    """Yield a client of ``cfg.address``'s cluster, of batch jobs from ``cfg.cluster``, or of a new local cluster."""
    if cfg.cluster is not None:
        if cfg.n_workers is not None:
            log.warning("dask.n_workers (--workers) sizes a local cluster only; the cluster file's jobs say how many workers run")
        with _batch_cluster(cfg, cfg.cluster) as client:
            yield client
        return
    if cfg.address is None:
        with _local_cluster(cfg) as cluster, cast(Client, cast(Any, Client)(cluster)) as client:
            _log_dashboard(client, cfg.dashboard)
            check_resources(client, cfg)
            yield client
        return
    if cfg.n_workers is not None:
        log.warning("dask.n_workers (--workers) sizes a local cluster only; the cluster at %s is used as it is", cfg.address)
    try:
        client = cast(Client, cast(Any, Client)(cfg.address, timeout="20s"))
    except (OSError, TimeoutError, ValueError) as err:  # ValueError: a malformed address (unknown scheme)
        raise ClusterError(
            f"cannot reach the Dask scheduler at {cfg.address} ({err}); start one with `dask scheduler` or fix --scheduler"
        ) from None
    with client:
        try:
            client.wait_for_workers(1, timeout=WAIT_FOR_WORKERS_S)
        except TimeoutError:  # no cluster to run on, as when a local one cannot start: exit 6
            raise ClusterStartFailed(
                f"no worker joined the scheduler at {cfg.address} within {WAIT_FOR_WORKERS_S:.0f} s; start one with "
                f"`dask worker {cfg.address}` (its log says why one that was started did not join, e.g. a wrong --listen-address)"
            ) from None
        _log_dashboard(client, cfg.dashboard)
        check_resources(client, cfg)
        try:
            yield client
        finally:
            if client.status != "running":  # lost the scheduler: the driver said so in one line
                _quiet_reconnect()


def _quiet_reconnect() -> None:
    """Silence the client's reconnect loop, which logs a traceback at ERROR when closing cancels it."""
    logging.getLogger("distributed.client").setLevel(logging.CRITICAL)


def _log_dashboard(client: Client, dashboard: bool) -> None:
    n = len(client.scheduler_info(n_workers=-1)["workers"])
    log.info("Dask scheduler %s with %d worker(s)", client.scheduler_info(n_workers=0)["address"], n)
    link = client.dashboard_link
    if link and dashboard:
        hint = "" if importlib.util.find_spec("bokeh") else " (install bokeh>=3.1 to see it)"
        log.info("dashboard: %s%s", link, hint)


class RemoteAccess(WorkerPlugin):  # type: ignore[misc]
    """Give each worker the client's credentials, endpoint and GDAL network options for remote inputs.

    A worker's own variables win (a node with an instance role or its own profile keeps it). The values
    travel in memory, pickled to the scheduler and the workers, never into a file; ``repr`` names the
    variables only.
    """

    name = "geomask-remote-access"

    def __init__(self, environ: dict[str, str]):
        self._environ = dict(environ)
        self._added: list[str] = []

    def __repr__(self) -> str:
        return f"RemoteAccess({', '.join(sorted(self._environ))})"

    def setup(self, worker: Any) -> None:
        self._added = [key for key in self._environ if key not in os.environ]
        os.environ.update({key: self._environ[key] for key in self._added})
        configure_gdal()

    def teardown(self, worker: Any) -> None:
        """Take the client's variables out of the worker again when the job ends (the next job may be another user's)."""
        for key in self._added:
            os.environ.pop(key, None)
        configure_gdal()


@contextmanager
def remote_access(client: Client, needed: bool) -> Iterator[None]:
    """Register :class:`RemoteAccess` for the job when ``needed`` (some input is remote), and unregister it at the end."""
    if not needed:
        yield
        return
    plugin = RemoteAccess(forwarded_environ(os.environ))
    client.register_plugin(plugin)
    try:
        yield
    finally:
        try:
            if client.status == "running":  # bounded, as for the detector plugin: a frozen worker never answers
                c = cast(Any, client)
                c.sync(c._unregister_worker_plugin, name=plugin.name, nanny=None, callback_timeout=UNREGISTER_S)
        except Exception as err:  # noqa: BLE001 - the variables stay in that worker's memory, as they would in a local one
            log.debug("could not unregister %s: %s", plugin.name, err)
