"""Getting a Dask client: a local cluster sized to the machine, or an existing cluster by address.

An existing cluster is used as it is: nothing is scaled, and the detector plugin this job registers is
removed again at the end.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import dask
from distributed import Client, LocalCluster
from distributed.worker_memory import parse_memory_limit

from geomask.config import DaskConfig
from geomask.errors import ConfigError, GeomaskError, first_line
from workflows.exits import ClusterStartFailed

log = logging.getLogger(__name__)
WAIT_FOR_WORKERS_S = 120.0


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
                    preload=["workflows.worker_init"],  # workers ignore Ctrl-C (the driver handles it) and exit at once when closed
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
    dlog = logging.getLogger("distributed")
    if verbose:
        yield
        return
    level = dlog.level
    dlog.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        dlog.setLevel(level)


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


@contextmanager
def connect(cfg: DaskConfig) -> Iterator[Client]:
    """Yield a client of ``cfg.address``'s cluster, or of a new local cluster closed on exit."""
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
