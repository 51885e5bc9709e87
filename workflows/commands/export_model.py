"""``geomask export-model``: a checkpoint or shipped model in, one self-contained ONNX file out."""

from __future__ import annotations

from pathlib import Path

import click

from geomask.errors import ExportError


@click.command("export-model")
@click.argument("weights")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Destination .onnx file.")
@click.option(
    "--score-threshold",
    type=click.FloatRange(0.0, 1.0),
    help="Lowest score the graph keeps (default: the checkpoint's, else 0.5); predict can raise it, never lower it.",
)
@click.option(
    "--nms-threshold", type=click.FloatRange(0.0, 1.0, min_open=True), help="Box NMS IoU fixed in the graph (default: the checkpoint's)."
)
@click.option(
    "--detections-per-img", type=click.IntRange(min=1), help="Most detections per tile, fixed in the graph (default: the checkpoint's)."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def export_model(
    weights: str, output: str, score_threshold: float | None, nms_threshold: float | None, detections_per_img: int | None, overwrite: bool
) -> None:
    """Export WEIGHTS (a checkpoint, or a shipped model name such as 'buildings') to ONNX for `predict --weights model.onnx`.

    The file holds the whole Mask R-CNN (post-processing included, any tile size) and the checkpoint's
    metadata, so ONNX Runtime alone runs it: no torch on the predicting machine.
    """
    out = Path(output)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass --overwrite to replace it")
    from geomask.detect.onnx_export import export_onnx  # torch: only when exporting

    export_onnx(weights, out, score_threshold=score_threshold, nms_threshold=nms_threshold, detections_per_img=detections_per_img)
    click.echo(f"exported {weights} -> {out} ({out.stat().st_size / 2**20:.1f} MiB)")
