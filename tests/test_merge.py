"""The cross-tile merge on hand-made instances: pure, exact, order-independent."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from geomask.instances import Instance, from_mask
from geomask.merge import group_border_instances, ios_in_shared_zone, is_private, merge_across_tiles
from geomask.testing import instances_from_labels
from geomask.tiling import Tile, plan_tiles


def clip_to_tiles(labels: np.ndarray, tiles: list[Tile]) -> list[Instance]:
    """Per-tile instances as a perfect detector would return them (truth clipped to each read window)."""
    out = []
    for t in tiles:
        r, c = int(t.read.row_off), int(t.read.col_off)
        win = labels[r : r + int(t.read.height), c : c + int(t.read.width)]
        for inst in instances_from_labels(win, r, c):
            out.append(Instance(inst.row_off, inst.col_off, inst.mask, inst.score, inst.class_id, t.index))
    return out


def as_label_sets(instances: list[Instance], shape: tuple[int, int]) -> list[frozenset[int]]:
    """Each instance as the frozenset of flat pixel indexes it covers (comparable across runs)."""
    out = []
    for inst in instances:
        rows, cols = np.nonzero(inst.mask)
        out.append(frozenset(((rows + inst.row_off) * shape[1] + cols + inst.col_off).tolist()))
    return sorted(out, key=min)


def truth_sets(labels: np.ndarray) -> list[frozenset[int]]:
    flat = labels.ravel()
    return sorted((frozenset(np.flatnonzero(flat == i).tolist()) for i in np.unique(flat) if i), key=min)


def test_object_cut_by_a_tile_border_comes_out_once_and_whole() -> None:
    labels = np.zeros((100, 200), dtype=np.int32)
    labels[40:60, 80:130] = 1  # crosses the vertical border near x = 100
    tiles = plan_tiles(200, 100, 110, 20)
    merged = merge_across_tiles(clip_to_tiles(labels, tiles), tiles)
    assert as_label_sets(merged, labels.shape) == truth_sets(labels)


def test_object_spanning_three_by_three_tiles() -> None:
    labels = np.zeros((300, 300), dtype=np.int32)
    labels[20:280, 30:270] = 1
    labels[100:200, 100:200] = 0  # a courtyard: the hole is kept
    tiles = plan_tiles(300, 300, 120, 16)
    assert len({(t.row, t.col) for t in tiles}) >= 9
    merged = merge_across_tiles(clip_to_tiles(labels, tiles), tiles)
    assert as_label_sets(merged, labels.shape) == truth_sets(labels)


def test_objects_touching_across_a_tile_border_stay_separate() -> None:
    labels = np.zeros((100, 200), dtype=np.int32)
    labels[30:70, 60:100] = 1
    labels[30:70, 100:140] = 2  # shares a wall with 1, right on the tile seam
    labels[30:70, 140:150] = 3
    tiles = plan_tiles(200, 100, 110, 20)
    merged = merge_across_tiles(clip_to_tiles(labels, tiles), tiles)
    assert len(merged) == 3
    assert as_label_sets(merged, labels.shape) == truth_sets(labels)


def test_complete_object_seen_by_two_tiles_is_kept_once() -> None:
    labels = np.zeros((100, 200), dtype=np.int32)
    labels[40:50, 92:98] = 1  # wholly inside the overlap of both tiles
    tiles = plan_tiles(200, 100, 110, 20)
    per_tile = clip_to_tiles(labels, tiles)
    assert len(per_tile) == 2
    assert len(merge_across_tiles(per_tile, tiles)) == 1


def test_private_instances_skip_the_merge() -> None:
    tiles = plan_tiles(400, 400, 200, 40)
    inside = from_mask(np.ones((5, 5), bool), row_off=10, col_off=10, score=0.9, class_id=0, tile_id=0)
    assert inside is not None
    near_seam = from_mask(np.ones((5, 5), bool), row_off=10, col_off=170, score=0.9, class_id=0, tile_id=0)
    assert near_seam is not None
    tile0 = tiles[0]
    assert is_private(Instance(10, 10, inside.mask, 0.9, 0, 0), tile0)
    assert not is_private(Instance(10, 170, near_seam.mask, 0.9, 0, 0), tile0)


def test_ios_is_measured_in_the_shared_zone() -> None:
    tiles = plan_tiles(200, 100, 110, 20)
    a = Instance(0, 50, np.ones((10, 60), bool), 0.9, 0, 0)  # cols 50..110 in tile 0 (reads 0..110)
    b = Instance(0, 90, np.ones((10, 5), bool), 0.8, 0, 1)  # a sliver in tile 1's left edge
    assert ios_in_shared_zone(a, b, tiles[0], tiles[1]) == 1.0
    c = Instance(0, 150, np.ones((10, 5), bool), 0.8, 0, 1)
    assert ios_in_shared_zone(a, c, tiles[0], tiles[1]) == 0.0


def test_fusion_takes_best_score_and_its_class() -> None:
    tiles = plan_tiles(200, 100, 110, 20)
    a = Instance(40, 80, np.ones((10, 30), bool), 0.6, 1, 0)
    b = Instance(40, 90, np.ones((10, 40), bool), 0.9, 2, 1)
    (fused,) = merge_across_tiles([a, b], tiles)
    assert (fused.score, fused.class_id, fused.tile_id) == (0.9, 2, -1)
    assert fused.bounds() == (80, 40, 130, 50)


def test_same_tile_instances_are_never_linked_directly() -> None:
    tiles = plan_tiles(200, 100, 110, 20)
    a = Instance(40, 95, np.ones((10, 5), bool), 0.9, 0, 0)
    b = Instance(40, 95, np.ones((10, 5), bool), 0.8, 0, 0)  # same pixels, same tile: detector said two objects
    assert len(group_border_instances([a, b], tiles, 0.5)) == 2


def test_unlinked_instance_mostly_in_another_tiles_core_is_dropped() -> None:
    tiles = plan_tiles(200, 100, 110, 20)  # tile 0 reads cols 0..110, tile 1 cols 90..200; cores meet at 100
    assert (int(tiles[0].core.col_off + tiles[0].core.width), int(tiles[1].core.col_off)) == (100, 100)
    # One object in the overlap, in tile 1's core. Each tile's outline is off by 1-2 px, so the two
    # versions overlap by 10 px out of 30 (IoS 0.33): not linked.
    owner = Instance(40, 101, np.ones((10, 3), bool), 0.8, 0, 1)
    jittered = Instance(40, 103, np.ones((10, 4), bool), 0.9, 0, 0)
    assert ios_in_shared_zone(jittered, owner, tiles[0], tiles[1]) < 0.5
    stray = Instance(70, 102, np.ones((6, 6), bool), 0.7, 0, 0)  # tile 0's margin; tile 1 saw nothing there
    mostly_own = Instance(10, 95, np.ones((5, 8), bool), 0.7, 0, 0)  # cols 95..103: 5 of 8 in tile 0's core
    instances = [owner, jittered, stray, mostly_own]
    for order in (instances, instances[::-1]):
        merged = merge_across_tiles(order, tiles)
        assert sorted(m.bounds() for m in merged) == sorted([owner.bounds(), mostly_own.bounds()])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), size=st.sampled_from([64, 96, 128]), overlap=st.sampled_from([4, 16, 24]))
def test_merge_is_exact_and_order_independent(seed: int, size: int, overlap: int) -> None:
    from geomask.testing import make_scene

    labels = make_scene(260, 330, 25, seed=seed, max_size_px=200, n_big=1)
    tiles = plan_tiles(330, 260, size, overlap)
    per_tile = clip_to_tiles(labels, tiles)
    merged = merge_across_tiles(per_tile, tiles)
    shuffled = list(per_tile)
    np.random.default_rng(seed).shuffle(shuffled)
    expected = truth_sets(labels)
    assert as_label_sets(merged, labels.shape) == expected
    assert as_label_sets(merge_across_tiles(shuffled, tiles), labels.shape) == expected


def _two_tiles() -> list[Tile]:
    tiles = plan_tiles(200, 100, 110, 20)  # two tiles side by side, reads overlap in columns 90..110
    assert len(tiles) == 2
    return tiles


def test_touching_neighbours_stay_apart_when_noise_links_one_to_both() -> None:
    """Terraced houses: tile 0 separates them; tile 1's noisy copy of the left house reaches into the right one."""
    tiles = _two_tiles()
    labels = np.zeros((100, 200), dtype=np.int32)
    labels[30:70, 60:104] = 1
    labels[30:70, 104:150] = 2  # shares a wall with house 1, just right of the seam
    exact = clip_to_tiles(labels, tiles)
    left = [i for i in exact if i.tile_id == 0]
    right = [i for i in exact if i.tile_id == 1]
    # Tile 1 sees house 1 only as a 14-px sliver; its outline is 3 px too wide, into house 2's strip in tile 0.
    house1_t1 = next(i for i in right if i.col_off == 90)
    noisy = [i for i in right if i is not house1_t1] + [Instance(30, 90, np.ones((40, 17), dtype=bool), 0.9, 0, 1)]
    assert len(group_border_instances(left + noisy, tiles, 0.5)) == 2
    merged = merge_across_tiles(left + noisy, tiles)
    assert len(merged) == 2
    sets = as_label_sets(merged, labels.shape)
    truth = truth_sets(labels)
    for got, want in zip(sets, truth):
        assert len(got & want) / len(got | want) > 0.9


def test_duplicate_reports_in_one_tile_still_fuse() -> None:
    """Two heavily overlapping instances of one tile are one object reported twice, not neighbours."""
    tiles = _two_tiles()
    labels = np.zeros((100, 200), dtype=np.int32)
    labels[30:70, 80:130] = 1
    exact = clip_to_tiles(labels, tiles)
    t0 = next(i for i in exact if i.tile_id == 0)
    dup = Instance(t0.row_off, t0.col_off, t0.mask.copy(), 0.4, 0, 0)
    dup.mask[:, -2:] = False
    merged = merge_across_tiles([*exact, dup], tiles)
    assert as_label_sets(merged, labels.shape) == truth_sets(labels)


def test_fusion_fills_a_seam_hole_no_tile_saw_and_keeps_a_courtyard() -> None:
    tiles = plan_tiles(200, 200, 110, 20)  # 2 x 2 tiles, cores meet at (100, 100)
    assert len(tiles) == 4
    labels = np.zeros((200, 200), dtype=np.int32)
    labels[40:160, 40:160] = 1
    labels[120:140, 120:140] = 0  # a real courtyard, inside tile 3's core
    insts = clip_to_tiles(labels, tiles)
    # Tile 0's outline misses a 3 x 3 notch at the corner where the four cores meet; the others cover it.
    t0 = next(i for i in insts if i.tile_id == 0)
    notched = t0.mask.copy()
    notched[100 - 3 - t0.row_off : 100 - t0.row_off, 100 - 3 - t0.col_off : 100 - t0.col_off] = False
    insts = [i for i in insts if i is not t0] + [Instance(t0.row_off, t0.col_off, notched, t0.score, 0, 0)]
    merged = merge_across_tiles(insts, tiles)
    assert as_label_sets(merged, labels.shape) == truth_sets(labels)


def test_fusion_fills_a_thin_slit_where_cores_meet_and_keeps_a_small_hole_inside_one_core() -> None:
    tiles = plan_tiles(200, 200, 110, 20)  # 2 x 2 tiles, cores meet at row 100 and column 100
    labels = np.zeros((200, 200), dtype=np.int32)
    labels[40:160, 40:160] = 1
    labels[130:133, 130:133] = 0  # a small real hole, inside tile 3's core: every tile that sees it has it
    insts = clip_to_tiles(labels, tiles)
    # Tiles 0 and 1 each miss a 3-px slot running from their read edge to just past the core boundary:
    # alone, each is a notch open to its tile's edge; fused, they leave a 3 x 5 slit no member covers.
    notched = []
    for inst in insts:
        mask = inst.mask.copy()
        if inst.tile_id == 0:
            mask[80 - inst.row_off : 83 - inst.row_off, 98 - inst.col_off :] = False
        elif inst.tile_id == 1:
            mask[80 - inst.row_off : 83 - inst.row_off, : 103 - inst.col_off] = False
        notched.append(Instance(inst.row_off, inst.col_off, mask, inst.score, 0, inst.tile_id))
    (merged,) = merge_across_tiles(notched, tiles)
    canvas = np.zeros(labels.shape, dtype=bool)
    canvas[merged.row_off : merged.row_off + merged.height, merged.col_off : merged.col_off + merged.width] = merged.mask
    assert canvas[80:83, 98:103].all()  # the slit is filled
    assert not canvas[130:133, 130:133].any()  # the real hole stays
    assert (canvas == (labels == 1)).all()


def test_a_jittered_sliver_link_does_not_outrank_a_neighbours_own_fragment() -> None:
    """House A ends one column before the zone tiles 0 and 1 share; B touches it there.

    Tile 0's outline of A spills one column into B (inside the shared zone): that sliver lies wholly
    under tile 1's B, IoS 1 on 40 px. Tile 0's own fragment of B overlaps tile 1's B on about 800 px at
    IoS 0.95. Tile 0 says A and its B fragment are neighbours, so only one link can be taken: the one
    with the evidence (B with B), not the one with the higher IoS.
    """
    tiles = plan_tiles(200, 100, 110, 20)  # 1 x 2 tiles (width, height); both read columns 90-109
    assert len(tiles) == 2 and int(tiles[1].read.col_off) == 90
    rows = slice(40, 80)

    def inst(c0: int, c1: int, tile: int, score: float, drop_top: int = 0) -> Instance:
        mask = np.ones((rows.stop - rows.start, c1 - c0), dtype=bool)
        mask[:drop_top, 1 : 110 - c0] = False  # the short edge: columns 91-109 of the shared zone
        return Instance(rows.start, c0, mask, score, 0, tile)

    a0 = inst(40, 91, 0, 0.99)  # A is columns 40-89; the jittered outline reaches column 90
    b0 = inst(91, 110, 0, 0.6)  # tile 0's fragment of B (its read window ends at 110)
    b1 = inst(90, 160, 1, 0.95, drop_top=2)  # tile 1's B, its top edge 2 px short in the shared zone
    groups = group_border_instances([a0, b0, b1], tiles, 0.5)
    assert ios_in_shared_zone(a0, b1, tiles[0], tiles[1]) == 1.0
    assert groups == [[0], [1, 2]]


def test_a_thin_hole_is_filled_only_where_two_member_cores_meet() -> None:
    from geomask.merge import fill_seam_holes

    mask = np.ones((20, 20), dtype=bool)
    mask[8:11, 10:15] = False  # a 3 x 5 slit starting at column 10
    nobody = np.zeros_like(mask)  # no member's mask covers it
    owner = np.zeros((20, 20), dtype=np.int64)
    owner[:, 10:] = 7  # member tile 7's core starts at column 10, member 0's is on the left
    assert fill_seam_holes(mask, nobody, owner)[8:11, 10:15].all()
    owner[:, 10:] = -1  # the right side is no member's core: not a seam between two members
    assert not fill_seam_holes(mask, nobody, owner)[8:11, 10:15].any()
    owner[:] = 0
    assert not fill_seam_holes(mask, nobody, owner)[8:11, 10:15].any()  # inside one core
    wide = np.ones((20, 20), dtype=bool)
    wide[5:10, 8:14] = False  # 5 px across: wider than the outline noise, a real hole
    owner[:, 10:] = 7
    assert not fill_seam_holes(wide, nobody, owner)[5:10, 8:14].any()
