"""One exception hierarchy for everything a user can get wrong.

Each error is rooted in the builtin a caller would naturally catch (``ValueError`` for bad values,
``OSError`` for unreadable files) and in :class:`GeomaskError`, which the CLI turns into a one-line
message and exit code 2. Messages name the value, the rule and the way out.
"""

from __future__ import annotations


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
