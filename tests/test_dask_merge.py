"""The block-wise merge (geomask.merge.merge_block + workflows.blocks) equals the one-shot merge exactly."""

from __future__ import annotations

import random

import numpy as np
import pytest

from geomask.instances import Instance, from_mask
from geomask.merge import block_exclusive_window, group_border_instances, is_unconfirmed, merge_across_tiles, merge_block, split_private
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


def _rect(row: int, col: int, h: int, w: int, tile: int, score: float) -> Instance:
    return Instance(row, col, np.ones((h, w), bool), score, 0, tile)


def test_tree_merge_equals_merge_across_tiles_where_rule_4_drops() -> None:
    """Rule 4 (drop a lone instance mostly outside its tile's core) at every seam of a 10 × 10 grid: the tree agrees.

    Tiles of 64 px overlapping by 16 (stride 48): the zone two neighbours read is [48k, 48k + 16) on each
    axis, their cores meet at 48k + 8. Planted at every column seam k = 1..9 (and, transposed, every row
    seam), inside a tile row's exclusive band: a stray 5 × 5 fragment one tile reports in its neighbour's
    core, a 3 px wide object whose other version is jittered 2 px (IoS 1/3: not linked) and a lone
    fragment mostly in its own tile's core (kept). At corners (4 tiles read them): a 3 × 3 object three
    tiles report exactly and the fourth jittered, and a stray from the far tile. Seams fall between
    detect blocks or inside one depending on tiles_per_task; around them, ordinary objects cut by tile
    borders, two of them spanning at least 3 × 3 tiles.
    """
    n, stride, size = 10, 48, 64
    tiles = plan_tiles(stride * (n - 1) + size, stride * (n - 1) + size, size, 16)
    assert len(tiles) == n * n and all(int(t.core.col_off) == stride * t.col + 8 for t in tiles if t.col > 0)
    rng = np.random.default_rng(7)
    kept: list[Instance] = []  # lone instances rule 4 keeps, and the owners' versions of jittered objects
    dropped: list[Instance] = []
    reported: list[Instance] = []  # per-tile detections of the planted cases

    def plant(r0: int, c0: int, h: int, w: int, tile_rc: tuple[int, int], transpose: bool, into: list[Instance] | None) -> None:
        if transpose:
            r0, c0, h, w, tile_rc = c0, r0, w, h, tile_rc[::-1]
        inst = _rect(r0, c0, h, w, tile_rc[0] * n + tile_rc[1], float(rng.uniform(0.3, 1.0)))
        reported.append(inst)
        if into is not None:
            into.append(inst)

    for transpose in (False, True):
        for k in range(1, n):
            r = 0 if k % 2 else n - 1  # rows 48r + 18 .. 48r + 46: read by tile row r only
            top, seam = stride * r + 18, stride * k + 8
            left, right = (r, k - 1), (r, k)
            if k % 2:  # the left tile reports stray and jittered versions in the right tile's core
                plant(top, seam + 2, 5, 5, left, transpose, dropped)
                plant(top + 10, seam + 1, 12, 3, right, transpose, kept)
                plant(top + 10, seam + 3, 12, 3, left, transpose, dropped)
            else:  # mirrored
                plant(top, seam - 7, 5, 5, right, transpose, dropped)
                plant(top + 10, seam - 4, 12, 3, left, transpose, kept)
                plant(top + 10, seam - 6, 12, 3, right, transpose, dropped)
            plant(top + 25, seam - 5, 3, 8, left, transpose, kept)  # 5 of 8 columns in its own core
    corners = [(i, i) for i in range(1, n)] + [(1, 8), (8, 1)]
    for i, j in corners:
        bi, bj = stride * i + 8, stride * j + 8
        for tile_rc in ((i, j), (i - 1, j), (i, j - 1)):
            plant(bi + 2, bj + 2, 3, 3, tile_rc, False, kept if tile_rc == (i, j) else None)
        plant(bi + 2, bj + 4, 3, 3, (i - 1, j - 1), False, dropped)
        plant(bi - 6, bj + 2, 4, 4, (i - 1, j - 1), False, dropped)  # in tile (i - 1, j)'s core

    # Ordinary objects, clear of the planted ones by 3 px: two big ellipses, then random rectangles.
    height = width = stride * (n - 1) + size
    labels = np.zeros((height, width), np.int32)
    occupied = np.zeros_like(labels, dtype=bool)
    for inst in reported:
        occupied[max(0, inst.row_off - 3) : inst.row_off + inst.height + 3, max(0, inst.col_off - 3) : inst.col_off + inst.width + 3] = True
    yy, xx = np.mgrid[:height, :width]
    for obj, (cy, cx, ry, rx) in enumerate([(140, 330, 80, 75), (330, 140, 80, 75)], start=1):
        ellipse = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        assert not (ellipse & occupied).any()
        rows, cols = np.flatnonzero(ellipse.any(axis=1)), np.flatnonzero(ellipse.any(axis=0))
        core_rows = {t.row for t in tiles if int(t.core.row_off) <= rows[-1] and rows[0] < int(t.core.row_off + t.core.height)}
        core_cols = {t.col for t in tiles if int(t.core.col_off) <= cols[-1] and cols[0] < int(t.core.col_off + t.core.width)}
        assert len(core_rows) >= 3 and len(core_cols) >= 3
        labels[ellipse] = obj
    occupied |= labels > 0
    obj = 3
    for _ in range(150):
        h, w = (int(v) for v in rng.integers(4, 40, size=2))
        r0, c0 = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        if not occupied[max(0, r0 - 1) : r0 + h + 1, max(0, c0 - 1) : c0 + w + 1].any():
            labels[r0 : r0 + h, c0 : c0 + w] = obj
            occupied[r0 : r0 + h, c0 : c0 + w] = True
            obj += 1
    assert obj > 40

    instances = list(reported)
    for tile in tiles:
        r0, c0 = int(tile.read.row_off), int(tile.read.col_off)
        for inst in instances_from_labels(labels[r0 : r0 + int(tile.read.height), c0 : c0 + int(tile.read.width)], r0, c0):
            instances.append(Instance(inst.row_off, inst.col_off, inst.mask, float(rng.random()), int(rng.integers(2)), tile.index))

    def pixels(inst: Instance) -> tuple[object, ...]:
        return (inst.bounds(), inst.mask.tobytes())

    # Rule 4 fires exactly on the planted strays and jittered duplicates, and the result is the truth.
    assert len(dropped) == 9 * 2 * 2 + len(corners) * 2
    _, border = split_private(instances, tiles)
    unconfirmed = [g for g in group_border_instances(border, tiles, 0.5) if is_unconfirmed([border[i] for i in g], tiles)]
    assert sorted(border[g[0]].bounds() for g in unconfirmed) == sorted(d.bounds() for d in dropped)
    merged = merge_across_tiles(instances, tiles, 0.5)
    assert not {d.bounds() for d in dropped} & {m.bounds() for m in merged}
    assert sorted(pixels(m) for m in merged) == sorted([pixels(i) for i in instances_from_labels(labels, 0, 0)] + [pixels(k) for k in kept])

    expected = sorted(_key(i) for i in merged)
    for tiles_per_task in (1, 2, 3, 4, 6, 9, 10_000):
        for seed in range(2):
            shuffled = list(instances)
            random.Random(seed * 100 + tiles_per_task).shuffle(shuffled)
            got = sorted(_key(i) for i in merge_by_tree(shuffled, BlockTree(tiles, tiles_per_task), 0.5))
            assert got == expected, tiles_per_task
