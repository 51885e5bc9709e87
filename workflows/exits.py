"""Exit codes of the ``geomask`` command, and the error that stops a job for a cluster reason.

Kept free of Dask so that the CLI can catch it without importing ``distributed``.

====  ==========================================================================================
code  meaning
====  ==========================================================================================
0     every tile was processed
2     bad input, settings or usage: one line names the problem and the fix; nothing was done
3     finished with failed tiles (listed in ``RUN_DIR/failures.jsonl``); everything else written
4     lost the Dask scheduler mid-run: no output written, finished work is in ``--run-dir``
5     stalled: no task finished for ``dask.stall_timeout_s`` (hung or missing workers): no output
      written, finished work is in ``--run-dir``
6     no cluster to run on: the local Dask cluster could not start (its scheduler or a worker process
      failed while starting: an unusable temporary directory, a broken Dask setting), or no worker
      joined ``--scheduler``'s within 120 s: nothing was done
130   interrupted (Ctrl-C): no output written from unfinished work, finished work is in ``--run-dir``
143   terminated (SIGTERM, a batch system's time limit or an eviction): as 130
====  ==========================================================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_FAILURES = 3
EXIT_SCHEDULER_LOST = 4
EXIT_STALLED = 5
EXIT_CLUSTER_START = 6
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a batch system expects from a job it stopped
KEPT = "finished work in --run-dir is kept; re-run the same command to resume"


class JobStopped(Exception):
    """The job stopped for a cluster reason before it could write its outputs; nothing was written.

    Not a :class:`~geomask.errors.GeomaskError`: the input and settings are fine, and re-running the
    same command (with the same ``--run-dir``) resumes. The CLI prints the message as one line and
    exits with :attr:`exit_code`.
    """

    exit_code = 1


class SchedulerLost(JobStopped):
    """The client lost its connection to the Dask scheduler (killed, or its node went away)."""

    exit_code = EXIT_SCHEDULER_LOST


class Stalled(JobStopped):
    """No task finished for ``dask.stall_timeout_s``: a hung worker, or no worker at all."""

    exit_code = EXIT_STALLED


class ClusterStartFailed(JobStopped):
    """No cluster to run on (the local one did not come up, or no worker joined); nothing ran."""

    exit_code = EXIT_CLUSTER_START
