"""Orchestration and the command line: Dask clusters, tasks, resume ledger, progress, the CLI.

The only package that imports dask/distributed and click; the library in ``geomask`` stays usable
on its own.
"""
