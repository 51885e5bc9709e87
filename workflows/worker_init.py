"""Preloaded into the worker processes of the local cluster geomask starts (``preload=[__name__]``).

Ctrl-C in a terminal sends SIGINT to the whole process group, the local cluster's worker processes
included. Each would raise ``KeyboardInterrupt`` in its event loop and print a traceback (five of them
for one Ctrl-C, ~90 lines), and its nanny would try to restart it. The driver alone handles the
interrupt and closes the cluster, so the workers ignore SIGINT. An ignored signal stays ignored across
the workers' own child processes.

Once closed, a worker process exits without finalising the interpreter (see ``_exit_now``). Once up, a
worker shows its nanny's warnings again (``dask_setup``).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading

if threading.current_thread() is threading.main_thread():  # signal.signal works in the main thread only
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _not_a_cancelled_task(record: logging.LogRecord) -> bool:
    return "ended with CancelledError" not in record.getMessage()


# An interrupted driver releases its futures and the running tasks are cancelled: expected, not worth
# a WARNING per task ("Async instruction for <Task cancelled ...> ended with CancelledError").
logging.getLogger("distributed.worker.state_machine").addFilter(_not_a_cancelled_task)

# A worker process that loaded torch takes seconds to finalise the interpreter after the worker closed
# (C++ destructors, thread pools), longer than the nanny waits: every run ended with "Worker process
# still alive after 4.0 seconds, killing" and a killed process. A worker holds nothing to flush (results
# travel to the driver, which writes the run folder), so once it has closed cleanly it exits at once.
_closed_cleanly = False


def dask_setup(worker: object) -> None:
    """Show the worker's nanny warnings again (a preload hook, run once the worker is listening).

    The cluster starts its workers with that logger at CRITICAL, so that a worker failing to start is
    one line on the driver, not a traceback per worker (``workflows.cluster``).
    """
    logging.getLogger("distributed.nanny").setLevel(logging.WARNING)


def dask_teardown(worker: object) -> None:
    """Note that the worker is closing normally (a preload hook, run when its close begins)."""
    global _closed_cleanly
    _closed_cleanly = True


def _exit_now() -> None:
    if _closed_cleanly:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


atexit.register(_exit_now)
