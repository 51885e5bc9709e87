"""The distributed job: plan every input, run detect tasks, merge block by block, write the outputs.

The driver holds a small event loop over Dask futures. Detect tasks are submitted a bounded number at a
time (earlier inputs first); each result comes back to the driver, is stored in the run folder, and is
handed to its merge block, which is submitted as soon as its last child is in. Merge tasks carry only
the open instances of their children, so the largest merge step sees the objects near one block's
edges, never a whole raster. An input is written as soon as every block of its tree has a result.

Results already in the run folder are loaded instead of computed; a block's result is only stored
when it and everything below it finished without failure.

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
from distributed import Client, Future, as_completed, wait
from rasterio.windows import Window

from geomask.config import Config
from geomask.detect.base import ModelCard
from geomask.errors import DetectorError, ExportError, GeomaskError, first_line
from geomask.export import to_frame, write_output
from geomask.pipeline import RasterPlan, check_channels, in_aoi, mark_partial, new_run_id, resolve_config, shape_plan, warn_resampling
from geomask.vectorize import Feature
from workflows.blocks import Block, BlockTree
from workflows.exits import SchedulerLost, Stalled
from workflows.inputs import OutputLayout
from workflows.progress import advance, terminal_bar
from workflows.store import RunStore, model_hash
from workflows.tasks import (
    BlockResult,
    DetectorInfo,
    DetectorPlugin,
    DetectTask,
    Failure,
    MergeTask,
    describe_detector,
    plan_task,
    run_detect,
    run_merge,
)

log = logging.getLogger(__name__)
MERGE_PRIORITY = 1_000_000  # merges jump the queue: they free the driver's memory and finish inputs early
SETUP_STALL_S = 120.0  # the least the watchdog gives the first tasks: a worker builds the model first (imports, weights, CUDA)
UNREGISTER_S = 10.0  # how long the job waits for the workers to drop its detector plugin
POLL_S = 0.05  # how long the loop waits for a result before it checks the client and the stall clock
STUCK_SHOWN = 4  # task keys named per worker in the stall message


@dataclass
class JobSummary:
    """What a job did, for the log, ``summary.json`` and the CLI's closing lines."""

    outputs: list[Path]
    run_id: str
    n_inputs: int = 0
    n_tiles: int = 0
    n_tiles_skipped: int = 0
    n_tiles_empty: int = 0  # never planned: provably no valid pixel (geomask.coverage)
    n_tiles_outside_aoi: int = 0  # never planned: outside the area of interest
    n_objects: int = 0
    seconds: float = 0.0  # from planning to the last output written
    model_seconds: float = 0.0  # loading the model on the workers, before that
    tasks_total: int = 0
    tasks_computed: int = 0
    tasks_loaded: int = 0
    merges_computed: int = 0
    merges_loaded: int = 0
    failures: list[Failure] = field(default_factory=list)
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


class Progress:
    """Progress across the cluster: tiles done/total, objects, rate, ETA; a live bar on a terminal, else periodic lines."""

    def __init__(self, total_tiles: int, every_s: float, n_empty: int = 0, n_outside_aoi: int = 0):
        self.bar = terminal_bar(total_tiles)
        self.failures = 0
        self.total = total_tiles
        self.n_empty, self.n_outside_aoi = n_empty, n_outside_aoi
        self.done = 0
        self.objects = 0
        self.every_s = every_s
        self.t0 = time.perf_counter()
        self.computed = 0
        self.last = self.t0

    def add(self, tiles: int, objects: int, computed: bool, failures: int = 0) -> None:
        self.done += tiles
        self.objects += objects
        self.failures += failures
        if computed:
            self.computed += tiles
        if self.bar is not None:
            advance(self.bar, tiles, self.objects, self.failures)
            return
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            self.log()

    def log(self) -> None:
        if self.bar is not None:  # the job is over: leave the full bar on screen
            self.bar.close()
            return
        elapsed = time.perf_counter() - self.t0
        rate = self.computed / elapsed if elapsed > 0 else 0.0
        eta = f"{(self.total - self.done) / rate:.0f} s" if rate > 0 else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        log.info(
            "tiles %d/%d (%.0f%%; %d skipped: %d empty, %d outside the AOI), %d objects, %.2f tiles/s, ETA %s",
            self.done,
            self.total,
            pct,
            self.n_empty + self.n_outside_aoi,
            self.n_empty,
            self.n_outside_aoi,
            self.objects,
            rate,
            eta,
        )


@dataclass
class _Input:
    """Driver-side state of one input raster."""

    id: int
    path: Path
    plan: RasterPlan
    task_plan: RasterPlan  # without the tile list: what tasks carry
    tree: BlockTree
    source: str
    results: dict[Block, BlockResult] = field(default_factory=dict)
    complete: dict[Block, bool] = field(default_factory=dict)
    features: list[Feature] = field(default_factory=list)
    failed_tiles: set[int] = field(default_factory=set)  # whose objects are marked partial

    @property
    def n_blocks(self) -> int:
        return sum(len(level) for level in self.tree.levels)


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
        self.inputs = list(inputs)
        self.layout = layout
        self.config = config
        self.store = store
        self.progress_every_s = progress_every_s
        self.run_id = new_run_id()
        self.summary = JobSummary(outputs=[], run_id=self.run_id, n_inputs=len(self.inputs))
        self.model_hash = model_hash(config.detector.factory, config.detector.options)
        self.plugin_name = f"geomask-detector-{self.model_hash}-{self.run_id}"
        self.retries = config.dask.retries
        self.resources = {"GPU": 1} if config.dask.gpu else None
        self.futures: dict[Future[BlockResult], tuple[_Input, Block]] = {}
        self.queue: deque[tuple[_Input, Block]] = deque()
        self.ac: Any = cast(Any, as_completed)()
        self.seq = 0
        self.frames: list[Any] = []
        self.address = str(getattr(client.scheduler, "address", "?"))
        self.stall_s = config.dask.stall_timeout_s or float("inf")
        self.setup_stall_s = max(self.stall_s, SETUP_STALL_S)
        self.kept = (
            f"finished work is in {store.root} (--run-dir); re-run the same command to resume"
            if store is not None
            else "no --run-dir, so nothing was kept; add one to make a re-run resume"
        )

    # -- cluster health ---------------------------------------------------------------------------

    def _check_client(self) -> None:
        """Raise :class:`SchedulerLost` once the client lost its scheduler (it then cancels every future)."""
        if self.client.status not in ("running", "newly-created"):
            raise SchedulerLost(f"lost the Dask scheduler at {self.address}; {self.kept}")

    def _result(self, fut: Future[Any], what: str) -> Any:
        """Wait for one early future (describe, plan) with the same watchdog as the main loop."""
        try:
            cast(Any, wait)([fut], timeout=None if self.stall_s == float("inf") else self.setup_stall_s)
            return fut.result()
        except CancelledError:
            self._check_client()
            raise SchedulerLost(f"the Dask scheduler at {self.address} dropped {what} (restarted?); {self.kept}") from None
        except TimeoutError:
            self._check_client()
            raise self._stalled(f"{what} did not finish within {self.setup_stall_s:.0f} s") from None

    def _stalled(self, head: str) -> Stalled:
        """Describe where the job is stuck: tasks per worker, or no worker at all; and what to do."""
        try:
            processing: dict[str, list[str]] = cast(Any, self.client).processing()
            workers = self.client.scheduler_info(n_workers=-1)["workers"]
        except Exception as err:  # noqa: BLE001 - the message is still worth giving without the details
            return Stalled(f"stalled: {head} (cannot ask the scheduler at {self.address}: {first_line(err)}); {self.kept}")
        if not workers:
            where = f"no worker is connected to the scheduler at {self.address}; start workers with `dask worker {self.address}`"
        else:
            stuck = []
            for addr, keys in sorted(processing.items()):
                if keys:
                    name = workers.get(addr, {}).get("name", addr)
                    shown = ", ".join(str(k) for k in sorted(keys)[:STUCK_SHOWN]) + (", ..." if len(keys) > STUCK_SHOWN else "")
                    stuck.append(f"{len(keys)} on worker {name} ({addr}): {shown}")
            where = "stuck tasks: " + ("; ".join(stuck) if stuck else "none running (waiting for resources?)")
            where += "; check or restart those workers (a frozen or overloaded node), or raise --stall-timeout"
        return Stalled(f"stalled: {head}; {where}; {self.kept}")

    # -- setup ------------------------------------------------------------------------------------

    def _plan(self, info: DetectorInfo) -> list[_Input]:
        cfg = resolve_config(self.config, info.hints)
        self.resolved = cfg  # the job's settings with the model's hints applied (per-input details such as overlap_m → px aside)
        futs = [self.client.submit(plan_task, str(p.resolve()), cfg, key=f"plan-{i}-{self.run_id}") for i, p in enumerate(self.inputs)]
        planned: list[RasterPlan | GeomaskError] = [self._result(f, f"planning {p}") for f, p in zip(futs, self.inputs, strict=True)]
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
        for i, (path, plan) in enumerate(zip(self.inputs, plans, strict=True)):
            tree = BlockTree(plan.tiles, cfg.dask.tiles_per_task)
            source = names[i] if unique else str(path)
            out.append(_Input(i, path, plan, dataclasses.replace(plan, tiles=[], aoi=None), tree, source))
        return out

    # -- submitting -------------------------------------------------------------------------------

    def _submit_detect(self, inp: _Input, block: Block) -> None:
        tiles = {i: inp.tree.by_index[i] for i in inp.tree.tile_indexes(block)}
        task = DetectTask(inp.task_plan, block, tiles, inp.tree.exclusive(block), self.plugin_name)
        self.seq += 1
        fut = self.client.submit(
            run_detect,
            task,
            key=f"detect-{inp.id}-{block.key}-{self.run_id}",
            resources=self.resources,
            retries=self.retries,
            priority=-self.seq,
        )
        self.futures[fut] = (inp, block)
        self.ac.add(fut)

    def _submit_merge(self, inp: _Input, block: Block) -> None:
        border = []
        for child in inp.tree.children(block):
            border += inp.results[child].open
            inp.results[child].open = []  # handed on: the driver keeps no copy
        tiles = {i.tile_id: inp.tree.by_index[i.tile_id] for i in border}
        task = MergeTask(inp.task_plan, block, border, tiles, inp.tree.exclusive(block))
        fut = self.client.submit(
            run_merge, task, key=f"merge-{inp.id}-{block.key}-{self.run_id}", retries=self.retries, priority=MERGE_PRIORITY
        )
        self.futures[fut] = (inp, block)
        self.ac.add(fut)

    def _top_up(self, cap: int) -> None:
        in_flight = sum(1 for _, b in self.futures.values() if b.level == 0)
        while self.queue and in_flight < cap:
            self._submit_detect(*self.queue.popleft())
            in_flight += 1

    # -- results ----------------------------------------------------------------------------------

    def _deliver(self, inp: _Input, block: Block, result: BlockResult, computed: bool) -> None:
        """Take in one block's result: store it, count it, and start the parent merge once its last child is in."""
        children = inp.tree.children(block)
        # A stored result is complete by construction (only complete ones are stored).
        complete = not result.failures and (not computed or all(inp.complete.get(c, False) for c in children))
        inp.results[block] = result
        inp.complete[block] = complete
        inp.features += result.features
        self.summary.failures += result.failures
        for failure in result.failures:  # a failed merge lost the open pieces of its whole block
            inp.failed_tiles.update([failure.tile] if failure.tile >= 0 else inp.tree.tile_indexes(block))
        if block.level == 0:
            self.summary.n_tiles += result.n_tiles
            self.summary.n_tiles_skipped += result.n_skipped
            self.progress.add(result.n_tiles, len(result.features), computed, len(result.failures))
            if computed:
                self.summary.tasks_computed += 1
            else:
                self.summary.tasks_loaded += 1
        else:
            self.progress.add(0, len(result.features), computed)
            if computed:
                self.summary.merges_computed += 1
            else:
                self.summary.merges_loaded += 1
        if computed and complete and self.store is not None:
            self.store.save(inp.id, block.key, result)
        if computed:
            parent = inp.tree.parent(block)
            if parent is not None:
                self._maybe_merge(inp, parent)
            self._maybe_finish(inp)

    def _maybe_merge(self, inp: _Input, block: Block) -> None:
        if block not in inp.results and all(c in inp.results for c in inp.tree.children(block)):
            self._submit_merge(inp, block)

    def _maybe_finish(self, inp: _Input) -> None:
        if len(inp.results) == inp.n_blocks:
            self._finish_input(inp)

    def _failed(self, inp: _Input, block: Block, err: BaseException) -> BlockResult:
        reason = first_line(err, with_type=True)
        log.warning("%s %s failed after %d retries: %s", inp.path, block.key, self.retries, reason)
        if block.level == 0:
            tiles = inp.tree.tile_indexes(block)
            return BlockResult(n_tiles=len(tiles), failures=[Failure(str(inp.path), block.key, t, "task", reason) for t in tiles])
        return BlockResult(failures=[Failure(str(inp.path), block.key, -1, "merge", reason)])

    def _finish_input(self, inp: _Input) -> None:
        feats = mark_partial(inp.plan, shape_plan(inp.plan, in_aoi(inp.plan, inp.features), self.info.classes), inp.failed_tiles)
        inp.features = []
        inp.results.clear()
        self.summary.n_objects += len(feats)
        frame = to_frame(feats, self.info.classes, inp.plan.info.crs, inp.source, self.info.name, self.run_id)
        if self.layout.per_input is not None:
            out = self.layout.per_input[inp.path]
            self._write(frame, out, inp.plan.config)
            log.info("%s: %d objects -> %s", inp.path, len(feats), out)
        else:
            self.frames.append((frame, inp.plan.config))

    def _write(self, frame: Any, out: Path, config: Config) -> None:
        written = write_output(frame, out, config, self.layout.may_replace(out))
        if self.store is not None:  # a re-run of the same command may replace it (it redoes failed tiles)
            self.store.record_output(written)
        self.summary.outputs.append(written)

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> JobSummary:
        t0 = time.perf_counter()
        describe = self.client.submit(describe_detector, self.plugin_name, key=f"describe-{self.run_id}", retries=self.retries)
        self.info: DetectorInfo = self._result(describe, "building the detector on a worker")
        if self.info.error is not None:
            raise DetectorError(self.info.error)
        self.summary.model_card = self.info.card
        inputs = self._plan(self.info)
        total_tiles = sum(len(inp.plan.tiles) for inp in inputs)
        self.summary.tasks_total = sum(len(inp.tree.tasks) for inp in inputs)
        self.summary.n_tiles_empty = sum(inp.plan.n_tiles_empty for inp in inputs)
        self.summary.n_tiles_outside_aoi = sum(inp.plan.n_tiles_outside_aoi for inp in inputs)
        self.progress = Progress(total_tiles, self.progress_every_s, self.summary.n_tiles_empty, self.summary.n_tiles_outside_aoi)
        for inp in inputs:
            self._discard_repaired(inp)
            self._start_input(inp)
        if self.store is not None:
            self.store.commit()
        n_threads = sum(w["nthreads"] for w in self.client.scheduler_info(n_workers=-1)["workers"].values())
        log.info(
            "%d input(s), %d tiles in %d detect tasks (%d already in the run dir); %d empty and %d outside the AOI skipped",
            len(inputs),
            total_tiles,
            self.summary.tasks_total,
            self.summary.tasks_loaded,
            self.summary.n_tiles_empty,
            self.summary.n_tiles_outside_aoi,
        )
        cap = max(64, 8 * n_threads)
        self._top_up(cap)
        last_done = time.monotonic()
        while self.futures:
            batch: list[Future[BlockResult]] = self.ac.next_batch(block=False)
            if not batch:
                self._check_client()
                if time.monotonic() - last_done > self.stall_s:
                    raise self._stalled(f"no task finished for {self.stall_s:.0f} s ({len(self.futures)} in flight)")
                time.sleep(POLL_S)
                continue
            last_done = time.monotonic()
            for fut in batch:
                self._take(fut)
            self._top_up(cap)
        self.progress.log()
        if self.layout.combined is not None:
            frame = pd.concat([f for f, _ in self.frames], ignore_index=True) if self.frames else None
            if frame is not None:
                # One file from many inputs: record the job's settings, not the first input's resolved ones
                # (an overlap in metres becomes different pixel counts on inputs of different GSDs).
                config = self.frames[0][1] if len(self.frames) == 1 else self.resolved
                self._write(frame, self.layout.combined, config)
        self.summary.failed_tiles = len({(f.source, f.tile) for f in self.summary.failures if f.tile >= 0})
        self.summary.seconds = time.perf_counter() - t0
        if self.store is not None:
            self.store.write_failures(self.summary.failures)
            self.store.write_json("summary.json", self.summary.to_dict())
        return self.summary

    def _take(self, fut: Future[BlockResult]) -> None:
        """Deliver one finished future; a cancelled one means the cluster dropped the job, never a data failure."""
        inp, block = self.futures.pop(fut)
        try:
            result = fut.result()
        except CancelledError:  # not a failed tile: nothing may be written from the cancelled work
            self._check_client()
            raise SchedulerLost(f"the Dask scheduler at {self.address} dropped task {fut.key} (restarted?); {self.kept}") from None
        except Exception as err:  # noqa: BLE001 - recorded in the failure ledger, the job goes on
            result = self._failed(inp, block, err)
        cast(Any, fut).release()
        log.debug(
            "%s %s: %.2f s in the task, %d features, %d open",
            inp.path.name,
            block.key,
            result.seconds,
            len(result.features),
            len(result.open),
        )
        self._deliver(inp, block, result, computed=True)

    def _discard_repaired(self, inp: _Input) -> None:
        """Delete the stored blocks that read any pixel of a repaired input's failed tiles, and their merges."""
        failed = self.store.repaired.get(inp.id, set()) if self.store is not None else set()
        if not failed or self.store is None:
            return
        reads = [inp.plan.tiles[t].read for t in failed if 0 <= t < len(inp.plan.tiles)]

        def overlaps(a: Window, b: Window) -> bool:
            cols = int(a.col_off) < int(b.col_off + b.width) and int(b.col_off) < int(a.col_off + a.width)
            return cols and int(a.row_off) < int(b.row_off + b.height) and int(b.row_off) < int(a.row_off + a.height)

        stale: set[Block] = set()
        for block in inp.tree.tasks:
            if any(overlaps(inp.plan.tiles[t].read, r) for t in inp.tree.tile_indexes(block) for r in reads):
                parent: Block | None = block
                while parent is not None and parent not in stale:
                    stale.add(parent)
                    parent = inp.tree.parent(parent)
        log.info("%s was repaired: %d stored block(s) that read its failed tiles are redone", inp.path, len(stale))
        self.store.discard(inp.id, [b.key for b in stale])

    def _start_input(self, inp: _Input) -> None:
        """Load what the run folder holds, queue the detect tasks that are missing, start ready merges."""
        for level in inp.tree.levels:
            for block in level:
                if inp.tree.is_empty(block):  # no planned tile below: nothing to run, nothing to store
                    inp.results[block], inp.complete[block] = BlockResult(), True
                    continue
                stored = self.store.load(inp.id, block.key) if self.store is not None else None
                if stored is not None:
                    self._deliver(inp, block, stored, computed=False)
                elif block.level == 0:
                    self.queue.append((inp, block))
        for level in inp.tree.levels[1:]:  # merges whose children were all stored but which were not
            for block in level:
                self._maybe_merge(inp, block)
        self._maybe_finish(inp)


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
