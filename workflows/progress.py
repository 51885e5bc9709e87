"""The Dask job's progress bar is the serial path's: :mod:`geomask.progress` (one look for both)."""

from __future__ import annotations

from geomask.progress import advance, terminal_bar

__all__ = ["advance", "terminal_bar"]
