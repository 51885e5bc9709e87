"""Atomic file writing: the one place where a temporary name is renamed into place.

Outputs, their config sidecars and the run folder's results all go through :func:`replacing`, so a
process killed at any moment, or a writer that fails half-way, leaves either the old file or the whole
new one, never a torn file. Files are created with the process umask's mode (as any other program
would create them), not the 0600 of :func:`tempfile.mkstemp`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success, each file written into it replaces its namesake.

    The folder is on the target's file system, so the final :func:`os.replace` is a rename. A format that
    writes several files (Shapefile's ``.shp``, ``.dbf``, ...) writes them all into the folder; the file
    named like ``target`` moves last, so a reader that finds it also finds the new files beside it. On
    any exception nothing moves and the folder is removed.
    """
    out = Path(target)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmpdir
        produced = sorted(tmpdir.iterdir(), key=lambda p: (p.name == out.name, p.name))
        for path in produced:
            os.replace(path, out.with_name(path.name))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and durably (flushed to disk before the rename)."""
    out = Path(path)
    with replacing(out) as tmpdir, (tmpdir / out.name).open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return out


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a small text file atomically (a config sidecar, a JSON report)."""
    return write_bytes_atomic(path, text.encode())
