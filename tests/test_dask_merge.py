"""The block-wise merge (geomask.merge.merge_block + workflows.blocks) equals the one-shot merge exactly."""

from __future__ import annotations

import random

import numpy as np
import pytest

from geomask.instances import Instance, from_mask
from geomask.merge import block_exclusive_window, merge_across_tiles, merge_block
from geomask.testing import instances_from_labels, make_scene
from geomask.tiling import Tile, plan_tiles
from workflows.blocks import BlockTree, merge_by_tree, task_shape


def _key(inst: Instance) -> tuple[object, ...]:
    return (inst.row_off, inst.col_off, inst.mask.shape, inst.mask.tobytes(), inst.score, inst.class_id)


def _tile_instances(labels: np.ndarray, tiles: list[Tile], seed: int) -> list[Instance]:
    """Per-tile truth, with some fragments eroded and rescored so matching is not trivially exact."""
    rng = np.random.default_rng(seed)
    out = []
    for tile in tiles:
        w = tile.read
        r0, c0 = int(w.row_off), int(w.col_off)
        for inst in instances_from_labels(labels[r0 : r0 + int(w.height), c0 : c0 + int(w.width)], r0, c0):
            mask = inst.mask.copy()
            if rng.random() < 0.3 and mask.shape[0] > 4:
                mask[-1, :] = False  # a fragment a detector under-segmented
            shrunk = from_mask(mask, row_off=inst.row_off, col_off=inst.col_off, score=float(rng.random()), class_id=int(rng.integers(2)))
            if shrunk is not None:
                out.append(Instance(shrunk.row_off, shrunk.col_off, shrunk.mask, shrunk.score, shrunk.class_id, tile.index))
    return out


@pytest.fixture(scope="module")
def scene() -> tuple[list[Tile], list[Instance]]:
    labels = make_scene(1500, 1300, 150, seed=3, max_size_px=700)
    tiles = plan_tiles(1300, 1500, 256, 32)
    return tiles, _tile_instances(labels, tiles, seed=3)


@pytest.mark.parametrize("tiles_per_task", [1, 2, 4, 6, 16, 10_000])
def test_tree_merge_equals_merge_across_tiles(scene: tuple[list[Tile], list[Instance]], tiles_per_task: int) -> None:
    tiles, instances = scene
    expected = sorted(_key(i) for i in merge_across_tiles(instances, tiles, 0.5))
    shuffled = list(instances)
    random.Random(tiles_per_task).shuffle(shuffled)
    got = sorted(_key(i) for i in merge_by_tree(shuffled, BlockTree(tiles, tiles_per_task), 0.5))
    assert got == expected


def test_block_of_one_tile_has_the_tile_exclusive_window() -> None:
    tiles = plan_tiles(1000, 900, 256, 40)
    for tile in tiles:
        assert block_exclusive_window(tiles, range(tile.row, tile.row + 1), range(tile.col, tile.col + 1)) == tile.exclusive


def test_whole_grid_block_closes_everything(scene: tuple[list[Tile], list[Instance]]) -> None:
    tiles, instances = scene
    rows, cols = range(max(t.row for t in tiles) + 1), range(max(t.col for t in tiles) + 1)
    exclusive = block_exclusive_window(tiles, rows, cols)
    assert exclusive is not None and (exclusive.width, exclusive.height) == (1300, 1500)
    border = [i for i in instances if i.tile_id >= 0]
    finished, still_open = merge_block(border, tiles, exclusive, 0.5)
    assert still_open == []
    assert len(finished) > 0


def test_open_groups_touch_outside_tiles(scene: tuple[list[Tile], list[Instance]]) -> None:
    tiles, instances = scene
    tree = BlockTree(tiles, 4)
    block = tree.tasks[0]
    mine = set(tree.tile_indexes(block))
    exclusive = tree.exclusive(block)
    assert exclusive is not None
    _, still_open = merge_block([i for i in instances if i.tile_id in mine], tiles, exclusive, 0.5)
    assert still_open, "the scene has objects crossing the first block's edges"
    for inst in still_open:
        assert inst.tile_id in mine


def test_tree_shape() -> None:
    assert task_shape(16) == (4, 4)
    assert task_shape(8) == (2, 4)
    assert task_shape(1) == (1, 1)
    tiles = plan_tiles(3000, 2000, 256, 32)
    tree = BlockTree(tiles, 4)
    assert sorted(i for b in tree.tasks for i in tree.tile_indexes(b)) == [t.index for t in tiles]
    assert all(tiles[i].row in b.rows and tiles[i].col in b.cols for b in tree.tasks for i in tree.tile_indexes(b))
    for level in tree.levels:
        for block in level:
            assert tree.exclusive(block) == block_exclusive_window(tiles, block.rows, block.cols)
    for level in tree.levels[1:]:
        for block in level:
            kids = tree.children(block)
            assert all(tree.parent(k) == block for k in kids)
            assert 1 <= len(kids) <= 4
            assert sorted(i for k in kids for i in tree.tile_indexes(k)) == tree.tile_indexes(block)
    assert tree.parent(tree.root) is None
