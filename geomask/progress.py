"""The live progress bar of a run on a terminal (tqdm); batch jobs and CI keep the periodic log lines.

One look for both paths: ``--serial`` (:class:`SerialProgress`) and the Dask job
(``workflows.progress.Progress``). tqdm draws tiles done/total, rate and ETA itself; geomask adds the objects
found and failed tiles.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from tqdm import tqdm

log = logging.getLogger(__name__)


def terminal_bar(total_tiles: int, stream: TextIO | None = None) -> tqdm[None] | None:
    """Return a bar over ``total_tiles`` when ``stream`` (default: stderr) is a terminal, else ``None`` (log lines)."""
    out = stream if stream is not None else sys.stderr
    if not out.isatty():
        return None
    return tqdm(total=total_tiles, unit="tile", file=out, dynamic_ncols=True, smoothing=0.1, desc="tiles")


def advance(bar: tqdm[None], tiles: int, objects: int, failures: int) -> None:
    """Move the bar on by ``tiles`` and show the running object and failure counts."""
    bar.set_postfix(objects=objects, failed=failures, refresh=False)
    bar.update(tiles)


class SerialProgress:
    """Progress of a serial run: on a terminal the Dask path's live bar, else a log line every ``every_s`` seconds."""

    def __init__(self, source: str, total: int, every_s: float, stream: TextIO | None = None):
        self.source, self.total, self.every_s = source, total, every_s
        self.bar = terminal_bar(total, stream)
        self.done = self.objects = self.failures = 0
        self.start = self.last = time.perf_counter()

    def __call__(self, tiles: int, instances: int = 0, failures: int = 0) -> None:
        self.done += tiles
        self.objects += instances
        self.failures += failures
        if self.bar is not None:
            advance(self.bar, tiles, self.objects, self.failures)
            return
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            rate = self.done / (now - self.start) if now > self.start else 0.0
            log.info(
                "%s: tiles %d/%d (%.0f%%), %d objects, %.2f tiles/s",
                self.source,
                self.done,
                self.total,
                100.0 * self.done / max(1, self.total),
                self.objects,
                rate,
            )

    def close(self) -> None:
        """Leave the full bar on screen (the tiles are done; merging and writing follow)."""
        if self.bar is not None:
            self.bar.close()
