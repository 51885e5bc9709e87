"""The one content digest of a file: SHA-256 read in 1 MiB blocks (memory flat for multi-GB files).

Used where a file must be identified by what it holds, not by its name or mtime: the run folder's
model identity (``workflows.store``) and the provenance of an imported Detectron2 checkpoint.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """Return the hex SHA-256 of the file at ``path``."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
