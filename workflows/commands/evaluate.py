"""``geomask evaluate``: score predicted polygons against truth polygons."""

from __future__ import annotations

import logging
from pathlib import Path

import click
import geopandas as gpd

log = logging.getLogger("geomask")


def _tiles(tiles_path: str | None, tiles_from: str | None, tile_size: int | None, overlap: int | None) -> gpd.GeoSeries | None:
    """Build the tile read windows for seam statistics from a tiles layer or a raster plus tiling."""
    from geomask.errors import ConfigError
    from geomask.evaluate import read_layer, tile_polygons

    if tiles_path and tiles_from:
        raise click.UsageError("give either --tiles or --tiles-from, not both")
    if tiles_path:
        frame = read_layer(tiles_path)
        return frame.geometry
    if tiles_from is None:
        if tile_size is not None or overlap is not None:
            raise click.UsageError("--tile-size/--overlap need --tiles-from RASTER (the raster the predictions came from)")
        return None
    if tile_size is None:
        raise ConfigError("--tiles-from needs --tile-size (and --overlap, default tile size / 8) as used by predict")
    from geomask.raster import inspect_raster
    from geomask.tiling import plan_tiles

    info = inspect_raster(tiles_from)
    plan = plan_tiles(info.width, info.height, tile_size, overlap if overlap is not None else max(1, tile_size // 8))
    return gpd.GeoSeries(tile_polygons(plan, info.transform), crs=info.crs)


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
@click.option("--tiles-from", type=click.Path(dir_okay=False), help="Raster the predictions came from (tiled by --tile-size, --overlap).")
@click.option("--tile-size", type=int, help="Tile size in pixels used by predict (with --tiles-from).")
@click.option("--overlap", type=int, help="Tile overlap in pixels used by predict (with --tiles-from).")
@click.option("--no-ap", is_flag=True, help="Skip COCO AP (faster on very large layers).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the results as JSON here.")
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
    tile_size: int | None,
    overlap: int | None,
    no_ap: bool,
    json_path: str | None,
) -> None:
    """Score PRED polygons against TRUTH polygons: precision, recall, F1, AP, seams.

    Predictions are reprojected to the truth's CRS. Matching is one-to-one at IoU >= --iou.
    """
    from geomask.evaluate import check_iou, evaluate_frames, read_layer

    check_iou(iou_threshold)
    result = evaluate_frames(
        read_layer(pred, pred_layer),
        read_layer(truth, truth_layer),
        iou_threshold=iou_threshold,
        box=box,
        ignore=read_layer(ignore_path) if ignore_path else None,
        tiles=_tiles(tiles_path, tiles_from, tile_size, overlap),
        class_field=class_field,
        compute_ap=not no_ap,
    )
    click.echo(result.table())
    if json_path:
        from geomask.export import write_text_atomic

        out = Path(json_path)
        if not out.parent.is_dir():
            from geomask.errors import ExportError

            raise ExportError(f"folder {out.parent} for --json does not exist; create it first")
        write_text_atomic(out, result.to_json() + "\n")
        log.info("wrote %s", out)
