"""``geomask predict``: images in, polygons out."""

from __future__ import annotations

import logging

import click

from geomask.config import DEFAULT_DETECTOR
from geomask.pipeline import run_serial

log = logging.getLogger("geomask")


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="Output file (.gpkg .geojson .shp .parquet .fgb).")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help="YAML config (see configs/).")
@click.option("--weights", help="Model checkpoint (.pt) for the built-in Mask R-CNN; default: the bundled model.")
@click.option("--detector", help="Detector factory 'package.module:callable' (default: the built-in Mask R-CNN).")
@click.option("--tile-size", type=int, help="Tile size in pixels (tiling.size_px).")
@click.option("--overlap", type=int, help="Tile overlap in pixels (tiling.overlap_px).")
@click.option("--batch-size", type=int, help="Tiles per detector call (detector.batch_size).")
@click.option("--device", help="torch device for the built-in detector: auto, cpu, cuda, cuda:1.")
@click.option("--serial", is_flag=True, help="Run in this process without Dask (the reference path).")
def predict(
    inputs: tuple[str, ...],
    output: str,
    config_path: str | None,
    weights: str | None,
    detector: str | None,
    tile_size: int | None,
    overlap: int | None,
    batch_size: int | None,
    device: str | None,
    serial: bool,
) -> None:
    """Detect objects in INPUTS (GeoTIFFs) and write georeferenced polygons to --output."""
    from workflows.cli import resolve_cli_config

    cfg = resolve_cli_config(
        config_path,
        {"detector.factory": detector, "tiling.size_px": tile_size, "tiling.overlap_px": overlap, "detector.batch_size": batch_size},
    )
    options = dict(cfg.detector.options)
    if cfg.detector.factory == DEFAULT_DETECTOR:
        if weights is not None:
            options["weights"] = weights
        if device is not None:
            options["device"] = device
    elif weights is not None or device is not None:
        raise click.UsageError("--weights/--device apply to the built-in detector only; pass options to yours in the config")
    from geomask.config import merge_overrides

    cfg = merge_overrides(cfg, {"detector.options": options})
    if len(inputs) != 1:
        raise click.UsageError("several inputs need the Dask workflow; drop --serial")
    summary = run_serial(inputs[0], output, cfg)
    click.echo(f"{summary.n_features} objects from {summary.n_tiles} tiles in {summary.seconds:.1f} s -> {summary.output}")
