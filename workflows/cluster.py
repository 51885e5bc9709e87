"""Getting a Dask client: a local cluster sized to the machine, or an existing cluster by address.

An existing cluster is used as it is: nothing is scaled, and the plugins this job registers (the
detector, and the environment for remote inputs) are removed again at the end.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import dask
from distributed import Client, LocalCluster, WorkerPlugin

from geomask.config import DaskConfig
from geomask.errors import GeomaskError
from geomask.remote import configure_gdal, forwarded_environ

log = logging.getLogger(__name__)
WAIT_FOR_WORKERS_S = 120.0
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
    log.info("starting a local Dask cluster: %d worker process(es) x %d thread(s)", n, cfg.threads_per_worker)
    # The workers' statistical profiler samples every thread every 10 ms; with a detector that holds the GIL
    # (Python-heavy pre/post-processing) it cost ~20% of the job (bench/results/dask.md). It only feeds the
    # dashboard's profile page, so the clusters geomask starts go without it (the nannies pass this on).
    with dask.config.set({"distributed.worker.profile.enabled": False}):
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
            ),
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
        except TimeoutError:
            raise ClusterError(
                f"no worker joined the scheduler at {cfg.address} within {WAIT_FOR_WORKERS_S:.0f} s; start one with `dask worker {cfg.address}`"
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
