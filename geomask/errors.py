"""One exception hierarchy for everything a user can get wrong.

Each error is rooted in the builtin a caller would naturally catch (``ValueError`` for bad values,
``OSError`` for unreadable files) and in :class:`GeomaskError`, which the CLI turns into a one-line
message and exit code 2. Messages name the value, the rule and the way out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


class GeomaskError(Exception):
    """Base of every error geomask raises on purpose."""


class ConfigError(GeomaskError, ValueError):
    """A configuration key or value is invalid."""


class RasterReadError(GeomaskError, OSError):
    """An input raster cannot be opened or read."""


class RasterContentError(GeomaskError, ValueError):
    """An input raster opens but cannot be used (no CRS, no valid pixels, unsupported transform)."""


class DetectorError(GeomaskError, ValueError):
    """A detector cannot be imported, built, or returned something invalid."""


class WeightsError(GeomaskError, ValueError):
    """Model weights are missing, unreadable or do not match the architecture."""


class ExportError(GeomaskError, OSError):
    """Output cannot be written."""


class LabelError(GeomaskError, ValueError):
    """Training or evaluation labels cannot be read or used."""


def first_line(err: BaseException, max_chars: int | None = None, with_type: bool = False) -> str:
    """Return the first line of ``err``'s message (its type name when it has none), for one-line messages.

    Errors from GDAL, pyproj, pyarrow or torch span several lines or carry a traceback; a user is shown
    one line naming the cause.

    Args:
        err: Any exception.
        max_chars: Cut the line to this many characters (some libraries put a whole file path list in it).
        with_type: Prefix the type name (``KeyError: 128``), for errors from code the user did not write.
    """
    text = str(err).strip()
    line = text.splitlines()[0].strip() if text else ""
    if max_chars is not None:
        line = line[:max_chars]
    if not line:
        return type(err).__name__
    return f"{type(err).__name__}: {line}" if with_type else line


@contextmanager
def quiet_logger(name: str, level: int) -> Iterator[None]:
    """Raise logger ``name`` to ``level`` for the block, so a failure the user gets in one line is not also logged at length."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)
