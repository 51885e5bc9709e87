"""``geomask import-model``: other frameworks' Mask R-CNN checkpoints in, geomask checkpoints out."""

from __future__ import annotations

from pathlib import Path

import click

from geomask.errors import ConfigError, ExportError
from workflows.commands.options import overwrite_option


@click.group("import-model")
def import_model() -> None:
    """Convert a Mask R-CNN trained in another framework into a geomask checkpoint (`predict --weights model.pt`)."""


@import_model.command("detectron2")
@click.argument("weights", type=click.Path(dir_okay=False))
@click.option(
    "--config",
    "d2_config",
    required=True,
    type=click.Path(dir_okay=False),
    help="The model's Detectron2 YAML config (_BASE_ files must be local).",
)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Destination geomask checkpoint (.pt).")
@click.option("--classes", help="Class names in the model's class order, comma-separated (default: class_0, class_1, ...).")
@click.option("--tile-size", type=click.IntRange(min=32), default=512, show_default=True, help="Tile size predict defaults to, pixels.")
@click.option(
    "--gsd", type=click.FloatRange(min=0.0, min_open=True), help="GSD of the training imagery in metres; predict resamples to it."
)
@click.option(
    "--input-format",
    type=click.Choice(["BGR", "RGB"]),
    help="Channel order the model was trained on, overriding INPUT.FORMAT (e.g. a BGR model fed RGB GeoTIFFs in training).",
)
@click.option("--attribution", default="", help="Credit owed to the model's authors, stored in the checkpoint.")
@overwrite_option("Replace an existing output file.")
def detectron2(
    weights: str,
    d2_config: str,
    output: str,
    classes: str | None,
    tile_size: int,
    gsd: float | None,
    input_format: str | None,
    attribution: str,
    overwrite: bool,
) -> None:
    """Convert a Detectron2 Mask R-CNN R50/R101-FPN checkpoint (WEIGHTS: .pth or .pkl) to a geomask checkpoint.

    Nothing in WEIGHTS is executed: it is read as arrays only. The config's test-time settings
    (SCORE_THRESH_TEST, NMS_THRESH_TEST, DETECTIONS_PER_IMAGE) become the checkpoint's inference defaults.
    """
    out = Path(output)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass --overwrite to replace it")
    names = None
    if classes is not None:
        names = [c.strip() for c in classes.split(",")]
        if not all(names):
            raise ConfigError(f"--classes {classes!r} has an empty name; give names separated by commas, e.g. --classes tree")
    from geomask.detect.d2_import import import_detectron2  # torch: only when converting

    path, meta = import_detectron2(
        weights, d2_config, out, classes=names, tile_size_px=tile_size, gsd_m=gsd, input_format=input_format, attribution=attribution
    )
    click.echo(f"converted {weights} -> {path} ({meta.arch}, classes {', '.join(meta.classes)}; {path.stat().st_size / 2**20:.1f} MiB)")
