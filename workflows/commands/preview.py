"""``geomask preview``: the quick-look picture of an output; also what predict calls after writing each output."""

from __future__ import annotations

import logging
from pathlib import Path

import click

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
