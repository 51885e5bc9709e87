"""Cluster health for the driver: a lost scheduler, a stalled job, and the one-line messages that say what to do.

A client that lost its scheduler cancels every future; a cancelled future is never a failed tile, so it
stops the job (:class:`~workflows.exits.SchedulerLost`, exit 4). No finished task for
``dask.stall_timeout_s`` stops it too (:class:`~workflows.exits.Stalled`, exit 5), naming the stuck
task keys per worker (``client.processing()``) or saying that no worker is connected.
"""

from __future__ import annotations

import math
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any, cast

from distributed import Client, Future, wait

from geomask.errors import first_line
from workflows.exits import SchedulerLost, Stalled

SETUP_STALL_S = 120.0  # the least the watchdog gives the first tasks: a worker builds the model first (imports, weights, CUDA)
STUCK_SHOWN = 4  # task keys named per worker in the stall message


class ClusterWatch:
    """Checks on the client and the stall clock, and the messages a stopped job ends with.

    Args:
        client: The job's client.
        stall_timeout_s: ``dask.stall_timeout_s`` (``0`` or ``None``: never stalled).
        run_dir: The run folder that keeps finished work, if any (the messages say so).
    """

    def __init__(self, client: Client, stall_timeout_s: float | None, run_dir: Path | None):
        self.client = client
        self.address = str(getattr(client.scheduler, "address", "?"))
        self.stall_s = stall_timeout_s or float("inf")
        self.setup_stall_s = max(self.stall_s, SETUP_STALL_S)
        self.kept = (
            f"finished work is in {run_dir} (--run-dir); re-run the same command to resume"
            if run_dir is not None
            else "no --run-dir, so nothing was kept; add one to make a re-run resume"
        )

    def dropped(self, what: str) -> SchedulerLost:
        """The error for a future the scheduler cancelled: it restarted or went away."""
        return SchedulerLost(f"the Dask scheduler at {self.address} dropped {what} (restarted?); {self.kept}")

    def check_client(self) -> None:
        """Raise :class:`SchedulerLost` once the client lost its scheduler (it then cancels every future)."""
        if self.client.status not in ("running", "newly-created"):
            raise SchedulerLost(f"lost the Dask scheduler at {self.address}; {self.kept}")

    def fetch(self, fut: Future[Any]) -> Any:
        """A finished future's result, fetched within the stall timeout: a worker frozen since it finished the task
        holds the result there, and an unbounded fetch would wait for it forever. Cancellation propagates."""
        try:
            return fut.result(timeout=_bounded(self.stall_s))
        except TimeoutError:
            self.check_client()
            raise self.stalled(f"the result of task {fut.key} could not be fetched within {self.stall_s:.0f} s") from None

    def result(self, fut: Future[Any], what: str) -> Any:
        """Wait for one early future (describe, plan) with the same watchdog as the main loop."""
        try:
            cast(Any, wait)([fut], timeout=_bounded(self.setup_stall_s))
            return fut.result()
        except CancelledError:
            self.check_client()
            raise self.dropped(what) from None
        except TimeoutError:
            self.check_client()
            raise self.stalled(f"{what} did not finish within {self.setup_stall_s:.0f} s") from None

    def stalled(self, head: str) -> Stalled:
        """Describe where the job is stuck: tasks per worker, or no worker at all; and what to do."""
        try:
            processing: dict[str, list[str]] = cast(Any, self.client).processing()
            workers = self.client.scheduler_info(n_workers=-1)["workers"]
        except Exception as err:  # noqa: BLE001 - the message is still worth giving without the details
            return Stalled(f"stalled: {head} (cannot ask the scheduler at {self.address}: {first_line(err)}); {self.kept}")
        if not workers:
            where = f"no worker is connected to the scheduler at {self.address}; start workers with `dask worker {self.address}`"
        else:
            stuck = []
            for addr, keys in sorted(processing.items()):
                if keys:
                    name = workers.get(addr, {}).get("name", addr)
                    shown = ", ".join(str(k) for k in sorted(keys)[:STUCK_SHOWN]) + (", ..." if len(keys) > STUCK_SHOWN else "")
                    stuck.append(f"{len(keys)} on worker {name} ({addr}): {shown}")
            where = "stuck tasks: " + ("; ".join(stuck) if stuck else "none running (waiting for resources?)")
            where += "; check or restart those workers (a frozen or overloaded node), or raise --stall-timeout"
        return Stalled(f"stalled: {head}; {where}; {self.kept}")


def _bounded(seconds: float) -> float | None:
    """A timeout for Dask's waits: ``None`` (wait forever) when the watchdog is off (infinite)."""
    return None if math.isinf(seconds) else seconds
