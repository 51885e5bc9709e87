"""geomask: every building or tree crown in huge aerial images, as georeferenced polygons."""

__version__ = "0.1.0"
