"""The live progress bar of a job on a terminal (tqdm); batch jobs and CI keep the periodic log lines.

tqdm draws tiles done/total, rate and ETA itself; geomask adds the objects found and failed tiles.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm


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
