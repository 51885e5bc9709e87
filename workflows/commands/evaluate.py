"""``geomask evaluate``: score predicted polygons against truth polygons."""

from __future__ import annotations

import logging
from pathlib import Path

import click
import geopandas as gpd

from workflows.commands.options import overwrite_option

log = logging.getLogger("geomask")


def _predict_settings(pred: str | None) -> tuple[Path | None, float | None, int | None, int | None]:
    """Return the sidecar beside ``pred`` (or ``None``) and the working GSD, tile size and overlap it names."""
    if pred is None:
        return None, None, None, None
    from geomask.config import load_config
    from geomask.export import config_sidecar

    sidecar = config_sidecar(pred)
    if not sidecar.is_file():
        return None, None, None, None
    cfg = load_config(sidecar)
    return sidecar, cfg.raster.gsd_m, cfg.tiling.size_px, cfg.tiling.overlap_px


def _tiles(
    tiles_path: str | None,
    tiles_from: str | None,
    tile_size: int | None,
    overlap: int | None,
    gsd: float | None = None,
    pred: str | None = None,
) -> gpd.GeoSeries | None:
    """Build the tile read windows for seam statistics from a tiles layer or a raster plus tiling.

    With ``tiles_from`` the tiles are planned as ``geomask predict`` planned them: on the working grid
    (the raster resampled to ``gsd`` metres; ``None``: its own pixels). Settings not given default to
    those in the resolved config predict wrote beside ``pred`` (``<pred>.config.yaml``).
    """
    from geomask.errors import ConfigError
    from geomask.evaluate import read_layer, tile_polygons

    if tiles_path and tiles_from:
        raise click.UsageError("give either --tiles or --tiles-from, not both")
    if tiles_path:
        if gsd is not None or tile_size is not None or overlap is not None:
            raise click.UsageError("--gsd/--tile-size/--overlap go with --tiles-from RASTER, not --tiles")
        frame = read_layer(tiles_path)
        return frame.geometry
    if tiles_from is None:
        if tile_size is not None or overlap is not None or gsd is not None:
            raise click.UsageError("--gsd/--tile-size/--overlap need --tiles-from RASTER (the raster the predictions came from)")
        return None
    sidecar, side_gsd, side_size, side_overlap = _predict_settings(pred)
    gsd = gsd if gsd is not None else side_gsd
    if tile_size is None:
        if side_size is None:
            raise ConfigError(
                "--tiles-from needs --tile-size (and --gsd, --overlap) as used by predict, "
                f"or the {Path(pred).name if pred else 'PRED'}.config.yaml predict writes beside its output"
            )
        tile_size = side_size
        overlap = overlap if overlap is not None else side_overlap
    elif overlap is None and tile_size == side_size:
        overlap = side_overlap
    from geomask.raster import inspect_raster, working_grid
    from geomask.tiling import default_overlap_px, plan_tiles

    if overlap is None:
        overlap = default_overlap_px(tile_size)

    info = inspect_raster(tiles_from)
    grid = working_grid(info, gsd)
    plan = plan_tiles(grid.width, grid.height, tile_size, overlap)
    log.info(
        "seam tiles: %s on %dx%d working px (%.3f m), %d tiles of %d px, overlap %d px%s",
        info.path,
        grid.width,
        grid.height,
        grid.gsd_m,
        len(plan),
        tile_size,
        overlap,
        f" (defaults from {sidecar.name})" if sidecar else "",
    )
    return gpd.GeoSeries(tile_polygons(plan, grid.transform), crs=info.crs)


@click.command()
@click.argument("pred", type=click.Path(dir_okay=False))
@click.argument("truth", type=click.Path(dir_okay=False))
@click.option("--ignore", "ignore_path", type=click.Path(dir_okay=False), help="Polygons whose content is not scored (e.g. a block edge).")
@click.option("--iou", "iou_threshold", type=float, default=0.5, show_default=True, help="IoU a one-to-one match needs.")
@click.option("--box", is_flag=True, help="Compare bounding boxes (box-only truth such as tree crowns).")
@click.option("--class-field", help="Class column in both layers (default: 'class' or 'class_id' when both have it).")
@click.option("--pred-layer", help="Layer of PRED to read (multi-layer formats).")
@click.option("--truth-layer", help="Layer of TRUTH to read (multi-layer formats).")
@click.option("--tiles", "tiles_path", type=click.Path(dir_okay=False), help="Tile read windows as polygons, for seam statistics.")
@click.option(
    "--tiles-from",
    type=click.Path(dir_okay=False),
    help="Raster the predictions came from, tiled as predict tiled it (--gsd, --tile-size, --overlap; "
    "each defaults to PRED's .config.yaml sidecar written by predict).",
)
@click.option(
    "--gsd",
    type=click.FloatRange(min=0, min_open=True),
    metavar="METRES",
    help="Working-grid GSD predict resampled to (with --tiles-from; default: the sidecar's raster.gsd_m, else the raster's own).",
)
@click.option("--tile-size", type=int, help="Tile size in working-grid pixels used by predict (with --tiles-from; default: the sidecar's).")
@click.option(
    "--overlap",
    type=int,
    help="Tile overlap in working-grid pixels used by predict (with --tiles-from; default: the sidecar's, else tile size / 8).",
)
@click.option("--no-ap", is_flag=True, help="Skip COCO AP (faster on very large layers).")
@click.option(
    "--shape-metrics",
    is_flag=True,
    help="Also score the outlines of matched pairs: C-IoU, PoLiS (truth CRS units), max tangent angle, vertices.",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the results as JSON here.")
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False),
    help="Also write a self-contained HTML report here: scores, seams and a picture of the errors.",
)
@overwrite_option("Replace an existing --json or --report file.")
def evaluate(
    pred: str,
    truth: str,
    ignore_path: str | None,
    iou_threshold: float,
    box: bool,
    class_field: str | None,
    pred_layer: str | None,
    truth_layer: str | None,
    tiles_path: str | None,
    tiles_from: str | None,
    gsd: float | None,
    tile_size: int | None,
    overlap: int | None,
    no_ap: bool,
    shape_metrics: bool,
    json_path: str | None,
    report_path: str | None,
    overwrite: bool,
) -> None:
    """Score PRED polygons against TRUTH polygons: precision, recall, F1, AP, seams.

    Predictions are reprojected to the truth's CRS. Matching is one-to-one at IoU >= --iou.
    """
    from geomask.evaluate import check_iou, check_layers, evaluate_frames, read_layer
    from geomask.export import check_file_writable

    check_iou(iou_threshold)
    for path in (json_path, report_path):  # before the (possibly long) matching
        if path:
            check_file_writable(path, overwrite)
    pred_frame, truth_frame = read_layer(pred, pred_layer), read_layer(truth, truth_layer)
    check_layers(pred_frame, truth_frame, pred, truth)
    result = evaluate_frames(
        pred_frame,
        truth_frame,
        iou_threshold=iou_threshold,
        box=box,
        ignore=read_layer(ignore_path) if ignore_path else None,
        tiles=_tiles(tiles_path, tiles_from, tile_size, overlap, gsd, pred),
        class_field=class_field,
        compute_ap=not no_ap,
        shape_metrics=shape_metrics,
    )
    click.echo(result.table())
    if json_path:
        from geomask.atomic import write_text_atomic

        write_text_atomic(json_path, result.to_json() + "\n")
        log.info("wrote %s", json_path)
    if report_path:
        from geomask.report import error_picture, evaluation_report, write_report

        picture = error_picture(pred_frame, truth_frame, iou_threshold)
        write_report(report_path, evaluation_report(result, pred, truth, picture))
        log.info("wrote %s", report_path)
