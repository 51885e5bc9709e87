"""``geomask preview``: the quick-look picture of an output; also what predict calls after writing each output."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from geomask.detect.base import ModelCard

log = logging.getLogger("geomask")


def quick_look(output: Path, image: Path | None, png: Path | None = None, layer: str | None = None) -> Path:
    """Draw ``output``'s polygons over ``image`` to ``png`` (default ``<output>.preview.png``).

    The crops use the working GSD predict recorded in ``<output>.config.yaml`` when it is there.
    """
    from geomask.config import load_config
    from geomask.evaluate import read_layer
    from geomask.export import config_sidecar, format_for
    from geomask.preview import preview_path, render_preview

    sidecar = config_sidecar(output)
    cfg = load_config(sidecar) if sidecar.is_file() else None
    if layer is None and cfg is not None and format_for(output).layer_name:
        layer = cfg.export.layer
    frame = read_layer(output, layer)
    gsd = cfg.raster.gsd_m if cfg is not None else None
    return render_preview(frame, png or preview_path(output), image, gsd, title=f"{output.name}: {len(frame)} objects")


@click.command()
@click.argument("output", type=click.Path(exists=True, dir_okay=False))
@click.option("--image", type=click.Path(exists=True, dir_okay=False), help="The raster the polygons came from, drawn beneath them.")
@click.option("--layer", help="Layer of OUTPUT to draw (default: export.layer from its .config.yaml, else the only one).")
@click.option("-o", "--png", type=click.Path(dir_okay=False), help="Picture to write (default: OUTPUT.preview.png).")
def preview(output: str, image: str | None, layer: str | None, png: str | None) -> None:
    """Draw OUTPUT's polygons over the raster's overview, with crops where objects are densest, to a PNG."""
    from geomask.raster import inspect_raster

    if image is not None:
        inspect_raster(image)  # a bad raster fails in one line
    written = quick_look(Path(output), Path(image) if image else None, Path(png) if png else None, layer)
    click.echo(f"preview -> {written}")


def run_report_of(
    output: Path,
    images: list[Path],
    seconds: float,
    n_tiles: int,
    failures: list[tuple[str, int, str, str]],
    card: ModelCard | None = None,
) -> Path:
    """Write ``<output>.report.html`` for a finished predict run, embedding the quick-look when it was drawn.

    Args:
        output: The output written.
        images: The inputs that went into it.
        seconds: Wall time of the run.
        n_tiles: Tiles processed.
        failures: ``(input, tile, stage, error)`` of each failed tile.
        card: What the model's file states about its accuracy (the detector's :class:`ModelCard`).
    """
    from geomask.config import load_config
    from geomask.evaluate import read_layer
    from geomask.export import config_sidecar, format_for
    from geomask.preview import preview_path
    from geomask.raster import inspect_raster, working_grid
    from geomask.report import FailedTile, InputFacts, RunFacts, card_rows, png_data_uri, report_path, run_report, write_report
    from geomask.tiling import plan_tiles

    sidecar = config_sidecar(output)
    cfg = load_config(sidecar)
    frame = read_layer(output, cfg.export.layer if format_for(output).layer_name else None)
    inputs = []
    for image in images:
        info = inspect_raster(image)
        grid = working_grid(info, cfg.raster.gsd_m)
        size, overlap = cfg.tiling.size_px or 512, cfg.tiling.overlap_px or 0
        n = len(plan_tiles(grid.width, grid.height, size, overlap))
        inputs.append(InputFacts(str(image), info.width, info.height, info.crs.to_string(), info.gsd_m, grid.gsd_m, n))
    classes = sorted({str(c) for c in frame["class"]}) if "class" in frame and len(frame) else []
    model = {
        "name": str(frame["model"].iloc[0]) if "model" in frame and len(frame) else cfg.detector.factory or "built-in Mask R-CNN",
        "classes found": ", ".join(classes) or "none",
        "working GSD m": f"{cfg.raster.gsd_m:g}" if cfg.raster.gsd_m else "native",
        "tile size px": str(cfg.tiling.size_px),
        "min area m²": f"{cfg.vectorize.min_area_m2:g}",
        **card_rows(card or ModelCard()),
    }
    facts = RunFacts(inputs, model, sidecar.read_text(), seconds, n_tiles, [FailedTile(*f) for f in failures])
    png = preview_path(output)
    page = run_report(frame, facts, str(output), png_data_uri(png) if png.is_file() else None)
    return write_report(report_path(output), page)
