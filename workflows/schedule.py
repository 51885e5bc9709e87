"""The job's state as a pure state machine: events in, instructions out; no Dask, no files, no clock.

What the distributed job knows at any moment is here: per input, which blocks of its merge tree have a
result, which are queued or running, the open instances waiting for their parent merge, the finished
features, the failed tiles; for the job, the detect queue and how many detect tasks run. It changes
only through :meth:`JobSchedule.handle`, which takes one event (an input was planned, a stored result
was read, a task finished or failed, an output was written) and returns what the shell
(:mod:`workflows.job`) must do next (read a stored result, submit a task, store a result, report
progress, write an input). This is how distributed builds its own worker (``WorkerState`` is driven by
stimuli and answers with instructions): the scheduling and resume rules are unit-tested by feeding
events, without a cluster (``tests/test_schedule.py``).

The rules:

- Detect tasks are queued in input order, then block order, and at most ``max_detects`` run at once.
- A merge block is submitted when every child has a result; it carries the children's open instances,
  which the state then forgets.
- A block's result is stored only when it and everything below it finished without failure
  (*complete*), so failed work is redone on the next run. A stored result is complete by construction.
- Every non-empty block is first looked up in the run folder. A stored merge block stands for what its
  children leave open, so their open instances are dropped; their own finished features are still
  needed, so a missing child below a stored parent is computed again.
- An input is written once every block of its tree has a result; the last one written ends the job.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from rasterio.windows import Window

from geomask.instances import Instance
from geomask.vectorize import Feature
from workflows.blocks import Block, BlockResult, BlockTree, Failure


class ScheduleError(RuntimeError):
    """An event the state does not allow (a result for a block that is not running, an unknown input): a bug in the shell."""


# -- events (what happened) -------------------------------------------------------------------------


@dataclass(frozen=True)
class InputPlanned:
    """An input's tiles and merge tree are known.

    Attributes:
        input: The input's number in the job (0, 1, ...).
        source: The input as given, for the failure ledger.
        tree: Its detect tasks and merge blocks.
        repaired_tiles: Failed tiles of an input repaired since the last run (``--accept-repaired``):
            every stored block that read any of their pixels, and every merge above, is discarded.
    """

    input: int
    source: str
    tree: BlockTree
    repaired_tiles: frozenset[int] = frozenset()


@dataclass(frozen=True)
class BlockLoaded:
    """The answer to :class:`Load`: the stored result, or ``None`` when the run folder has none (or an unreadable one)."""

    input: int
    block: Block
    result: BlockResult | None


@dataclass(frozen=True)
class BlockComputed:
    """A detect or merge task finished (its per-tile data failures, if any, are in ``result.failures``)."""

    input: int
    block: Block
    result: BlockResult


@dataclass(frozen=True)
class TaskFailed:
    """A detect or merge task raised after its retries; ``reason`` is the one-line error."""

    input: int
    block: Block
    reason: str


@dataclass(frozen=True)
class InputWritten:
    """The output of an input was written (or, for one combined file, its table kept for it)."""

    input: int


Event = InputPlanned | BlockLoaded | BlockComputed | TaskFailed | InputWritten


# -- instructions (what to do) ----------------------------------------------------------------------


@dataclass(frozen=True)
class Discard:
    """Delete these stored results: a repaired input made them stale (executed before any :class:`Load` of the input)."""

    input: int
    blocks: tuple[Block, ...]


@dataclass(frozen=True)
class Load:
    """Read the block's stored result and answer with :class:`BlockLoaded`."""

    input: int
    block: Block


@dataclass(frozen=True)
class SubmitDetect:
    """Submit the detect task of a level-0 block; answer with :class:`BlockComputed` or :class:`TaskFailed`."""

    input: int
    block: Block
    order: int  # 0, 1, 2, ... in submission order: earlier ones first on the cluster


@dataclass(frozen=True)
class SubmitMerge:
    """Submit the merge task of a block on its children's open instances; answer as for :class:`SubmitDetect`."""

    input: int
    block: Block
    border: list[Instance]


@dataclass(frozen=True)
class Store:
    """Write a complete result into the run folder."""

    input: int
    block: Block
    result: BlockResult


@dataclass(frozen=True)
class Advance:
    """Report progress: tiles and objects a block added, whether it was computed (not loaded), its failed tiles."""

    tiles: int
    objects: int
    computed: bool
    failures: int = 0


@dataclass(frozen=True)
class WriteInput:
    """Every block of an input has a result: shape, mark and write its features; answer with :class:`InputWritten`."""

    input: int
    features: list[Feature]
    failed_tiles: frozenset[int]  # whose objects are marked partial


@dataclass(frozen=True)
class AllWritten:
    """Every input was written: write what is combined from several inputs, if anything; the job is done."""


Instruction = Discard | Load | SubmitDetect | SubmitMerge | Store | Advance | WriteInput | AllWritten


@dataclass
class Tally:
    """What the job did so far, for its summary."""

    n_tiles: int = 0
    n_tiles_skipped: int = 0
    tasks_computed: int = 0
    tasks_loaded: int = 0
    merges_computed: int = 0
    merges_loaded: int = 0
    failures: list[Failure] = field(default_factory=list)

    def count(self, block: Block, result: BlockResult, computed: bool) -> None:
        """Add one block's result: computed by a task, or loaded from the run folder."""
        self.failures += result.failures
        if block.level == 0:
            self.n_tiles += result.n_tiles
            self.n_tiles_skipped += result.n_skipped
            self.tasks_computed += computed
            self.tasks_loaded += not computed
        else:
            self.merges_computed += computed
            self.merges_loaded += not computed


@dataclass
class _Input:
    """The state of one input's merge tree."""

    source: str
    tree: BlockTree
    complete: dict[Block, bool] = field(default_factory=dict)  # every block with a result: complete or not
    running: set[Block] = field(default_factory=set)
    loading: set[Block] = field(default_factory=set)  # Load given, no answer yet
    open: dict[Block, list[Instance]] = field(default_factory=dict)  # waiting for the parent merge
    features: list[Feature] = field(default_factory=list)
    failed_tiles: set[int] = field(default_factory=set)
    finished: bool = False  # WriteInput given
    written: bool = False


class JobSchedule:
    """The state of one job's inputs and tasks, changed only by :meth:`handle`.

    Args:
        n_inputs: Inputs the job will plan (numbered 0 to ``n_inputs - 1``).
        max_detects: Detect tasks running at once at most (merges are never held back: they free memory).
        has_store: Whether there is a run folder to load from and store into.
        tally: Where to count what the job did (a fresh one by default).
    """

    def __init__(self, n_inputs: int, max_detects: int, has_store: bool, tally: Tally | None = None):
        self.n_inputs = n_inputs
        self.max_detects = max_detects
        self.has_store = has_store
        self.inputs: dict[int, _Input] = {}
        self.queue: deque[tuple[int, Block]] = deque()
        self.detects_running = 0
        self.submitted = 0
        self.n_written = 0
        self.tally = tally if tally is not None else Tally()

    @property
    def done(self) -> bool:
        """Whether every input was written."""
        return self.n_written == self.n_inputs

    def handle(self, event: Event) -> list[Instruction]:
        """Apply one event; return the instructions it leads to, in the order they must be carried out."""
        out: list[Instruction] = []
        match event:
            case InputPlanned():
                self._planned(event, out)
            case BlockLoaded(input=i, block=block, result=result):
                self._loaded(i, self._input(i), block, result, out)
            case BlockComputed(input=i, block=block, result=result):
                state = self._input(i)
                self._finished_task(state, block)
                self._deliver(i, state, block, result, True, out)
            case TaskFailed(input=i, block=block, reason=reason):
                state = self._input(i)
                self._finished_task(state, block)
                self._deliver(i, state, block, self._failed(state, block, reason), True, out)
            case InputWritten(input=i):
                self._written(self._input(i), out)
        self._top_up(out)
        return out

    # -- events -----------------------------------------------------------------------------------

    def _input(self, i: int) -> _Input:
        if i not in self.inputs:
            raise ScheduleError(f"input {i} was not planned")
        return self.inputs[i]

    def _planned(self, event: InputPlanned, out: list[Instruction]) -> None:
        i, tree = event.input, event.tree
        if not 0 <= i < self.n_inputs or i in self.inputs:
            raise ScheduleError(f"input {i} planned twice or outside 0..{self.n_inputs - 1}")
        state = self.inputs[i] = _Input(event.source, tree)
        if self.has_store and event.repaired_tiles:
            out.append(Discard(i, stale_blocks(tree, event.repaired_tiles)))
        for level in tree.levels:
            for block in level:
                if tree.is_empty(block):  # no planned tile below: nothing to run, nothing to store
                    state.complete[block] = True
                elif self.has_store:
                    state.loading.add(block)
                    out.append(Load(i, block))
                elif block.level == 0:
                    self.queue.append((i, block))
        if not state.loading:
            self._start(i, state, out)

    def _loaded(self, i: int, state: _Input, block: Block, result: BlockResult | None, out: list[Instruction]) -> None:
        if block not in state.loading:
            raise ScheduleError(f"input {i} {block.key}: a stored result that was not asked for")
        state.loading.discard(block)
        if result is not None:
            self._deliver(i, state, block, result, False, out)
        elif block.level == 0:
            self.queue.append((i, block))
        if not state.loading:
            self._start(i, state, out)

    def _written(self, state: _Input, out: list[Instruction]) -> None:
        if not state.finished or state.written:
            raise ScheduleError(f"{state.source}: written before it was finished, or twice")
        state.written = True
        self.n_written += 1
        if self.done:
            out.append(AllWritten())

    def _finished_task(self, state: _Input, block: Block) -> None:
        if block not in state.running:
            raise ScheduleError(f"{state.source} {block.key}: a task result for a block that is not running")
        state.running.discard(block)
        if block.level == 0:
            self.detects_running -= 1

    # -- transitions ------------------------------------------------------------------------------

    def _start(self, i: int, state: _Input, out: list[Instruction]) -> None:
        """Every stored result is in: start the merges whose children were all stored, finish a tree already whole."""
        for level in state.tree.levels[1:]:
            for block in level:
                self._maybe_merge(i, state, block, out)
        self._maybe_finish(i, state, out)

    def _top_up(self, out: list[Instruction]) -> None:
        while self.queue and self.detects_running < self.max_detects:
            i, block = self.queue.popleft()
            state = self.inputs[i]
            state.running.add(block)
            self.detects_running += 1
            out.append(SubmitDetect(i, block, self.submitted))
            self.submitted += 1

    def _failed(self, state: _Input, block: Block, reason: str) -> BlockResult:
        """The result of a task that raised: every tile of a detect task failed; a merge lost its children's open pieces."""
        if block.level == 0:
            tiles = state.tree.tile_indexes(block)
            return BlockResult(n_tiles=len(tiles), failures=[Failure(state.source, block.key, t, "task", reason) for t in tiles])
        return BlockResult(failures=[Failure(state.source, block.key, -1, "merge", reason)])

    def _deliver(self, i: int, state: _Input, block: Block, result: BlockResult, computed: bool, out: list[Instruction]) -> None:
        """Take in one block's result: count it, store it when complete, and start the parent merge once its last child is in."""
        tree = state.tree
        children = tree.children(block)
        complete = not result.failures and (not computed or all(state.complete[c] for c in children))
        state.complete[block] = complete
        state.features += result.features
        for failure in result.failures:  # a failed merge lost the open pieces of its whole block
            state.failed_tiles.update([failure.tile] if failure.tile >= 0 else tree.tile_indexes(block))
        self.tally.count(block, result, computed)
        failed = len(result.failures) if block.level == 0 else 0
        out.append(Advance(result.n_tiles, len(result.features), computed, failed))
        if computed and complete and self.has_store:
            out.append(Store(i, block, result))
        for child in children:  # this result already holds what they left open
            state.open.pop(child, None)
        parent = tree.parent(block)
        if parent is not None and parent not in state.complete and result.open:
            state.open[block] = list(result.open)
        if computed:
            if parent is not None:
                self._maybe_merge(i, state, parent, out)
            self._maybe_finish(i, state, out)

    def _maybe_merge(self, i: int, state: _Input, block: Block, out: list[Instruction]) -> None:
        if block in state.complete or block in state.running or block in state.loading:
            return
        children = state.tree.children(block)
        if all(c in state.complete for c in children):
            border = [inst for c in children for inst in state.open.pop(c, [])]
            state.running.add(block)
            out.append(SubmitMerge(i, block, border))

    def _maybe_finish(self, i: int, state: _Input, out: list[Instruction]) -> None:
        if not state.finished and len(state.complete) == sum(len(level) for level in state.tree.levels):
            state.finished = True
            out.append(WriteInput(i, state.features, frozenset(state.failed_tiles)))
            state.features, state.open = [], {}


def _overlaps(a: Window, b: Window) -> bool:
    cols = int(a.col_off) < int(b.col_off + b.width) and int(b.col_off) < int(a.col_off + a.width)
    return cols and int(a.row_off) < int(b.row_off + b.height) and int(b.row_off) < int(a.row_off + a.height)


def stale_blocks(tree: BlockTree, failed_tiles: Iterable[int]) -> tuple[Block, ...]:
    """Return the blocks whose stored result may hold pixels of ``failed_tiles``: detect blocks reading any, and every merge above.

    Tiles are looked up by index (the plan may have holes). The blocks come level by level, in tree order.
    """
    reads = [tree.by_index[t].read for t in failed_tiles if t in tree.by_index]
    stale: set[Block] = set()
    for block in tree.tasks:
        if any(_overlaps(tree.by_index[t].read, r) for t in tree.tile_indexes(block) for r in reads):
            parent: Block | None = block
            while parent is not None and parent not in stale:
                stale.add(parent)
                parent = tree.parent(parent)
    return tuple(b for level in tree.levels for b in level if b in stale)
