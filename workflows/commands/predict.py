"""``geomask predict``: images in, polygons out, on Dask by default.

Exit codes (all of them in :mod:`workflows.exits`): 0 when every tile was processed; 2 for a usage,
config or input error (nothing is done); 3 when the job finished and wrote its outputs but some tiles
failed for a data reason (they are listed in ``RUN_DIR/failures.jsonl``, or in the log without
``--run-dir``, and redone by the next run with the same ``--run-dir``); 4 lost scheduler, 5 stalled,
130 Ctrl-C, 143 SIGTERM: nothing written, finished work kept in ``--run-dir``; 6 no cluster to run
on (the local one could not start, or no worker joined ``--scheduler``'s; nothing ran).
"""

from __future__ import annotations

import logging
import posixpath
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click

from geomask.config import Config, merge_overrides
from geomask.detect.base import ModelCard
from geomask.inference import TileFailure
from geomask.models import detector_options
from geomask.pipeline import run_serial
from geomask.remote import gdal_path, is_remote
from workflows.commands.options import config_option, device_option, overwrite_option, resolve_cli_config
from workflows.exits import EXIT_FAILURES
from workflows.inputs import OutputLayout, expand_inputs, plan_outputs

if TYPE_CHECKING:
    from workflows.upload import RemoteOutput

log = logging.getLogger("geomask")


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    required=True,
    help="Output file (.gpkg .geojson .shp .parquet .fgb), or a folder (existing, or ending with /) for one file per input.",
)
@config_option("YAML config (see configs/).")
@click.option("--weights", help="Model checkpoint (.pt) for the built-in Mask R-CNN; default: the bundled model.")
@click.option(
    "--ensemble",
    multiple=True,
    help="Another checkpoint run beside --weights and fused with it per tile (repeatable; detector.options.ensemble).",
)
@click.option("--detector", help="Detector factory 'package.module:callable' (default: the built-in Mask R-CNN).")
@click.option("--tile-size", type=int, help="Tile size in pixels (tiling.size_px).")
@click.option("--overlap", type=int, help="Tile overlap in pixels (tiling.overlap_px).")
@click.option(
    "--aoi",
    type=click.Path(dir_okay=False),
    help="Area of interest (any OGR vector, any CRS; tiling.aoi): only tiles touching it are read, only objects touching it written.",
)
@click.option(
    "--asset",
    help="For STAC inputs (an item or item collection, .json file or URL): the asset to read (default: 'visual', else the only GeoTIFF).",
)
@click.option("--batch-size", type=int, help="Tiles per detector call (detector.batch_size).")
@device_option("torch device for the built-in detector: auto, cpu, cuda, cuda:1.")
@click.option("--serial", is_flag=True, help="Run in this process without Dask (the reference path).")
@click.option("--scheduler", help="Address of a running Dask scheduler, e.g. tcp://head:8786 (dask.address); default: a local cluster.")
@click.option(
    "--cluster",
    "cluster_file",
    type=click.Path(dir_okay=False),
    help="Cluster file (configs/cluster-slurm.yaml, dask.cluster): geomask submits the workers as Slurm jobs and cancels them at the end.",
)
@click.option("--workers", type=click.IntRange(min=1), help="Worker processes of the local cluster (dask.n_workers).")
@click.option("--tiles-per-task", type=click.IntRange(min=1), help="Tiles per Dask task (dask.tiles_per_task).")
@click.option(
    "--stall-timeout",
    type=click.FloatRange(min=0),
    help="Stop (exit 5) when no task finished for this many seconds, naming the stuck workers; 0: never (dask.stall_timeout_s).",
)
@click.option("--gpu/--no-gpu", default=None, help="Run inference tasks on workers that offer resources GPU=1 (dask.gpu).")
@click.option("--run-dir", type=click.Path(file_okay=False), help="Folder that keeps finished tasks; re-run the same command to resume.")
@click.option("--fresh", is_flag=True, help="Discard what --run-dir holds and start again.")
@click.option(
    "--accept-repaired",
    is_flag=True,
    help="Resume although inputs changed on disk, if --run-dir's failure ledger names them (you repaired them): "
    "their failed tiles and every stored block that read those pixels are redone.",
)
@overwrite_option("Replace existing outputs (in a GeoPackage only geomask's layer, export.layer; other layers are kept).")
@click.option("--format", "fmt", default="gpkg", show_default=True, help="File format of per-input outputs when -o is a folder.")
@click.option("--progress-every", type=float, default=10.0, show_default=True, help="Seconds between progress lines.")
@click.option(
    "--preview/--no-preview", "with_preview", default=True, show_default=True, help="Write OUTPUT.preview.png, a quick-look picture."
)
def predict(
    inputs: tuple[str, ...],
    output: str,
    config_path: str | None,
    weights: str | None,
    ensemble: tuple[str, ...],
    detector: str | None,
    tile_size: int | None,
    overlap: int | None,
    aoi: str | None,
    asset: str | None,
    batch_size: int | None,
    device: str | None,
    serial: bool,
    scheduler: str | None,
    cluster_file: str | None,
    workers: int | None,
    tiles_per_task: int | None,
    stall_timeout: float | None,
    gpu: bool | None,
    run_dir: str | None,
    fresh: bool,
    accept_repaired: bool,
    overwrite: bool,
    fmt: str,
    progress_every: float,
    with_preview: bool,
) -> None:
    """Detect objects in INPUTS (GeoTIFFs, globs, .txt lists of them, or STAC items) and write georeferenced polygons to --output."""
    cfg = resolve_cli_config(
        config_path,
        {
            "detector.factory": detector,
            "tiling.size_px": tile_size,
            # Absolute (workers may run elsewhere); a remote file (s3://, https://, /vsi*) as the GDAL path that opens it.
            "tiling.aoi": (gdal_path(aoi) if is_remote(aoi) else str(Path(aoi).resolve())) if aoi else None,
            "detector.batch_size": batch_size,
            "dask.address": scheduler,
            "dask.cluster": str(Path(cluster_file).resolve()) if cluster_file else None,
            "dask.n_workers": workers,
            "dask.tiles_per_task": tiles_per_task,
            "dask.gpu": gpu,
            "dask.stall_timeout_s": stall_timeout,
        },
    )
    if overlap is not None:  # in pixels, replacing an overlap in metres from the config
        cfg = merge_overrides(cfg, {"tiling.overlap_px": overlap, "tiling.overlap_m": None})
    cfg = _with_detector_options(cfg, weights, device, list(ensemble) or None)
    paths = expand_inputs(inputs, asset)
    # Outputs are checked before anything runs; those a resumed --run-dir wrote itself may be replaced.
    owned: frozenset[Path] = frozenset()
    if run_dir and not serial:
        from workflows.store import recorded_outputs  # imports Dask: not for --serial

        owned = recorded_outputs(Path(run_dir))
    staged = _stage_remote(output, None if serial else run_dir)  # -o s3://...: written locally, uploaded whole at the end
    with _uploading(staged):
        output = staged.local if staged else output
        layout = plan_outputs(output, paths, fmt, cfg.export.layer, overwrite, owned)
        if staged is not None:
            staged.check(layout.paths, overwrite, owned)
        if serial:
            if scheduler or cluster_file or workers or run_dir or fresh or accept_repaired:
                raise click.UsageError(
                    "--serial runs in this process; drop --scheduler/--cluster/--workers/--run-dir/--fresh/--accept-repaired"
                )
            if layout.per_input is None and len(paths) > 1:
                raise click.UsageError("several inputs into one file need the Dask workflow; drop --serial or give a folder (-o out/)")
            targets = layout.per_input or dict(zip(paths, layout.paths, strict=True))
            failed: list[tuple[Path, TileFailure]] = []
            for src, out in targets.items():
                summary = run_serial(src, out, cfg, overwrite=layout.may_replace(out), progress_every_s=progress_every)
                failed += [(src, f) for f in summary.failures]
                if with_preview:
                    _preview(out, src)
                fails = [(str(src), f.tile, f.stage, f.error) for f in summary.failures]
                _report(out, [src], summary.seconds, summary.n_tiles, fails, summary.model_card)
                click.echo(
                    f"{summary.n_objects} objects from {summary.n_tiles} tiles in {summary.seconds:.1f} s "
                    f"(model load {summary.model_seconds:.1f} s; {summary.n_tiles_empty} empty and "
                    f"{summary.n_tiles_outside_aoi} outside the AOI skipped), "
                    f"{len(summary.failures)} failed tiles -> {summary.output}"
                )
            if failed:  # the same semantics as the Dask path: everything else is written, exit code 3
                for src, f in failed:
                    log.warning("failed: %s tile %d (%s): %s", src, f.tile, f.stage, f.error)
                click.echo(f"geomask: {len(failed)} tile(s) failed (first: {failed[0][1].error}); see the log above", err=True)
                sys.exit(EXIT_FAILURES)
            return
        _run_dask(cfg, paths, layout, run_dir, fresh, progress_every, with_preview, accept_repaired)


def _stage_remote(output: str, run_dir: str | None) -> RemoteOutput | None:
    if not is_remote(output):
        return None
    from workflows.upload import stage

    return stage(output, run_dir)


@contextmanager
def _uploading(staged: RemoteOutput | None) -> Iterator[None]:
    """Upload the staged outputs when the job has written them: on success, or with failed tiles (exit 3) as
    a local run keeps them; never after a crash, an interrupt or a lost cluster. The staging folder goes."""
    if staged is None:
        yield
        return
    try:
        yield
    except SystemExit as exit_:
        if exit_.code == EXIT_FAILURES:
            _upload(staged)
        raise
    else:
        _upload(staged)
    finally:
        staged.discard()


def _upload(staged: RemoteOutput) -> None:
    urls = staged.upload()
    click.echo(f"uploaded {len(urls)} file(s) to {staged.url}: {', '.join(posixpath.basename(u) for u in urls)}")


def _report(
    output: Path, images: list[Path], seconds: float, n_tiles: int, failures: list[tuple[str, int, str, str]], card: ModelCard
) -> None:
    """Write ``<output>.report.html``; a failure here is a warning, the output is already written."""
    from geomask.errors import first_line
    from workflows.commands.preview import run_report_of

    try:
        run_report_of(output, images, seconds, n_tiles, failures, card)
    except Exception as err:  # noqa: BLE001 - the report is a convenience: the run's result stands
        log.warning("no report for %s: %s", output, first_line(err, with_type=True))


def _preview(output: Path, image: Path | None) -> None:
    """Write the quick-look beside ``output``; a failure here is a warning, the output is already written."""
    from geomask.errors import first_line
    from workflows.commands.preview import quick_look

    try:
        quick_look(output, image)
    except Exception as err:  # noqa: BLE001 - the picture is a convenience: the run's result stands
        log.warning("no preview for %s: %s", output, first_line(err, with_type=True))


def _with_detector_options(cfg: Config, weights: str | None, device: str | None, ensemble: list[str] | None = None) -> Config:
    # Which flags a detector takes, and which are paths, is the detector's rule (geomask.models).
    given = {"weights": weights, "device": device, "ensemble": ensemble}
    options = detector_options(cfg.detector.factory).with_flags(cfg.detector.options, given)
    return merge_overrides(cfg, {"detector.options": options})


def _run_dask(
    cfg: Config,
    paths: list[Path],
    layout: OutputLayout,
    run_dir: str | None,
    fresh: bool,
    progress_every: float,
    with_preview: bool,
    accept_repaired: bool = False,
) -> None:
    from geomask.raster import inspect_raster
    from geomask.remote import is_remote
    from workflows.cluster import connect, load_cluster_file, remote_access
    from workflows.job import run_job
    from workflows.store import open_run_dir

    if cfg.dask.cluster is not None:  # a bad cluster file fails here, in one line, before anything is written
        load_cluster_file(cfg.dask.cluster)
    for path in paths:  # bad inputs fail here, in one line, before a cluster starts (workers check again when planning)
        inspect_raster(path)
    store = open_run_dir(Path(run_dir), paths, cfg, fresh, accept_repaired) if run_dir else None

    root = logging.getLogger().getEffectiveLevel()
    logging.getLogger("distributed").setLevel(max(root, logging.WARNING) if root > logging.DEBUG else root)  # -vv shows Dask's own log
    started = time.perf_counter()
    with connect(cfg.dask) as client:
        cluster_seconds = time.perf_counter() - started
        if client.dashboard_link and cfg.dask.dashboard and not logging.getLogger("workflows.cluster").isEnabledFor(logging.INFO):
            click.echo(f"dashboard: {client.dashboard_link}", err=True)
        # Workers read remote inputs (and a remote AOI, when they plan) with the client's credentials.
        with remote_access(client, any(is_remote(p) for p in paths) or is_remote(cfg.tiling.aoi or "")):
            summary = run_job(client, paths, layout, cfg, store, progress_every)
    if with_preview:
        images = {out: src for src, out in (layout.per_input or {}).items()}
        for out in summary.outputs:  # one file from several inputs is drawn without imagery
            _preview(out, images.get(out, paths[0] if len(paths) == 1 else None))
    for out in summary.outputs:
        srcs = [src for src, o in (layout.per_input or {}).items() if o == out] or paths
        fails = [(f.source, f.tile, f.stage, f.error) for f in summary.failures if f.source in {str(s) for s in srcs}]
        _report(out, srcs, summary.seconds, summary.n_tiles, fails, summary.model_card)
    outputs = ", ".join(str(p) for p in summary.outputs) or "nothing"
    click.echo(
        f"{summary.n_objects} objects from {summary.n_tiles} tiles of {summary.n_inputs} input(s) in {summary.seconds:.1f} s "
        f"({summary.tiles_per_s:.1f} tiles/s; {summary.tasks_computed} tasks computed, {summary.tasks_loaded} resumed; "
        f"before that: cluster start {cluster_seconds:.1f} s, model load {summary.model_seconds:.1f} s; "
        f"{summary.n_tiles_empty} empty and {summary.n_tiles_outside_aoi} outside the AOI skipped), "
        f"{summary.failed_tiles} failed tiles -> {outputs}"
    )
    if summary.failures:
        ledger = f"{run_dir}/failures.jsonl" if run_dir else "the log above"
        click.echo(f"geomask: {summary.failed_tiles} tile(s) failed (first: {summary.failures[0].error}); see {ledger}", err=True)
        for failure in summary.failures if not run_dir else []:
            log.warning("failed: %s %s tile %d (%s): %s", failure.source, failure.block, failure.tile, failure.stage, failure.error)
        sys.exit(EXIT_FAILURES)
