"""The serial run of every step, without Dask: the reference the distributed path is checked against.

raster → tiling → detect → merge → vectorize → export. The pieces are also what ``workflows`` runs
inside Dask tasks, so the serial and distributed paths share every line that touches pixels.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from geomask.config import Config, ShapeClassConfig, merge_overrides
from geomask.coverage import Coverage, aoi_in_pixels, load_aoi, raster_coverage, select_tiles
from geomask.detect.base import Detector, ModelCard, ModelHints, load_detector, model_card
from geomask.errors import ConfigError, DetectorError
from geomask.export import check_writable, to_frame, write_output
from geomask.inference import TileFailure, run_tiles
from geomask.instances import Instance
from geomask.merge import merge_across_tiles
from geomask.normalize import compute_norm_stats
from geomask.progress import SerialProgress
from geomask.raster import (
    Grid,
    NormStats,
    RasterInfo,
    RasterReader,
    describe_resampling,
    inspect_raster,
    resample_factor,
    resolve_bands,
    working_grid,
)
from geomask.shape import ShapeRule, shape_features
from geomask.tiling import Tile, default_overlap_px, plan_tiles
from geomask.vectorize import Feature, sort_features, vectorize_instances

log = logging.getLogger(__name__)
DEFAULT_TILE_SIZE_PX = 512


@dataclass(frozen=True)
class RasterPlan:
    """Everything needed to process one raster, computed once (small and picklable)."""

    info: RasterInfo
    grid: Grid
    bands: list[int]
    stats: NormStats
    tiles: list[Tile]  # only the tiles that may hold valid pixels and touch the AOI; indexes are the full grid's
    config: Config  # resolved: no None left for tiling sizes
    n_tiles_empty: int = 0  # tiles of the full grid that provably hold no valid pixel: never planned
    n_tiles_outside_aoi: int = 0  # tiles of the full grid that miss the AOI: never planned
    aoi: BaseGeometry | None = None  # the AOI in map coordinates (the raster's CRS); objects must touch it

    @property
    def tile_lookup(self) -> dict[int, Tile]:
        """Tiles by index: the plan has holes where tiles were skipped, so a list position is not an index."""
        return {t.index: t for t in self.tiles}

    def reader(self) -> RasterReader:
        return RasterReader(self.info, self.grid, self.bands, self.stats, self.config.raster.expand_gray)

    @property
    def tile_channels(self) -> int:
        """Bands per tile the reader produces (a single gray band is expanded to 3 when ``expand_gray``)."""
        return 3 if len(self.bands) == 1 and self.config.raster.expand_gray else len(self.bands)


def check_channels(plan: RasterPlan, detector_name: str, hints: ModelHints) -> None:
    """Raise :class:`DetectorError` when ``plan``'s tiles have another band count than the model takes.

    Checked before any tile is read, so a wrong ``raster.bands`` stops the job in one line.
    """
    want = hints.channels
    if want is None or plan.tile_channels == want:
        return
    where = f"{plan.info.path}: {detector_name} takes {want}-band tiles but raster.bands selects {plan.bands}"
    if len(plan.bands) == 1 and want in (1, 3):  # a gray band is expanded to 3, or not
        fix = f"set raster.expand_gray: {'false' if want == 1 else 'true'}"
    elif plan.info.count >= want:
        fix = f"set raster.bands to {want} of the raster's {plan.info.count} bands (e.g. {list(range(1, want + 1))})"
    else:
        fix = f"the raster has only {plan.info.count} band(s): use imagery with {want} bands or a model trained on {plan.info.count}"
    raise DetectorError(f"{where}; {fix}")


MILD_RESAMPLING = 1.5  # beyond this (either way) a run is allowed but warned about: the model sees imagery unlike its training


def warn_resampling(plan: RasterPlan) -> None:
    """Warn once per raster when its working grid is more than 1.5x finer or coarser than the source."""
    if plan.grid.resampled:
        f = resample_factor(plan.info, plan.grid.gsd_m)
        if max(f, 1.0 / f) > MILD_RESAMPLING:
            log.warning(
                "%s: %s; results are best on imagery near the model's GSD", plan.info.path, describe_resampling(plan.info, plan.grid.gsd_m)
            )


@dataclass
class RunSummary:
    """What a serial run did, for logs and the CLI's closing line.

    Counts carry the names of the Dask job's ``JobSummary`` (``n_objects``, ``model_seconds``...); a
    serial run writes one file, so ``output`` rather than ``outputs``.
    """

    output: Path | None
    n_tiles: int = 0
    n_tiles_skipped: int = 0
    n_tiles_empty: int = 0
    n_tiles_outside_aoi: int = 0
    n_instances: int = 0
    n_objects: int = 0
    seconds: float = 0.0  # the whole run, model load included
    model_seconds: float = 0.0  # of which building the detector (loading the model)
    run_id: str = ""
    failures: list[TileFailure] = field(default_factory=list)
    model_card: ModelCard = field(default_factory=ModelCard)  # what the model's file states (the report shows it)


def build_detector(config: Config) -> Detector:
    """Build the detector the config names (the bundled Mask R-CNN by default)."""
    return load_detector(config.detector.factory, config.detector.options)


def resolve_config(config: Config, hints: ModelHints) -> Config:
    """Fill unset raster/tiling/vectorize settings from the model's hints (what it was trained and measured with).

    A vectorize setting at its default (0: off) counts as unset, as the normalisation mode ``auto`` does.
    """
    updates: dict[str, object] = {}
    if config.tiling.size_px is None:
        updates["tiling.size_px"] = hints.tile_size_px or DEFAULT_TILE_SIZE_PX
    if config.raster.gsd_m is None and hints.gsd_m is not None:
        updates["raster.gsd_m"] = hints.gsd_m
    if config.raster.bands is None and hints.bands is not None:
        updates["raster.bands"] = list(hints.bands)
    if config.raster.normalize.mode == "auto" and hints.normalize_mode is not None:
        updates["raster.normalize.mode"] = hints.normalize_mode
        if hints.percentiles is not None:
            updates["raster.normalize.percentiles"] = list(hints.percentiles)
    if config.vectorize.min_area_m2 == 0.0 and hints.min_area_m2 is not None:
        updates["vectorize.min_area_m2"] = hints.min_area_m2
    if config.vectorize.simplify_tolerance_m == 0.0 and hints.simplify_tolerance_m is not None:
        updates["vectorize.simplify_tolerance_m"] = hints.simplify_tolerance_m
    return merge_overrides(config, updates) if updates else config


def plan_raster(path: str | Path, config: Config, *, info: RasterInfo | None = None) -> RasterPlan:
    """Inspect a raster, fix its working grid, normalisation and tiles (resolved ``config`` expected).

    ``info`` is :func:`~geomask.raster.inspect_raster`'s answer for ``path`` when the caller has it already
    (the file is then not inspected again).
    """
    info = info if info is not None else inspect_raster(path)
    grid = working_grid(info, config.raster.gsd_m, config.raster.max_resample_factor)
    bands = resolve_bands(info, config.raster.bands)
    t_cov = time.perf_counter()
    coverage = raster_coverage(info, config.tiling.scan_mask) if config.tiling.skip_empty else Coverage.everywhere(info.width, info.height)
    t_cov = time.perf_counter() - t_cov
    norm = config.raster.normalize
    stats = compute_norm_stats(
        info,
        grid,
        bands,
        norm.mode,
        norm.percentiles,
        norm.sample_windows,
        norm.sample_size_px,
        may_hold=lambda w: coverage.window_may_hold(grid, w),
    )
    size = config.tiling.size_px or DEFAULT_TILE_SIZE_PX
    if config.tiling.overlap_px is not None:
        overlap = config.tiling.overlap_px
    elif config.tiling.overlap_m is not None:
        overlap = max(1, round(config.tiling.overlap_m / grid.gsd_m))
    else:
        overlap = default_overlap_px(size)
    resolved = merge_overrides(config, {"tiling.size_px": size, "tiling.overlap_px": overlap, "tiling.overlap_m": None})
    aoi = load_aoi(config.tiling.aoi, info.crs) if config.tiling.aoi is not None else None
    aoi_px = aoi_in_pixels(aoi, grid.transform) if aoi is not None else None
    every = plan_tiles(grid.width, grid.height, size, overlap)
    tiles, n_empty, n_outside = select_tiles(every, grid, coverage, aoi_px, margin_px=overlap)
    if aoi is not None and not tiles:
        log.warning("%s: the AOI %s does not touch the raster's valid pixels; nothing to detect", info.path, config.tiling.aoi)
    log.info(
        "%s: %dx%d px (%.3f m), %d of %d tiles of %d px planned (%d empty by %s in %.1f s, %d outside the AOI), overlap %d px",
        info.path,
        grid.width,
        grid.height,
        grid.gsd_m,
        len(tiles),
        len(every),
        size,
        n_empty,
        coverage.method,
        t_cov,
        n_outside,
        overlap,
    )
    return RasterPlan(info, grid, bands, stats, tiles, resolved, n_empty, n_outside, aoi)


@dataclass
class Detections:
    """Per-tile instances of some tiles of a raster (cleaned, tagged), the nodata tiles, the failed tiles."""

    instances: list[Instance]
    n_skipped: int = 0
    failures: list[TileFailure] = field(default_factory=list)


def detect_tiles(
    plan: RasterPlan, tiles: Sequence[Tile], detector: Detector, batch_size: int, progress: Callable[[int, int, int], None] | None = None
) -> Detections:
    """Read, detect and clean every tile in ``tiles`` (:func:`geomask.inference.run_tiles`)."""
    found: list[Instance] = []
    with plan.reader() as reader:
        run = run_tiles(reader, tiles, detector, batch_size, found.extend, progress=progress)
    return Detections(found, run.n_skipped, run.failures)


def vectorize_plan(plan: RasterPlan, instances: Iterable[Instance]) -> list[Feature]:
    """Vectorize merged instances of ``plan`` into map-coordinate features, in a stable order."""
    v = plan.config.vectorize
    feats = vectorize_instances(instances, plan.grid.transform, plan.info.crs, plan.grid.gsd_m, v.simplify_tolerance_m, v.min_area_m2)
    return sort_features(feats)


def in_aoi(plan: RasterPlan, feats: Sequence[Feature]) -> list[Feature]:
    """Keep the features that touch the plan's AOI (all without one): whole, not clipped to it."""
    if plan.aoi is None:
        return list(feats)
    keep = shapely.intersects(plan.aoi, np.array([f.geometry for f in feats], dtype=object))
    return [f for f, k in zip(feats, keep.tolist(), strict=True) if k]


def shape_rules(plan: RasterPlan, classes: Sequence[str]) -> tuple[dict[int, ShapeRule], ShapeRule]:
    """Turn ``vectorize.shape`` into per-class rules in working pixels (a class named by name or id as text).

    Raises:
        ConfigError: A per-class override names no class of the model.
    """
    shape = plan.config.vectorize.shape
    px = plan.grid.gsd_m

    def rule(settings: ShapeClassConfig) -> ShapeRule:
        return ShapeRule(
            method=settings.method or "pixel",
            tolerance_px=settings.tolerance_m / px if settings.tolerance_m is not None else 3.0,
            simplify_px=settings.simplify_m / px if settings.simplify_m is not None else 1.0,
            diagonals=bool(settings.diagonals),
            circles=bool(settings.circles),
            max_area_change=settings.max_area_change or 0.2,
        )

    base = ShapeClassConfig.model_validate(shape.model_dump(exclude={"classes"}))
    rules: dict[int, ShapeRule] = {}
    for key, over in shape.classes.items():
        ids = [i for i, name in enumerate(classes) if key in (name, str(i))]
        if not ids:
            raise ConfigError(f"vectorize.shape.classes: {key!r} is not a class of the model (classes: {list(classes)}); use one of them")
        merged = base.model_copy(update=over.model_dump(exclude_none=True))
        rules.update(dict.fromkeys(ids, rule(merged)))
    return rules, rule(base)


def shape_plan(plan: RasterPlan, feats: Sequence[Feature], classes: Sequence[str]) -> list[Feature]:
    """Apply the shape stage to one input's final features and order them (``geomask.shape``)."""
    rules, default = shape_rules(plan, classes)
    traced = "simplify" if plan.config.vectorize.simplify_tolerance_m > 0 else "pixel"
    return sort_features(shape_features(feats, plan.grid.transform, plan.info.crs, rules, default, traced))


def mark_partial(plan: RasterPlan, feats: Sequence[Feature], failed_tiles: Iterable[int]) -> list[Feature]:
    """Set ``partial`` on the features that touch the core of a failed tile (tile indexes of ``plan``).

    A failed tile's pixels were never detected, so an object reaching into its core is only the part the
    neighbouring tiles saw: kept (a truncated building is still evidence) but marked, so that it can be
    filtered out or checked. A core is the part of the raster only that tile owns (cores partition it),
    so an object that touches no failed core was seen whole. Cores are mapped to map coordinates with
    the working grid's affine (corners, so rotated grids are exact).
    """
    lookup = plan.tile_lookup
    windows = [lookup[i].core for i in sorted(set(failed_tiles)) if i in lookup]
    if not windows:
        return list(feats)
    t = plan.grid.transform
    boxes = []
    for w in windows:
        c0, r0, c1, r1 = w.col_off, w.row_off, w.col_off + w.width, w.row_off + w.height
        boxes.append(shapely.Polygon([t @ (c0, r0), t @ (c1, r0), t @ (c1, r1), t @ (c0, r1)]))
    failed = shapely.union_all(boxes)
    shapely.prepare(failed)
    return [dataclasses.replace(f, partial=True) if failed.intersects(f.geometry) else f for f in feats]


def predict_raster(
    path: str | Path, config: Config, detector: Detector, progress_every_s: float | None = None, *, info: RasterInfo | None = None
) -> tuple[RasterPlan, list[Feature], RunSummary]:
    """Run every step on one raster in this process; return the plan, features and a summary.

    ``progress_every_s`` logs tiles done/total and the rate that often (``None``: no progress lines);
    on a terminal a live bar is drawn instead. ``info`` is the raster's header if the caller inspected it
    already (see :func:`plan_raster`).
    """
    t0 = time.perf_counter()
    plan = plan_raster(path, resolve_config(config, detector.hints), info=info)
    check_channels(plan, detector.name, detector.hints)
    warn_resampling(plan)
    progress = SerialProgress(str(path), len(plan.tiles), progress_every_s) if progress_every_s is not None else None
    found = detect_tiles(plan, plan.tiles, detector, plan.config.detector.batch_size, progress)
    if progress is not None:
        progress.close()
    instances = found.instances
    merged = merge_across_tiles(instances, plan.tile_lookup, plan.config.merge.ios_threshold)
    feats = shape_plan(plan, in_aoi(plan, vectorize_plan(plan, merged)), detector.classes)
    feats = mark_partial(plan, feats, [f.tile for f in found.failures])
    summary = RunSummary(
        output=None,
        n_tiles=len(plan.tiles),
        n_tiles_skipped=found.n_skipped,
        n_tiles_empty=plan.n_tiles_empty,
        n_tiles_outside_aoi=plan.n_tiles_outside_aoi,
        n_instances=len(instances),
        n_objects=len(feats),
        seconds=time.perf_counter() - t0,
        failures=found.failures,
    )
    return plan, feats, summary


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def run_serial(
    path: str | Path,
    output: str | Path,
    config: Config,
    detector: Detector | None = None,
    overwrite: bool = False,
    progress_every_s: float | None = None,
) -> RunSummary:
    """Predict one raster to one output file in this process (no Dask).

    ``overwrite`` replaces an existing output (in a GeoPackage: geomask's layer); without it an
    existing one stops the run before the model is loaded (:func:`geomask.export.check_writable`).
    The summary's time covers the whole run, the model load (``model_seconds``) included.
    """
    t0 = time.perf_counter()
    check_writable(output, config.export.layer, overwrite)
    info = inspect_raster(path)  # fail on bad input before the (slow) model load; planning reuses it
    if detector is None:
        log.info("loading the model (%s)", config.detector.options.get("weights") or config.detector.factory)
    t_load = time.perf_counter()
    det = detector if detector is not None else build_detector(config)
    model_seconds = time.perf_counter() - t_load
    plan, feats, summary = predict_raster(path, config, det, progress_every_s, info=info)
    summary.run_id = new_run_id()
    summary.model_card = model_card(det)
    frame = to_frame(feats, det.classes, plan.info.crs, Path(plan.info.path).name, det.name, summary.run_id)
    summary.output = write_output(frame, output, plan.config, overwrite)
    summary.seconds, summary.model_seconds = time.perf_counter() - t0, model_seconds
    log.info(
        "%s: %d objects from %d tiles in %.1f s (%d empty and %d outside the AOI skipped)",
        path,
        summary.n_objects,
        summary.n_tiles,
        summary.seconds,
        summary.n_tiles_empty,
        summary.n_tiles_outside_aoi,
    )
    return summary
