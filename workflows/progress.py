"""A job's progress across the cluster: a live bar on a terminal, periodic log lines elsewhere.

The bar is the serial path's (:mod:`geomask.progress`, one look for both); this module counts the Dask
job's tiles, objects and failures into it. Batch jobs and CI, whose stderr is no terminal, get a log
line every few seconds instead, with the skipped tiles and an ETA.
"""

from __future__ import annotations

import logging
import time

from geomask.progress import advance, terminal_bar

log = logging.getLogger(__name__)


class Progress:
    """Progress across the cluster: tiles done/total, objects, rate, ETA; a live bar on a terminal, else periodic lines."""

    def __init__(self, total_tiles: int, every_s: float, n_empty: int = 0, n_outside_aoi: int = 0):
        self.bar = terminal_bar(total_tiles)
        self.failures = 0
        self.total = total_tiles
        self.n_empty, self.n_outside_aoi = n_empty, n_outside_aoi
        self.done = 0
        self.objects = 0
        self.every_s = every_s
        self.t0 = time.perf_counter()
        self.computed = 0
        self.last = self.t0

    def add(self, tiles: int, objects: int, computed: bool, failures: int = 0) -> None:
        self.done += tiles
        self.objects += objects
        self.failures += failures
        if computed:
            self.computed += tiles
        if self.bar is not None:
            advance(self.bar, tiles, self.objects, self.failures)
            return
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            self.log()

    def log(self) -> None:
        if self.bar is not None:  # the job is over: leave the full bar on screen
            self.bar.close()
            return
        elapsed = time.perf_counter() - self.t0
        rate = self.computed / elapsed if elapsed > 0 else 0.0
        eta = f"{(self.total - self.done) / rate:.0f} s" if rate > 0 else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        log.info(
            "tiles %d/%d (%.0f%%; %d skipped: %d empty, %d outside the AOI), %d objects, %.2f tiles/s, ETA %s",
            self.done,
            self.total,
            pct,
            self.n_empty + self.n_outside_aoi,
            self.n_empty,
            self.n_outside_aoi,
            self.objects,
            rate,
            eta,
        )
