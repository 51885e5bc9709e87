"""The distributed job: the Dask shell around the pure scheduler (:mod:`workflows.schedule`).

What to run, store and write, and when, is decided by :class:`~workflows.schedule.JobSchedule` from the
events this module feeds it (an input planned, a stored result read, a task finished or failed, an
output written). This module carries its instructions out on the cluster and the run folder: it plans
the inputs on workers, reads and writes stored results, submits detect and merge tasks (merges first:
they free memory and finish inputs early), shapes and writes each input's output, reports progress and
writes the summary.

The loop polls rather than blocks, so that it notices what a blocking wait would hide forever: a lost
scheduler (every future is cancelled; :class:`~workflows.exits.SchedulerLost`) and a job in which no
task finished for ``dask.stall_timeout_s`` (a frozen worker, or none at all;
:class:`~workflows.exits.Stalled`). Either stops the job before any output is written: outputs are
only ever written from complete trees, and what finished is already in the run folder.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pandas as pd
from distributed import Client, Future, as_completed

from geomask.config import Config
from geomask.detect.base import ModelCard
from geomask.errors import DetectorError, ExportError, GeomaskError, first_line
from geomask.export import to_frame, write_output
from geomask.instances import Instance
from geomask.pipeline import RasterPlan, check_channels, in_aoi, mark_partial, new_run_id, resolve_config, shape_plan, warn_resampling
from geomask.vectorize import Feature
from workflows.blocks import Block, BlockResult, BlockTree
from workflows.exits import JobStopped
from workflows.inputs import OutputLayout
from workflows.progress import Progress
from workflows.schedule import (
    Advance,
    AllWritten,
    BlockComputed,
    BlockLoaded,
    Discard,
    Event,
    InputPlanned,
    InputWritten,
    JobSchedule,
    Load,
    Store,
    SubmitDetect,
    SubmitMerge,
    Tally,
    TaskFailed,
    WriteInput,
)
from workflows.store import RunStore, model_hash
from workflows.tasks import DetectorInfo, DetectorPlugin, DetectTask, MergeTask, describe_detector, plan_task, run_detect, run_merge
from workflows.watch import ClusterWatch

log = logging.getLogger(__name__)
MERGE_PRIORITY = 1_000_000  # merges jump the queue: they free the driver's memory and finish inputs early
UNREGISTER_S = 10.0  # how long the job waits for the workers to drop its detector plugin
POLL_S = 0.05  # how long the loop waits for a result before it checks the client and the stall clock


@dataclass
class JobSummary(Tally):
    """What a job did, for the log, ``summary.json`` and the CLI's closing lines.

    The scheduler counts tiles, tasks, merges and failures into it (:class:`~workflows.schedule.Tally`).
    """

    outputs: list[Path] = field(default_factory=list)
    run_id: str = ""
    n_inputs: int = 0
    n_tiles_empty: int = 0  # never planned: provably no valid pixel (geomask.coverage)
    n_tiles_outside_aoi: int = 0  # never planned: outside the area of interest
    n_objects: int = 0
    seconds: float = 0.0  # from planning to the last output written
    model_seconds: float = 0.0  # loading the model on the workers, before that
    tasks_total: int = 0
    failed_tiles: int = 0
    model_card: ModelCard = field(default_factory=ModelCard)  # what the model's file states (the report shows it)

    @property
    def tiles_per_s(self) -> float:
        return self.n_tiles / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["outputs"] = [str(p) for p in self.outputs]
        data["failures"] = len(self.failures)
        data["tiles_per_s"] = round(self.tiles_per_s, 3)
        return data


@dataclass(frozen=True)
class _Input:
    """What the shell keeps of one input raster (its state lives in the scheduler)."""

    id: int
    path: Path
    plan: RasterPlan
    task_plan: RasterPlan  # without the tile list: what tasks carry
    tree: BlockTree
    source: str  # the `source` field: the file name, or the path when names repeat


class _Job:
    def __init__(
        self,
        client: Client,
        inputs: Sequence[Path],
        layout: OutputLayout,
        config: Config,
        store: RunStore | None,
        progress_every_s: float,
    ):
        self.client = client
        self.paths = list(inputs)
        self.inputs: list[_Input] = []
        self.layout = layout
        self.config = config
        self.store = store
        self.progress_every_s = progress_every_s
        self.run_id = new_run_id()
        self.summary = JobSummary(outputs=[], run_id=self.run_id, n_inputs=len(self.paths))
        self.model_hash = model_hash(config.detector.factory, config.detector.options)
        self.plugin_name = f"geomask-detector-{self.model_hash}-{self.run_id}"
        self.retries = config.dask.retries
        self.resources = {"GPU": 1} if config.dask.gpu else None
        self.futures: dict[Future[BlockResult], tuple[_Input, Block]] = {}
        self.ac: Any = cast(Any, as_completed)()
        self.frames: list[tuple[Any, Config]] = []  # per input, for one combined output
        self.watch = ClusterWatch(client, config.dask.stall_timeout_s, store.root if store is not None else None)

    # -- setup ------------------------------------------------------------------------------------

    def _plan(self, info: DetectorInfo) -> list[_Input]:
        cfg = resolve_config(self.config, info.hints)
        self.resolved = cfg  # the job's settings with the model's hints applied (per-input details such as overlap_m → px aside)
        futs = [self.client.submit(plan_task, str(p.resolve()), cfg, key=f"plan-{i}-{self.run_id}") for i, p in enumerate(self.paths)]
        planned: list[RasterPlan | GeomaskError] = [self.watch.result(f, f"planning {p}") for f, p in zip(futs, self.paths, strict=True)]
        for result in planned:
            if isinstance(result, GeomaskError):
                raise result  # a bad input: one line on the client (exit code 2), as with --serial
        plans = cast(list[RasterPlan], planned)
        for plan in plans:  # a wrong band selection would fail every tile: stop now, in one line, as --serial does
            check_channels(plan, info.name, info.hints)
            warn_resampling(plan)  # on the client: a worker's log is not the user's
        names = [Path(p.info.path).name for p in plans]
        unique = len(set(names)) == len(names)
        if self.layout.combined is not None and len({p.info.crs for p in plans}) > 1:
            crss = sorted({p.info.crs.to_string() for p in plans})
            raise ExportError(f"inputs are in different CRSs ({', '.join(crss)}); write one file per input with -o FOLDER/")
        out = []
        for i, (path, plan) in enumerate(zip(self.paths, plans, strict=True)):
            tree = BlockTree(plan.tiles, cfg.dask.tiles_per_task)
            source = names[i] if unique else str(path)
            out.append(_Input(i, path, plan, dataclasses.replace(plan, tiles=[], aoi=None), tree, source))
        return out

    # -- carrying out instructions ---------------------------------------------------------------

    def _do(self, event: Event) -> None:
        """Hand ``event`` to the scheduler and carry out what it says, with the events that leads to, until none is left."""
        todo = deque(self.schedule.handle(event))
        while todo:
            match todo.popleft():
                case Load(input=i, block=block):
                    stored = self.store.load(i, block.key) if self.store is not None else None
                    todo.extend(self.schedule.handle(BlockLoaded(i, block, stored)))
                case Discard(input=i, blocks=blocks):
                    log.info("%s was repaired: %d stored block(s) that read its failed tiles are redone", self.inputs[i].path, len(blocks))
                    if self.store is not None:
                        self.store.discard(i, [b.key for b in blocks])
                case SubmitDetect(input=i, block=block, order=order):
                    self._submit_detect(self.inputs[i], block, order)
                case SubmitMerge(input=i, block=block, border=border):
                    self._submit_merge(self.inputs[i], block, border)
                case Store(input=i, block=block, result=result):
                    if self.store is not None:
                        self.store.save(i, block.key, result)
                case Advance(tiles=tiles, objects=objects, computed=computed, failures=failures):
                    self.progress.add(tiles, objects, computed, failures)
                case WriteInput(input=i, features=features, failed_tiles=failed_tiles):
                    self._write_input(self.inputs[i], features, failed_tiles)
                    todo.extend(self.schedule.handle(InputWritten(i)))
                case AllWritten():
                    self._write_combined()

    def _submit_detect(self, inp: _Input, block: Block, order: int) -> None:
        tiles = {i: inp.tree.by_index[i] for i in inp.tree.tile_indexes(block)}
        task = DetectTask(inp.task_plan, block, tiles, inp.tree.exclusive(block), self.plugin_name)
        fut = self.client.submit(
            run_detect,
            task,
            key=f"detect-{inp.id}-{block.key}-{self.run_id}",
            resources=self.resources,
            retries=self.retries,
            priority=-order,
        )
        self.futures[fut] = (inp, block)
        self.ac.add(fut)

    def _submit_merge(self, inp: _Input, block: Block, border: list[Instance]) -> None:
        tiles = {i.tile_id: inp.tree.by_index[i.tile_id] for i in border}
        task = MergeTask(inp.task_plan, block, border, tiles, inp.tree.exclusive(block))
        fut = self.client.submit(
            run_merge, task, key=f"merge-{inp.id}-{block.key}-{self.run_id}", retries=self.retries, priority=MERGE_PRIORITY
        )
        self.futures[fut] = (inp, block)
        self.ac.add(fut)

    def _write_input(self, inp: _Input, features: list[Feature], failed_tiles: frozenset[int]) -> None:
        feats = mark_partial(inp.plan, shape_plan(inp.plan, in_aoi(inp.plan, features), self.info.classes), failed_tiles)
        self.summary.n_objects += len(feats)
        frame = to_frame(feats, self.info.classes, inp.plan.info.crs, inp.source, self.info.name, self.run_id)
        if self.layout.per_input is not None:
            out = self.layout.per_input[inp.path]
            self._write(frame, out, inp.plan.config)
            log.info("%s: %d objects -> %s", inp.path, len(feats), out)
        else:
            self.frames.append((frame, inp.plan.config))

    def _write_combined(self) -> None:
        if self.layout.combined is None or not self.frames:
            return
        frame = pd.concat([f for f, _ in self.frames], ignore_index=True)
        # One file from many inputs: record the job's settings, not the first input's resolved ones
        # (an overlap in metres becomes different pixel counts on inputs of different GSDs).
        config = self.frames[0][1] if len(self.frames) == 1 else self.resolved
        self.frames = []
        self._write(frame, self.layout.combined, config)

    def _write(self, frame: Any, out: Path, config: Config) -> None:
        written = write_output(frame, out, config, self.layout.may_replace(out))
        if self.store is not None:  # a re-run of the same command may replace it (it redoes failed tiles)
            self.store.record_output(written)
        self.summary.outputs.append(written)

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> JobSummary:
        t0 = time.perf_counter()
        describe = self.client.submit(describe_detector, self.plugin_name, key=f"describe-{self.run_id}", retries=self.retries)
        self.info: DetectorInfo = self.watch.result(describe, "building the detector on a worker")
        if self.info.error is not None:
            raise DetectorError(self.info.error)
        self.summary.model_card = self.info.card
        self.inputs = self._plan(self.info)
        total_tiles = sum(len(inp.plan.tiles) for inp in self.inputs)
        s = self.summary
        s.tasks_total = sum(len(inp.tree.tasks) for inp in self.inputs)
        s.n_tiles_empty = sum(inp.plan.n_tiles_empty for inp in self.inputs)
        s.n_tiles_outside_aoi = sum(inp.plan.n_tiles_outside_aoi for inp in self.inputs)
        self.progress = Progress(total_tiles, self.progress_every_s, s.n_tiles_empty, s.n_tiles_outside_aoi)
        n_threads = sum(w["nthreads"] for w in self.client.scheduler_info(n_workers=-1)["workers"].values())
        self.schedule = JobSchedule(len(self.inputs), max(64, 8 * n_threads), self.store is not None, tally=s)
        repaired = self.store.repaired if self.store is not None else {}
        for inp in self.inputs:
            self._do(InputPlanned(inp.id, str(inp.path), inp.tree, frozenset(repaired.get(inp.id, ()))))
        if self.store is not None:  # the stale results are gone: the new manifest may be written
            self.store.commit()
        log.info(
            "%d input(s), %d tiles in %d detect tasks (%d already in the run dir); %d empty and %d outside the AOI skipped",
            len(self.inputs),
            total_tiles,
            s.tasks_total,
            s.tasks_loaded,
            s.n_tiles_empty,
            s.n_tiles_outside_aoi,
        )
        last_done = time.monotonic()
        while self.futures:
            batch: list[Future[BlockResult]] = self.ac.next_batch(block=False)
            if not batch:
                self.watch.check_client()
                if time.monotonic() - last_done > self.watch.stall_s:
                    raise self.watch.stalled(f"no task finished for {self.watch.stall_s:.0f} s ({len(self.futures)} in flight)")
                time.sleep(POLL_S)
                continue
            last_done = time.monotonic()
            for fut in batch:
                self._take(fut)
        if not self.schedule.done:  # every instruction was carried out, so the scheduler lost track: a bug, not a data problem
            raise AssertionError("the job ran out of tasks before every input was written")
        self.progress.log()
        s.failed_tiles = len({(f.source, f.tile) for f in s.failures if f.tile >= 0})
        s.seconds = time.perf_counter() - t0
        if self.store is not None:
            self.store.write_failures(s.failures)
            self.store.write_json("summary.json", s.to_dict())
        return s

    def _take(self, fut: Future[BlockResult]) -> None:
        """Report one finished future; a cancelled one means the cluster dropped the job, never a data failure."""
        inp, block = self.futures.pop(fut)
        try:
            result = self.watch.fetch(fut)
        except CancelledError:  # not a failed tile: nothing may be written from the cancelled work
            self.watch.check_client()
            raise self.watch.dropped(f"task {fut.key}") from None
        except JobStopped:  # the fetch itself stalled (a frozen worker holds the result): the job stops, no task failed
            raise
        except Exception as err:  # noqa: BLE001 - recorded in the failure ledger, the job goes on
            reason = first_line(err, with_type=True)
            log.warning("%s %s failed after %d retries: %s", inp.path, block.key, self.retries, reason)
            cast(Any, fut).release()
            self._do(TaskFailed(inp.id, block, reason))
            return
        cast(Any, fut).release()
        log.debug(
            "%s %s: %.2f s in the task, %d features, %d open",
            inp.path.name,
            block.key,
            result.seconds,
            len(result.features),
            len(result.open),
        )
        self._do(BlockComputed(inp.id, block, result))


def run_job(
    client: Client,
    inputs: Sequence[Path],
    layout: OutputLayout,
    config: Config,
    store: RunStore | None = None,
    progress_every_s: float = 10.0,
) -> JobSummary:
    """Run the whole job on ``client``'s cluster and write its outputs.

    Args:
        client: A connected Dask client (see :func:`workflows.cluster.connect`).
        inputs: Raster paths, already expanded.
        layout: Where outputs go (see :func:`workflows.inputs.plan_outputs`).
        config: The validated config; ``config.dask`` decides tasks, retries and GPU resources.
        store: The run folder (see :func:`workflows.store.open_run_dir`), or ``None`` to keep nothing.
        progress_every_s: Seconds between progress lines.

    Returns:
        The summary; failures are listed there (and in ``run_dir/failures.jsonl``), not raised.

    Raises:
        SchedulerLost: The client lost the scheduler; nothing was written, finished tasks are in ``store``.
        Stalled: No task finished for ``config.dask.stall_timeout_s``; likewise.
    """
    job = _Job(client, inputs, layout, config, store, progress_every_s)
    n_workers = len(client.scheduler_info(n_workers=-1)["workers"])
    log.info("loading the model (%s) on %d worker(s)", config.detector.options.get("weights") or config.detector.factory, n_workers)
    started = time.perf_counter()
    client.register_plugin(DetectorPlugin(config.detector.factory, config.detector.options), name=job.plugin_name)
    job.summary.model_seconds = time.perf_counter() - started
    log.info("model loaded in %.1f s", job.summary.model_seconds)
    try:
        return job.run()
    finally:
        try:
            if client.status == "running":  # a lost scheduler cannot be asked, and asking would wait for it
                # Bounded: the scheduler waits for every worker's answer, and a frozen one never gives it.
                c = cast(Any, client)
                c.sync(c._unregister_worker_plugin, name=job.plugin_name, nanny=None, callback_timeout=UNREGISTER_S)
        except Exception as err:  # noqa: BLE001 - a plugin left behind costs memory on the workers that missed it, no more
            log.debug("could not unregister %s: %s", job.plugin_name, err)
