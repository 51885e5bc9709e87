"""The job scheduler (workflows.schedule) driven by events alone: no cluster, no files, no clock.

A small simulated shell carries the instructions out: tasks "run" in an order the test chooses (or
hypothesis draws), their results are made up so that every feature and open instance can be traced,
and the run folder is a dict. The checks are the scheduler's promises: every block is submitted once
and only when its children are in, every feature reaches its input's output exactly once, results are
stored only when complete, a resumed run computes exactly what is missing.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shapely.geometry import MultiPolygon, box

from geomask.instances import Instance
from geomask.tiling import plan_tiles
from geomask.vectorize import Feature
from workflows.blocks import Block, BlockResult, BlockTree, Failure
from workflows.schedule import (
    Advance,
    AllWritten,
    BlockComputed,
    BlockLoaded,
    Discard,
    Event,
    InputPlanned,
    InputWritten,
    Instruction,
    JobSchedule,
    Load,
    ScheduleError,
    Store,
    SubmitDetect,
    SubmitMerge,
    TaskFailed,
    WriteInput,
    stale_blocks,
)


def _tree(n_rows: int, n_cols: int, tiles_per_task: int = 1, holes: frozenset[int] = frozenset()) -> BlockTree:
    """A tree over an ``n_rows`` × ``n_cols`` tile grid (64 px tiles, 8 px overlap), without the tiles in ``holes``."""
    tiles = plan_tiles(56 * (n_cols - 1) + 64, 56 * (n_rows - 1) + 64, 64, 8)
    return BlockTree([t for t in tiles if t.index not in holes], tiles_per_task)


def _blocks(tree: BlockTree) -> list[Block]:
    return [b for level in tree.levels for b in level]


@dataclass
class Shell:
    """Carries out instructions as the Dask shell does, with tasks finishing when the test says so."""

    schedule: JobSchedule
    trees: dict[int, BlockTree]
    stored: dict[tuple[int, str], BlockResult] = field(default_factory=dict)  # the run folder
    fail: set[tuple[int, str]] = field(default_factory=set)  # tasks that raise
    tile_failures: set[tuple[int, int]] = field(default_factory=set)  # (input, tile) a detect task reports as failed
    log: list[Instruction] = field(default_factory=list)
    running: dict[tuple[int, Block], SubmitDetect | SubmitMerge] = field(default_factory=dict)
    has_result: set[tuple[int, Block]] = field(default_factory=set)
    open_of: dict[tuple[int, Block], list[Instance]] = field(default_factory=dict)  # what each block's result left open
    written: dict[int, WriteInput] = field(default_factory=dict)
    most_detects: int = 0
    counter: int = 0

    def feed(self, event: Event) -> None:
        todo = deque(self.schedule.handle(event))
        for state in self.schedule.inputs.values():  # open instances are held only while a merge may still take them
            assert all(state.tree.parent(b) not in state.complete for b in state.open)
        while todo:
            ins = todo.popleft()
            self.log.append(ins)
            assert not any(isinstance(x, AllWritten) for x in self.log[:-1]), "nothing may follow the end of the job"
            if isinstance(ins, Load):
                result = self.stored.get((ins.input, ins.block.key))
                if result is not None:
                    self._got(ins.input, ins.block, result)
                todo.extend(self.schedule.handle(BlockLoaded(ins.input, ins.block, result)))
            elif isinstance(ins, Discard):
                assert not any(isinstance(x, Load) and x.input == ins.input for x in self.log), "discard before any load"
                for b in ins.blocks:
                    self.stored.pop((ins.input, b.key), None)
            elif isinstance(ins, (SubmitDetect, SubmitMerge)):
                key = (ins.input, ins.block)
                assert key not in self.running and key not in self.has_result, f"{ins.block.key} submitted twice"
                assert not self.trees[ins.input].is_empty(ins.block), "an empty block is never submitted"
                children = self.trees[ins.input].children(ins.block)
                assert all((ins.input, c) in self.has_result or self.trees[ins.input].is_empty(c) for c in children), (
                    f"{ins.block.key} submitted before its children finished"
                )
                if isinstance(ins, SubmitMerge):  # it carries exactly what its children left open
                    want = [x for c in children for x in self.open_of.get((ins.input, c), [])]
                    assert [id(x) for x in ins.border] == [id(x) for x in want]
                self.running[key] = ins
                self.most_detects = max(self.most_detects, sum(1 for _, b in self.running if b.level == 0))
            elif isinstance(ins, Store):
                assert (ins.input, ins.block.key) not in self.stored, "a stored result is never stored again"
                self.stored[(ins.input, ins.block.key)] = ins.result
            elif isinstance(ins, WriteInput):
                assert ins.input not in self.written, "an input is written once"
                tree = self.trees[ins.input]
                assert all((ins.input, b) in self.has_result or tree.is_empty(b) for b in _blocks(tree))
                self.written[ins.input] = ins
                todo.extend(self.schedule.handle(InputWritten(ins.input)))

    def _got(self, i: int, block: Block, result: BlockResult) -> None:
        self.has_result.add((i, block))
        self.open_of[(i, block)] = list(result.open)

    def result_of(self, i: int, block: Block, ins: SubmitDetect | SubmitMerge) -> BlockResult:
        """A made-up result: one feature tagged with the block (its score), open instances traceable by identity."""
        tree = self.trees[i]
        tag = float(1000 * i + _blocks(tree).index(block))
        feature = Feature(MultiPolygon([box(0, 0, 1, 1)]), 0, tag, 1.0, 4.0)
        self.counter += 1
        opened = [Instance(0, 0, np.ones((1, 1), bool), float(self.counter), 0, tree.tile_indexes(block)[0])]
        if isinstance(ins, SubmitMerge):
            opened += ins.border[: len(ins.border) // 2]  # some groups close here, the rest goes up
            return BlockResult(features=[feature], open=opened)
        failures = [Failure(f"in{i}", block.key, t, "read", "bad") for t in tree.tile_indexes(block) if (i, t) in self.tile_failures]
        return BlockResult(features=[feature], open=opened, n_tiles=len(tree.tile_indexes(block)), failures=failures)

    def finish(self, i: int, block: Block) -> None:
        ins = self.running.pop((i, block))
        if (i, block.key) in self.fail:
            self._got(i, block, BlockResult())
            self.feed(TaskFailed(i, block, "RuntimeError: boom"))
        else:
            result = self.result_of(i, block, ins)
            self._got(i, block, result)
            self.feed(BlockComputed(i, block, result))

    def run(self, rng: random.Random) -> None:
        while self.running:
            i, block = rng.choice(sorted(self.running, key=lambda k: (k[0], k[1].key)))
            self.finish(i, block)

    def submitted(self, kind: type) -> list[tuple[int, str]]:
        return [(x.input, x.block.key) for x in self.log if isinstance(x, kind)]


def _job(
    trees: list[BlockTree],
    stored: dict[tuple[int, str], BlockResult] | None = None,
    max_detects: int = 3,
    has_store: bool = True,
    repaired: dict[int, frozenset[int]] | None = None,
    **kw: object,
) -> Shell:
    shell = Shell(JobSchedule(len(trees), max_detects, has_store), dict(enumerate(trees)), dict(stored or {}), **kw)  # type: ignore[arg-type]
    for i, tree in enumerate(trees):
        shell.feed(InputPlanned(i, f"in{i}", tree, (repaired or {}).get(i, frozenset())))
    return shell


def _tags(write: WriteInput) -> list[float]:
    return sorted(f.score for f in write.features)


def _all_tags(i: int, tree: BlockTree) -> list[float]:
    return sorted(float(1000 * i + k) for k, b in enumerate(_blocks(tree)) if not tree.is_empty(b))


def _non_empty(tree: BlockTree, level0: bool) -> list[str]:
    return [b.key for b in _blocks(tree) if not tree.is_empty(b) and (b.level == 0) == level0]


DEEP = _tree(8, 8)  # 64 detect tasks, merge levels of 16, 4 and 1 blocks: depth 3 above the detect tasks


def test_the_deep_tree_is_deep() -> None:
    assert [len(level) for level in DEEP.levels] == [64, 16, 4, 1]


@pytest.mark.parametrize("seed", range(4))
def test_a_fresh_run_submits_each_block_once_and_writes_every_feature_once(seed: int) -> None:
    shell = _job([DEEP], max_detects=5)
    assert len(shell.running) == 5  # the cap holds from the first instruction
    shell.run(random.Random(seed))
    assert sorted(shell.submitted(SubmitDetect)) == sorted((0, k) for k in _non_empty(DEEP, True))
    assert sorted(shell.submitted(SubmitMerge)) == sorted((0, k) for k in _non_empty(DEEP, False))
    assert [x.order for x in shell.log if isinstance(x, SubmitDetect)] == list(range(64))  # block order, as queued
    assert shell.most_detects == 5
    assert _tags(shell.written[0]) == _all_tags(0, DEEP)
    assert isinstance(shell.log[-1], AllWritten) and shell.schedule.done
    assert len(shell.stored) == 85  # every block was complete: all stored
    t = shell.schedule.tally
    assert (t.tasks_computed, t.tasks_loaded, t.merges_computed, t.merges_loaded, t.n_tiles) == (64, 0, 21, 0, 64)
    progress = [x for x in shell.log if isinstance(x, Advance)]
    assert sum(a.tiles for a in progress) == 64 and sum(a.objects for a in progress) == 85 and all(a.computed for a in progress)


def test_a_run_from_a_complete_run_folder_computes_nothing() -> None:
    first = _job([DEEP])
    first.run(random.Random(0))
    again = _job([DEEP], stored=first.stored)
    assert not again.running and not again.submitted(SubmitDetect) and not again.submitted(SubmitMerge)
    assert not [x for x in again.log if isinstance(x, Store)]
    assert _tags(again.written[0]) == _all_tags(0, DEEP)
    t = again.schedule.tally
    assert (t.tasks_computed, t.tasks_loaded, t.merges_computed, t.merges_loaded) == (0, 64, 0, 21)
    assert again.schedule.done


def test_resume_from_a_partially_stored_run_computes_exactly_what_is_missing() -> None:
    first = _job([DEEP])
    first.run(random.Random(1))
    stored = dict(first.stored)
    missing = {
        "L0-r0-c0",  # its parent L1-r0-c0 is stored: computed again for its own features, its open pieces dropped
        "L0-r7-c7",
        "L1-r3-c3",  # both gone, and the merge above them: computed again, in order
        "L1-r1-c2",  # a merge whose children are all stored
        "L2-r0-c1",
        "L3-r0-c0",  # the root
    }
    for key in missing:
        del stored[(0, key)]
    shell = _job([DEEP], stored=stored)
    shell.run(random.Random(2))
    computed = {k for _, k in shell.submitted(SubmitDetect) + shell.submitted(SubmitMerge)}
    assert computed == missing
    assert {x.block.key for x in shell.log if isinstance(x, Store)} == missing
    assert _tags(shell.written[0]) == _all_tags(0, DEEP)  # the stored blocks' features once, the new ones once
    t = shell.schedule.tally
    assert (t.tasks_computed, t.tasks_loaded, t.merges_computed, t.merges_loaded) == (2, 62, 4, 17)
    # L1-r0-c0 is stored, so the recomputed L0-r0-c0's open instances go nowhere; L2-r0-c0 merges stored children only
    merges = {x.block.key: x for x in shell.log if isinstance(x, SubmitMerge)}
    assert "L1-r0-c0" not in merges
    lone = shell.open_of[(0, next(b for b in DEEP.levels[0] if b.key == "L0-r0-c0"))]
    assert lone
    assert not any(x is y for m in merges.values() for x in m.border for y in lone)


def test_a_failed_detect_task_is_written_around_and_redone_on_resume() -> None:
    bad = "L0-r2-c5"
    first = _job([DEEP], fail={(0, bad)})
    first.run(random.Random(3))
    failures = first.schedule.tally.failures
    block = next(b for b in DEEP.levels[0] if b.key == bad)
    assert [(f.tile, f.stage, f.error) for f in failures] == [(t, "task", "RuntimeError: boom") for t in DEEP.tile_indexes(block)]
    assert first.written[0].failed_tiles == frozenset(DEEP.tile_indexes(block))
    # the input is still written, with every other block's features; nothing above the failure is stored
    assert _tags(first.written[0]) == [x for x in _all_tags(0, DEEP) if x != _blocks(DEEP).index(block)]
    chain = {bad, "L1-r1-c2", "L2-r0-c1", "L3-r0-c0"}
    assert {k for _, k in first.stored} == set(_non_empty(DEEP, True) + _non_empty(DEEP, False)) - chain
    again = _job([DEEP], stored=first.stored)
    again.run(random.Random(4))
    assert {k for _, k in again.submitted(SubmitDetect) + again.submitted(SubmitMerge)} == chain
    assert not again.schedule.tally.failures and not again.written[0].failed_tiles
    assert _tags(again.written[0]) == _all_tags(0, DEEP)


def test_a_failed_merge_loses_its_block_and_marks_all_its_tiles() -> None:
    first = _job([DEEP], fail={(0, "L2-r1-c1")})
    first.run(random.Random(5))
    block = next(b for b in DEEP.levels[2] if b.key == "L2-r1-c1")
    assert [(f.tile, f.stage) for f in first.schedule.tally.failures] == [(-1, "merge")]
    assert first.written[0].failed_tiles == frozenset(DEEP.tile_indexes(block))
    assert (0, "L2-r1-c1") not in first.stored and (0, "L3-r0-c0") not in first.stored
    assert all((0, c.key) in first.stored for c in DEEP.children(block))  # below the failure all is complete
    root = next(x for x in first.log if isinstance(x, SubmitMerge) and x.block.level == 3)
    assert isinstance(root, SubmitMerge)
    assert not any(x in first.open_of[(0, c)] for c in DEEP.children(block) for x in root.border)  # lost with the merge


def test_a_tile_failure_inside_a_detect_task_keeps_the_rest_of_it() -> None:
    tree = _tree(4, 4, tiles_per_task=4)  # 4 detect tasks of 2 × 2 tiles
    shell = _job([tree], tile_failures={(0, 6)})
    shell.run(random.Random(6))
    assert [(f.tile, f.stage) for f in shell.schedule.tally.failures] == [(6, "read")]
    assert shell.written[0].failed_tiles == {6}
    assert {k for _, k in shell.stored} == {"L0-r0-c0", "L0-r1-c0", "L0-r1-c1"}  # L0-r0-c1 holds tile 6; the root is above it
    assert [a.failures for a in shell.log if isinstance(a, Advance) and a.failures] == [1]


def test_a_repaired_input_discards_what_read_its_failed_tiles_before_loading() -> None:
    tree = _tree(4, 4)
    first = _job([tree])
    first.run(random.Random(7))
    shell = _job([tree], stored=first.stored, repaired={0: frozenset({5})})
    discard = shell.log[0]
    assert isinstance(discard, Discard)
    # tile 5 (row 1, col 1) shares pixels with its 8 neighbours: their detect blocks, and every merge above them
    keys = {b.key for b in discard.blocks}
    assert {k for k in keys if k.startswith("L0")} == {f"L0-r{r}-c{c}" for r in range(3) for c in range(3)}
    assert keys - {k for k in keys if k.startswith("L0")} == {"L1-r0-c0", "L1-r0-c1", "L1-r1-c0", "L1-r1-c1", "L2-r0-c0"}
    assert discard.blocks == stale_blocks(tree, {5})
    shell.run(random.Random(8))
    assert {k for _, k in shell.submitted(SubmitDetect) + shell.submitted(SubmitMerge)} == keys
    assert _tags(shell.written[0]) == _all_tags(0, tree)


def test_inputs_queue_in_order_under_one_cap_and_empty_blocks_cost_nothing() -> None:
    holes = frozenset(range(0, 8)) | {12, 13}  # the first two tile rows and two more tiles are not planned
    trees = [_tree(4, 4), _tree(4, 4, holes=holes), _tree(1, 1, holes=frozenset({0}))]
    shell = _job(trees, max_detects=4, has_store=False)
    assert 2 in shell.written  # an input without a planned tile is finished at once
    shell.run(random.Random(9))
    detects = shell.submitted(SubmitDetect)
    assert detects == [(0, k) for k in _non_empty(trees[0], True)] + [(1, k) for k in _non_empty(trees[1], True)]
    assert len(detects) == 16 + 6 and shell.most_detects == 4
    assert not [x for x in shell.log if isinstance(x, (Load, Store, Discard))]  # no run folder
    assert sorted(shell.written) == [0, 1, 2] and _tags(shell.written[1]) == _all_tags(1, trees[1])
    assert sum(1 for x in shell.log if isinstance(x, AllWritten)) == 1


def test_events_out_of_protocol_are_refused() -> None:
    tree = _tree(2, 2)
    schedule = JobSchedule(1, 2, has_store=False)
    schedule.handle(InputPlanned(0, "in0", tree))
    with pytest.raises(ScheduleError, match="planned twice"):
        schedule.handle(InputPlanned(0, "in0", tree))
    with pytest.raises(ScheduleError, match="not running"):
        schedule.handle(BlockComputed(0, tree.levels[0][3], BlockResult()))  # queued behind the cap of 2, not running
    with pytest.raises(ScheduleError, match="not planned"):
        schedule.handle(TaskFailed(1, tree.levels[0][0], "x"))
    with pytest.raises(ScheduleError, match="not asked for"):
        schedule.handle(BlockLoaded(0, tree.levels[0][0], None))
    with pytest.raises(ScheduleError, match="written before"):
        schedule.handle(InputWritten(0))


@settings(max_examples=60, deadline=None)
@given(
    n_rows=st.integers(1, 7),
    n_cols=st.integers(1, 7),
    tiles_per_task=st.sampled_from([1, 2, 4]),
    max_detects=st.integers(1, 6),
    data=st.data(),
)
def test_any_order_any_stored_subset_any_failures(
    n_rows: int, n_cols: int, tiles_per_task: int, max_detects: int, data: st.DataObject
) -> None:
    n = n_rows * n_cols
    holes = frozenset(data.draw(st.sets(st.integers(0, n - 1), max_size=n // 3)))
    tree = _tree(n_rows, n_cols, tiles_per_task, holes)
    full = _job([tree], max_detects=max_detects)
    full.run(random.Random(data.draw(st.integers(0, 10**6))))
    keys = sorted(k for _, k in full.stored)
    kept = data.draw(st.sets(st.sampled_from(keys))) if keys else set()
    failing = data.draw(st.sets(st.sampled_from(keys), max_size=2)) if keys else set()
    shell = _job([tree], {k: v for k, v in full.stored.items() if k[1] in kept}, max_detects, fail={(0, k) for k in failing})
    shell.run(random.Random(data.draw(st.integers(0, 10**6))))
    # every missing non-empty block ran exactly once (Shell asserts once-only and children-first), nothing stored ran
    ran = {k for _, k in shell.submitted(SubmitDetect) + shell.submitted(SubmitMerge)}
    assert ran == set(keys) - kept
    assert shell.most_detects <= max_detects and not shell.running
    assert list(shell.written) == [0] and isinstance(shell.log[-1], AllWritten)
    lost = {float(_blocks(tree).index(b)) for b in _blocks(tree) if b.key in failing and b.key not in kept}
    assert _tags(shell.written[0]) == sorted(set(_all_tags(0, tree)) - lost)
    # stored iff complete: no failure in the block or anywhere below it
    failed_blocks = {b for b in _blocks(tree) if b.key in failing and b.key not in kept}

    def tainted(b: Block) -> bool:
        return b in failed_blocks or any(tainted(c) for c in tree.children(b) if c.key not in kept)

    stored_now = {x.block.key for x in shell.log if isinstance(x, Store)}
    assert stored_now == {b.key for b in _blocks(tree) if b.key in ran and not tainted(b)}


def test_stale_blocks_look_failed_tiles_up_by_index_in_a_plan_with_holes() -> None:
    # Tiles 0-7 (the first two rows of a 4 x 4 grid) are not planned: tile 10 sits at list position 2.
    tree = _tree(4, 4, holes=frozenset(range(8)))
    stale = {b.key for b in stale_blocks(tree, {10}) if b.level == 0}
    assert stale == {f"L0-r{r}-c{c}" for r in (2, 3) for c in (1, 2, 3)}  # tile 10 is row 2, col 2: its planned neighbours
    assert stale_blocks(tree, {3}) == ()  # a tile that was not planned read nothing
