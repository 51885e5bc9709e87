"""``geomask train``: GeoTIFFs and vector labels in, a geomask checkpoint out."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Any

import click
import yaml

from geomask.errors import ConfigError, ExportError, first_line
from workflows.commands.options import config_option, device_option, overwrite_option

log = logging.getLogger("geomask")


def _load_yaml(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read training config {path} ({first_line(err)}); give a YAML file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of training settings")
    return dict(data.get("train", data))


def _load_mapping(path: str, what: str) -> dict[str, Any]:
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}  # JSON is YAML
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read {what} {path} ({first_line(err)}); give a YAML or JSON file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of {what}, e.g. {{score_threshold: 0.6, tta: 4}}")
    return dict(data)


def _command_line(ctx: click.Context) -> str:
    """Rebuild an equivalent command line from the parsed options (recorded in the checkpoint)."""
    words = ctx.command_path.split()
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        flag = next((o for o in param.opts if o.startswith("--")), param.opts[0])
        if value is None or value is False or value == ():
            continue
        if value is True:
            words.append(flag)
        else:
            for v in value if isinstance(value, tuple) else (value,):
                words += [flag, str(v)]
    return shlex.join(words)


def _check_output(output: Path, replace: bool) -> None:
    """Fail before training starts if the checkpoints cannot be written, or would replace a model unasked.

    ``--resume`` continues the files that are there, so it replaces them as ``--overwrite`` does.
    """
    from geomask.export import check_file_writable

    beside = [output.with_name(output.name + ext) for ext in (".last.pt", ".log.jsonl")]
    check_file_writable(output, replace, beside)
    if not replace and beside[0].exists():
        raise ExportError(f"{beside[0]} exists (an earlier run); add --resume to continue it or --overwrite to start again")


@click.command()
@click.option("--images", "images", multiple=True, required=True, help="Training rasters (path or quoted glob; repeatable).")
@click.option("--labels", "labels", multiple=True, required=True, help="Vector labels in any OGR format/CRS (repeatable).")
@click.option("-o", "--output", required=True, help="Best checkpoint (.pt); OUTPUT.last.pt and OUTPUT.log.jsonl go beside it.")
@config_option("YAML of training settings (keys of TrainSettings).")
@click.option(
    "--arch",
    help="resnet18_fpn (CPU-friendly, default), resnet18_gn_fpn (the same with GroupNorm), resnet50_fpn, resnet50_fpn_v2, resnet101_fpn, tiny_fpn.",
)
@click.option("--iterations", type=int, help="Optimiser steps in total.")
@click.option("--epochs", type=int, help="Validation rounds; iterations = epochs x --val-every.")
@click.option("--val-every", type=int, help="Iterations per epoch (validation and best checkpoint).")
@click.option("--val-images", multiple=True, help="Validation rasters (held out from training; default: the last area folder).")
@click.option(
    "--no-val",
    "no_val",
    is_flag=True,
    help="Train on every image and validate on none (with --keep last): the final run of a recipe chosen by cross-validation.",
)
@click.option("--val-labels", multiple=True, help="Validation labels (default: --labels).")
@click.option("--gsd", "gsd_m", type=float, help="Resample chips to this ground sample distance in metres.")
@click.option("--native-gsd", is_flag=True, help="Train at the rasters' own resolution (no resampling).")
@click.option("--chip-size", "chip_size_px", type=int, help="Chip side in pixels (the model's tile size).")
@click.option("--batch-size", type=int, help="Chips per iteration.")
@click.option("--lr", type=float, help="Peak learning rate (AdamW).")
@click.option("--rois-per-image", type=int, help="RoIs per chip for the box/mask heads (fewer: faster on CPU).")
@click.option("--init", help="Start from a geomask checkpoint, or 'coco'/'coco_v2' (torchvision, needs internet once).")
@click.option("--classes", help="Comma-separated class names (default: building).")
@click.option("--class-field", help="Label attribute holding the class name.")
@click.option("--boxes", "boxes_as_ellipses", is_flag=True, default=None, help="Labels are boxes: train on the inscribed ellipse.")
@device_option("auto, cpu, cuda, cuda:N.")
@click.option("--threads", type=int, help="torch CPU threads.")
@click.option(
    "--amp",
    type=click.Choice(["auto", "on", "off"]),
    help="Mixed precision: auto (default: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32), on (force), off (fp32).",
)
@click.option("--max-minutes", type=float, help="Stop cleanly after this many minutes.")
@click.option("--attribution", help="Credit for the training data (stored in the checkpoint).")
@click.option("--seed", type=int, help="Random seed.")
@click.option("--ema", "ema_decay", type=float, help="Average the weights with this decay (e.g. 0.998); validate and save the average.")
@click.option("--keep", type=click.Choice(["best", "last"]), help="OUTPUT holds the best-validating weights (default) or the last.")
@click.option("--copy-paste", type=float, help="Probability per chip of pasting objects from another chip (Simple Copy-Paste).")
@click.option("--hue-jitter", type=float, help="Largest hue rotation, as a fraction of the colour wheel (e.g. 0.05).")
@click.option("--saturation-jitter", type=float, help="Saturation factor drawn from [1-s, 1+s] (e.g. 0.3).")
@click.option("--blur", type=float, help="Probability per chip of a Gaussian blur (sigma 0.5-1.5 px).")
@click.option("--noise", type=float, help="Largest std of added Gaussian noise, in normalised pixel units (e.g. 0.03).")
@click.option("--jpeg", type=float, help="Probability per chip of a JPEG round trip at quality 30-90.")
@click.option(
    "--hard-negatives",
    type=float,
    help="Probability per chip of a chip centred where the model reported an object no label has "
    "(mined every hard_negative_every iterations, default 50).",
)
@click.option(
    "--inference-defaults",
    "inference_path",
    type=click.Path(dir_okay=False, exists=True),
    help="YAML/JSON mapping of inference defaults stored in the checkpoint (score_threshold, tta, min_area_m2, ...).",
)
@click.option("--resume", is_flag=True, help="Continue from OUTPUT.last.pt.")
@overwrite_option("Replace an existing OUTPUT (and OUTPUT.last.pt, OUTPUT.log.jsonl) instead of refusing.")
def train(
    images: tuple[str, ...],
    labels: tuple[str, ...],
    output: str,
    config_path: str | None,
    val_images: tuple[str, ...],
    val_labels: tuple[str, ...],
    no_val: bool,
    native_gsd: bool,
    epochs: int | None,
    resume: bool,
    overwrite: bool,
    classes: str | None,
    inference_path: str | None,
    **options: Any,
) -> None:
    """Train a Mask R-CNN on rasters and vector labels; write the best checkpoint to --output."""
    # torch is imported when training runs, not when the CLI starts (declared in pyproject's import contracts).
    from geomask.detect.training import TrainSettings
    from geomask.detect.training import train as run_training

    values = _load_yaml(config_path)
    if options.get("amp") is not None:
        options["amp"] = {"auto": "auto", "on": True, "off": False}[options["amp"]]
    values.update({k: v for k, v in options.items() if v is not None})
    if native_gsd:
        values["gsd_m"] = None
    if classes:
        values["classes"] = tuple(c.strip() for c in classes.split(",") if c.strip())
    if inference_path is not None:
        values["inference"] = {**dict(values.get("inference") or {}), **_load_mapping(inference_path, "inference defaults")}
    if epochs is not None:
        values["iterations"] = epochs * int(values.get("val_every", TrainSettings.model_fields["val_every"].default))
    settings = TrainSettings(**values)
    if no_val and val_images:
        raise ConfigError("--no-val and --val-images contradict each other; give one of them")
    _check_output(Path(output), resume or overwrite)
    result = run_training(
        list(images),
        list(labels),
        output,
        settings,
        val_images=[] if no_val else list(val_images) or None,
        val_labels=list(val_labels) or None,
        resume=resume,
        command=_command_line(click.get_current_context()),
    )
    if settings.keep == "last":
        last = result.history[-1].get("val_f1") if result.history else None
        tail = f", last validation F1 {last:.3f}" if last is not None else ""
    else:
        best = result.best_metrics.get("val_f1")
        tail = f", best validation F1 {best:.3f}" if best is not None else ""
    click.echo(f"{result.iterations} iterations in {result.seconds / 60:.1f} min{tail} -> {result.output}")
