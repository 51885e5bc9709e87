"""Pure planning of the distributed work on one raster: detect tasks and the merge tree above them.

Detect tasks cover compact rectangles of the tile grid (level 0 blocks), so most objects are whole
inside one task and the instances that leave it are few. Merge blocks group 2 × 2 blocks of the level
below, up to one root block that covers the raster. Each merge step runs
:func:`geomask.merge.merge_block` on the open instances of its children: groups wholly inside the
block's exclusive window are final there, the rest travel one level up. So no step ever holds more than
the instances near one block's edges, and the root only sees objects that cross the central lines.

A block's outcome (:class:`BlockResult`, with its :class:`Failure` records) is defined here too, so the
scheduler (:mod:`workflows.schedule`) and the run folder use it without importing Dask.

No Dask here: this module is tested on its own and replayed serially in tests to prove the tree gives
exactly :func:`geomask.merge.merge_across_tiles`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from rasterio.windows import Window

from geomask.instances import Instance
from geomask.merge import block_exclusive_window, merge_block, split_private
from geomask.tiling import Tile
from geomask.vectorize import Feature

FAN_IN = 2  # children per axis of a merge block: 2 × 2 blocks of the level below


@dataclass(frozen=True)
class Failure:
    """One piece of work that did not produce a result, for the failure ledger.

    Attributes:
        source: Input raster path.
        block: Block key (``L0-r1-c2`` for a detect task).
        tile: Tile index, or ``-1`` when the whole task failed.
        stage: ``read``, ``detect``, ``task`` (the task failed after its retries) or ``merge``.
        error: One-line error message.
    """

    source: str
    block: str
    tile: int
    stage: str
    error: str


@dataclass
class BlockResult:
    """What one detect or merge task hands back: small by construction.

    Attributes:
        features: Objects finished in this block, vectorised (map coordinates).
        open: Border instances whose group may continue outside the block (cropped masks).
        n_tiles: Tiles this block processed (0 for merge blocks).
        n_skipped: Tiles without a valid pixel.
        n_instances: Instances the detector returned, after clipping.
        failures: Tiles (or the whole task) that failed for a data reason.
        seconds: Time spent in the task.
    """

    features: list[Feature] = field(default_factory=list)
    open: list[Instance] = field(default_factory=list)
    n_tiles: int = 0
    n_skipped: int = 0
    n_instances: int = 0
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class Block:
    """A rectangle of the tile grid at one level of the merge tree.

    Attributes:
        level: 0 for detect tasks, then 1, 2, ... up to the root.
        row: Block row at its level.
        col: Block column at its level.
        rows: Tile-grid rows it covers.
        cols: Tile-grid columns it covers.
    """

    level: int
    row: int
    col: int
    rows: range
    cols: range

    @property
    def key(self) -> str:
        """A short name, stable between runs (used for result files and task keys)."""
        return f"L{self.level}-r{self.row}-c{self.col}"


def task_shape(tiles_per_task: int) -> tuple[int, int]:
    """Return ``(rows, cols)`` of tiles per detect task: the most square rectangle of at most that many tiles."""
    rows = max(1, math.isqrt(tiles_per_task))
    return rows, max(1, tiles_per_task // rows)


class BlockTree:
    """The detect tasks and merge blocks of one raster, from its tile plan.

    The plan may have holes (tiles skipped as empty or outside the AOI, see ``geomask.coverage``): blocks
    then hold fewer tiles, and a block with none is *empty*: it is never submitted, its result is empty.

    Args:
        tiles: The raster's planned tiles (row-major, as :func:`geomask.tiling.plan_tiles` returns them, possibly with holes).
        tiles_per_task: Upper bound on tiles per detect task (``dask.tiles_per_task``).
    """

    def __init__(self, tiles: Sequence[Tile], tiles_per_task: int):
        self.tiles = list(tiles)
        self.by_index = {t.index: t for t in self.tiles}
        self._at_cell = {(t.row, t.col): t.index for t in self.tiles}
        self.n_rows = max((t.row for t in self.tiles), default=0) + 1
        self.n_cols = max((t.col for t in self.tiles), default=0) + 1
        # One tile per row and per column carries that row's and column's extent: enough for
        # block_exclusive_window, in O(rows + cols). With holes, a row without a planned tile is read by none.
        per_row = {t.row: t for t in reversed(self.tiles)}
        per_col = {t.col: t for t in reversed(self.tiles)}
        self._edges = list({t.index: t for t in [*per_row.values(), *per_col.values()]}.values())
        self.task_rows, self.task_cols = task_shape(tiles_per_task)
        self.shapes: list[tuple[int, int]] = []
        self.levels: list[list[Block]] = []
        while not self.levels or len(self.levels[-1]) > 1:
            self.levels.append(self._level(len(self.levels)))
        self._empty = {b for level in self.levels for b in level if not self.tile_indexes(b)}

    def _level(self, level: int) -> list[Block]:
        span_r = self.task_rows * FAN_IN**level
        span_c = self.task_cols * FAN_IN**level
        self.shapes.append((math.ceil(self.n_rows / span_r), math.ceil(self.n_cols / span_c)))
        return [
            Block(level, i, j, range(r, min(r + span_r, self.n_rows)), range(c, min(c + span_c, self.n_cols)))
            for i, r in enumerate(range(0, self.n_rows, span_r))
            for j, c in enumerate(range(0, self.n_cols, span_c))
        ]

    @property
    def tasks(self) -> list[Block]:
        """Level-0 blocks holding planned tiles: one detect task each."""
        return [b for b in self.levels[0] if b not in self._empty]

    def is_empty(self, block: Block) -> bool:
        """Return whether ``block`` covers no planned tile (its result is empty without running anything)."""
        return block in self._empty

    @property
    def root(self) -> Block:
        return self.levels[-1][0]

    def _at(self, level: int, row: int, col: int) -> Block:
        return self.levels[level][row * self.shapes[level][1] + col]

    def parent(self, block: Block) -> Block | None:
        """Return the block one level up that contains ``block`` (``None`` for the root)."""
        if block.level + 1 >= len(self.levels):
            return None
        return self._at(block.level + 1, block.row // FAN_IN, block.col // FAN_IN)

    def children(self, block: Block) -> list[Block]:
        """Return the blocks one level down inside ``block`` (none for a detect task)."""
        if block.level == 0:
            return []
        n_r, n_c = self.shapes[block.level - 1]
        rows = range(block.row * FAN_IN, min((block.row + 1) * FAN_IN, n_r))
        cols = range(block.col * FAN_IN, min((block.col + 1) * FAN_IN, n_c))
        return [self._at(block.level - 1, r, c) for r in rows for c in cols]

    def tile_indexes(self, block: Block) -> list[int]:
        """Return the indexes of the planned tiles a block covers, in row-major order (tiles are planned row-major)."""
        return [self._at_cell[(r, c)] for r in block.rows for c in block.cols if (r, c) in self._at_cell]

    def exclusive(self, block: Block) -> Window | None:
        """Return the pixels no tile outside ``block`` reads (see :func:`geomask.merge.block_exclusive_window`)."""
        return block_exclusive_window(self._edges, block.rows, block.cols)


def merge_by_tree(instances: Iterable[Instance], tree: BlockTree, ios_threshold: float) -> list[Instance]:
    """Run the whole merge tree serially: the reference the distributed run is checked against in tests.

    Returns one instance per object, the same set :func:`geomask.merge.merge_across_tiles` returns.
    """
    tiles = tree.by_index
    by_tile: dict[int, list[Instance]] = {}
    for inst in instances:
        by_tile.setdefault(inst.tile_id, []).append(inst)
    done: list[Instance] = []
    open_of: dict[Block, list[Instance]] = {}
    for block in tree.tasks:
        private, border = split_private([i for t in tree.tile_indexes(block) for i in by_tile.get(t, [])], tiles)
        finished, still_open = merge_block(border, tiles, tree.exclusive(block), ios_threshold)
        done += private + finished
        open_of[block] = still_open
    for level in tree.levels[1:]:
        for block in level:
            if tree.is_empty(block):
                continue
            border = [i for child in tree.children(block) for i in open_of.pop(child, [])]
            finished, still_open = merge_block(border, tiles, tree.exclusive(block), ios_threshold)
            done += finished
            open_of[block] = still_open
    if any(open_of.values()):
        raise AssertionError("the root block left instances open; its exclusive window must be the whole raster")
    return done
