"""What runs on the Dask workers: the detector plugin, detect tasks and merge tasks.

Tasks carry small descriptions (the raster's plan without its tile list, the few tiles they touch, a
window) and read their own pixels. The detector is built once per worker by :class:`DetectorPlugin` and
looked up by name, so the model is never pickled into the graph. A detect task reads tiles in a
background thread (:func:`geomask.pipeline.prefetch`), runs the detector batch by batch, and vectorises
private instances in a second background thread while the next batch is inferred; it then merges its
own border instances as far as its block allows. Only finished features and the few open border
instances leave the task.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from distributed import WorkerPlugin, get_worker
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from geomask.config import Config
from geomask.detect.base import Detector, ModelCard, ModelHints, load_detector, model_card
from geomask.errors import DetectorError, GeomaskError, first_line
from geomask.inference import release_freed_memory, run_tiles
from geomask.instances import Instance
from geomask.merge import merge_block, split_private
from geomask.pipeline import RasterPlan, plan_raster, vectorize_plan
from geomask.tiling import Tile
from geomask.vectorize import Feature
from workflows.blocks import Block, BlockResult, Failure

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DetectorInfo:
    """What the driver needs to know about the detector without building it (name, classes, hints).

    ``error`` is the one-line reason the worker could not build it (the driver raises it), else ``None``.
    """

    name: str
    classes: tuple[str, ...]
    hints: ModelHints
    error: str | None = None
    card: ModelCard = field(default_factory=ModelCard)  # the accuracy the model's file states, for the report


@dataclass(frozen=True)
class DetectTask:
    """A detect task: one rectangle of tiles of one raster.

    Attributes:
        plan: The raster's plan with an empty tile list (tiles travel in ``tiles``).
        block: The level-0 block.
        tiles: The block's tiles by index, in row-major order.
        exclusive: Pixels no tile outside the block reads (``None``: every pixel is shared).
        plugin: Name of the :class:`DetectorPlugin` holding the detector on each worker.
    """

    plan: RasterPlan
    block: Block
    tiles: dict[int, Tile]
    exclusive: Window | None
    plugin: str


@dataclass(frozen=True)
class MergeTask:
    """A merge task: the open instances of a block's children, merged as far as the block allows."""

    plan: RasterPlan
    block: Block
    border: list[Instance]
    tiles: dict[int, Tile]
    exclusive: Window | None


class DetectorPlugin(WorkerPlugin):
    """Build the detector once per worker, when the worker joins, from the config's factory and options.

    Only the factory name and its options are pickled; the model lives on the worker. A lock serialises
    calls because one worker may run several tasks in threads while the model (and a GPU) is one.
    """

    def __init__(self, factory: str, options: dict[str, Any]):
        self.factory = factory
        self.options = dict(options)
        self.detector: Detector | None = None
        self.lock: threading.Lock | None = None
        self.error: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"factory": self.factory, "options": self.options, "detector": None, "lock": None, "error": None}

    def setup(self, worker: Any) -> None:
        # Masks are traced in pixel space on purpose (see geomask.vectorize); rasterio's warning about it is noise.
        warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)
        self.lock = threading.Lock()
        try:
            self.detector = load_detector(self.factory, self.options)
        except Exception as err:  # noqa: BLE001 - handed to the driver by describe_detector: one line, no worker traceback
            first = first_line(err)
            self.error = first if isinstance(err, GeomaskError) else f"detector factory {self.factory} failed on a worker: {first}"
            return
        log.info("worker %s: detector %s ready", getattr(worker, "address", "?"), self.detector.name)

    def teardown(self, worker: Any) -> None:
        self.detector = None


def _plugin(name: str) -> DetectorPlugin:
    plugin = get_worker().plugins.get(name)
    if not isinstance(plugin, DetectorPlugin):
        raise RuntimeError(f"worker has no detector plugin {name!r}; it must be registered before tasks run")
    if plugin.detector is None or plugin.lock is None:
        raise DetectorError(plugin.error or f"detector plugin {name!r} was not set up on this worker")
    return plugin


def plan_task(path: str, config: Config) -> RasterPlan | GeomaskError:
    """Plan one raster on a worker; a bad input comes back as the error (a value, not a failed task).

    So the client reports it as one line, and the worker logs no "Compute Failed" block for it.
    """
    try:
        return plan_raster(path, config)
    except GeomaskError as err:
        return err


def describe_detector(plugin_name: str) -> DetectorInfo:
    """Return the worker's detector name, classes and hints (the driver never builds the model)."""
    plugin = get_worker().plugins.get(plugin_name)
    if isinstance(plugin, DetectorPlugin) and plugin.error is not None:
        return DetectorInfo("", (), ModelHints(), plugin.error)
    det = _plugin(plugin_name).detector
    assert det is not None  # checked by _plugin
    return DetectorInfo(det.name, tuple(det.classes), det.hints, card=model_card(det))


def run_detect(task: DetectTask) -> BlockResult:
    """Read, detect, clean and vectorise one block of tiles; merge its border instances inside the block."""
    t0 = time.perf_counter()
    plugin = _plugin(task.plugin)
    plan, tiles = task.plan, task.tiles
    result = BlockResult(n_tiles=len(tiles))
    border: list[Instance] = []
    vectorised: list[Future[list[Feature]]] = []
    det, lock = plugin.detector, plugin.lock
    assert det is not None and lock is not None
    with plan.reader() as reader, ThreadPoolExecutor(1, thread_name_prefix="geomask-vectorize") as pool:

        def consume(cleaned: list[Instance]) -> None:
            private, shared = split_private(cleaned, tiles)
            border.extend(shared)
            if private:  # vectorised while the next batch is read and inferred
                vectorised.append(pool.submit(vectorize_plan, plan, private))

        run = run_tiles(reader, list(tiles.values()), det, plan.config.detector.batch_size, consume, lock)
        result.n_skipped, result.n_instances = run.n_skipped, run.n_instances
        finished, result.open = merge_block(border, tiles, task.exclusive, plan.config.merge.ios_threshold)
        result.features = vectorize_plan(plan, finished)
        for job in vectorised:
            result.features += job.result()
    result.failures = [Failure(plan.info.path, task.block.key, f.tile, f.stage, f.error) for f in run.failures]
    result.seconds = time.perf_counter() - t0
    release_freed_memory()  # a worker lives for the whole job: hand the task's freed pages back to the OS
    return result


def run_merge(task: MergeTask) -> BlockResult:
    """Merge the open instances of a block's children; vectorise the groups that close here."""
    t0 = time.perf_counter()
    finished, still_open = merge_block(task.border, task.tiles, task.exclusive, task.plan.config.merge.ios_threshold)
    return BlockResult(features=vectorize_plan(task.plan, finished), open=still_open, seconds=time.perf_counter() - t0)
