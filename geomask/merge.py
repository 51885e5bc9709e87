"""Pure cross-tile merge: every object exactly once, whole.

The rule (see DESIGN.md):

1. Each tile has an *exclusive* window that no other tile reads. An instance whose box lies inside it
   cannot have been seen by any other tile: it is final as it is (no comparison needed).
2. Every other instance is a *border* instance. Border instances of different tiles are linked when
   their masks overlap inside the zone both tiles read, measured as intersection over the smaller of
   the two areas in that zone (IoS: a fragment is small relative to the whole). Instances of the same
   tile are never linked directly: the detector said they are different objects, which keeps
   touching neighbours apart.
3. Each connected group is fused into one instance: inside each member tile's *core* the pixels come
   from that tile's members (the tile that saw the most context around them); elsewhere the union of
   members. Best score wins, and its class.
4. A border instance linked to nothing whose pixels lie mostly outside its own tile's core is dropped:
   the tiles whose cores hold those pixels read them with more context and reported nothing that
   matches (a stray margin fragment, a duplicate or a false positive). A detector that agrees with
   itself across tiles never triggers this: every pixel outside a tile's core is read by the tile owning
   it, whose instance there overlaps fully in the shared zone and is linked.

Candidate pairs come from a shapely ``STRtree`` over boxes — never all pairs. Results do not depend on
input order: groups are connected components and fusion is symmetric.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import shapely
from rasterio.windows import Window
from scipy import ndimage
from shapely import STRtree

from geomask.instances import Instance
from geomask.tiling import Tile, window_contains

TileLookup = Mapping[int, Tile] | Sequence[Tile]


class Link(NamedTuple):
    """A link between border instances ``i`` and ``j`` of different tiles (indices into the border list)."""

    ios: float  # intersection over the smaller area, inside the zone both tiles read
    shared_px: int  # the intersection's pixels there: how much evidence the link rests on
    i: int
    j: int


# Two instances of one tile closer than this are touching neighbours (1–2 px of model noise apart).
NEIGHBOUR_GAP_PX = 2


def is_private(instance: Instance, tile: Tile) -> bool:
    """Return whether no other tile can have seen any pixel of ``instance``."""
    if tile.exclusive is None:
        return False
    return window_contains(tile.exclusive, *instance.bounds())


def split_private(instances: Iterable[Instance], tiles: TileLookup) -> tuple[list[Instance], list[Instance]]:
    """Split instances into ``(private, border)``; only border instances need merging."""
    private: list[Instance] = []
    border: list[Instance] = []
    for inst in instances:
        (private if is_private(inst, tiles[inst.tile_id]) else border).append(inst)
    return private, border


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> tuple[int, int, int, int] | None:
    c0, r0 = max(a[0], b[0]), max(a[1], b[1])
    c1, r1 = min(a[2], b[2]), min(a[3], b[3])
    if c0 >= c1 or r0 >= r1:
        return None
    return c0, r0, c1, r1


def _bounds(w: Window) -> tuple[int, int, int, int]:
    return (int(w.col_off), int(w.row_off), int(w.col_off + w.width), int(w.row_off + w.height))


def _crop(inst: Instance, zone: tuple[int, int, int, int]) -> npt.NDArray[np.bool_]:
    c0, r0, c1, r1 = zone
    return inst.mask[r0 - inst.row_off : r1 - inst.row_off, c0 - inst.col_off : c1 - inst.col_off]


def _mask_area_in(inst: Instance, zone: tuple[int, int, int, int]) -> int:
    return int(_crop(inst, zone).sum())


def overlap_in_shared_zone(a: Instance, b: Instance, tile_a: Tile, tile_b: Tile) -> tuple[float, int]:
    """Return ``(IoS, pixels)``: intersection over the smaller area, and the intersection's pixel count,
    both counted inside the zone both tiles read."""
    shared = _overlap(_bounds(tile_a.read), _bounds(tile_b.read))
    if shared is None:
        return 0.0, 0
    za, zb = _overlap(a.bounds(), shared), _overlap(b.bounds(), shared)
    if za is None or zb is None:
        return 0.0, 0
    both = _overlap(za, zb)
    if both is None:
        return 0.0, 0
    inter = int(np.count_nonzero(_crop(a, both) & _crop(b, both)))
    if inter == 0:
        return 0.0, 0
    smaller = min(_mask_area_in(a, za), _mask_area_in(b, zb))
    return (inter / smaller if smaller else 0.0), inter


def ios_in_shared_zone(a: Instance, b: Instance, tile_a: Tile, tile_b: Tile) -> float:
    """Return intersection over the smaller area, both areas counted inside the zone both tiles read."""
    return overlap_in_shared_zone(a, b, tile_a, tile_b)[0]


def _key(inst: Instance) -> tuple[int, int, int, int, int, float, int]:
    """An order-free identity for tie-breaking: what the instance is, not where it sits in a list."""
    return (inst.tile_id, inst.row_off, inst.col_off, inst.height, inst.width, inst.score, inst.class_id)


def _grow(mask: npt.NDArray[np.bool_], px: int) -> npt.NDArray[np.bool_]:
    """Grow a mask by ``px`` pixels (square neighbourhood) on a canvas ``px`` larger on every side."""
    return ndimage.binary_dilation(np.pad(mask, px), structure=np.ones((3, 3), dtype=bool), iterations=px)  # type: ignore[no-any-return]


def are_neighbours(a: Instance, b: Instance, gap_px: int = NEIGHBOUR_GAP_PX) -> bool:
    """Return whether two instances of one tile are distinct objects that touch (within ``gap_px``).

    The detector separated them, so no merge may join them, however its neighbours link them. Two
    instances that overlap by most of the smaller one are one object reported twice, not neighbours.
    """
    ar0, ac0, ar1, ac1 = a.row_off - gap_px, a.col_off - gap_px, a.row_off + a.height + gap_px, a.col_off + a.width + gap_px
    r0, c0 = max(ar0, b.row_off), max(ac0, b.col_off)
    r1, c1 = min(ar1, b.row_off + b.height), min(ac1, b.col_off + b.width)
    if r0 >= r1 or c0 >= c1:
        return False
    near = _grow(a.mask, gap_px)[r0 - ar0 : r1 - ar0, c0 - ac0 : c1 - ac0]
    if not np.any(near & _crop(b, (c0, r0, c1, r1))):
        return False
    zone = _overlap(a.bounds(), b.bounds())
    inter = 0 if zone is None else int(np.count_nonzero(_crop(a, zone) & _crop(b, zone)))
    return inter * 2 < min(a.area_px, b.area_px)


def link_components(border: Sequence[Instance], tiles: TileLookup, ios_threshold: float) -> list[tuple[list[int], list[Link]]]:
    """Return the connected components of the link graph: ``(members, links)`` with :class:`Link` links.

    Links join border instances of different tiles whose masks overlap in the zone both tiles read with
    IoS ≥ ``ios_threshold``. Components are what :func:`split_component` turns into objects; a
    component is the unit a block can close (no instance outside it can change how it is split).
    """
    if not border:
        return []
    boxes = shapely.box(*np.array([inst.bounds() for inst in border], dtype=np.float64).T)
    tree = STRtree(boxes)
    left, right = tree.query(boxes, predicate="intersects")
    parent = list(range(len(border)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    links: list[Link] = []
    for i, j in zip(left.tolist(), right.tolist(), strict=True):
        if i >= j:
            continue
        a, b = border[i], border[j]
        if a.tile_id == b.tile_id:
            continue
        ios, shared_px = overlap_in_shared_zone(a, b, tiles[a.tile_id], tiles[b.tile_id])
        if ios >= ios_threshold:
            links.append(Link(ios, shared_px, i, j))
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    members: dict[int, list[int]] = {}
    for i in range(len(border)):
        members.setdefault(find(i), []).append(i)
    by_root: dict[int, list[Link]] = {}
    for link in links:
        by_root.setdefault(find(link.i), []).append(link)
    return [(m, by_root.get(root, [])) for root, m in sorted(members.items())]


def split_component(members: Sequence[int], links: Sequence[Link], border: Sequence[Instance]) -> list[list[int]]:
    """Split one link component into objects, never joining two touching instances of one tile.

    Without a conflict the component is one object (rule 2). Otherwise links are taken with the most
    evidence first — the most shared pixels, then the highest IoS, ties broken by what the instances
    are, so the result does not depend on input order — and two groups are joined only when no tile
    has an instance in each that are neighbours (:func:`are_neighbours`): 1–2 px of boundary noise in
    one tile can make a terraced house overlap its neighbour's copy in the next tile, but the tile that
    saw both said they are two. IoS alone is no order: a house whose jittered edge reaches a pixel
    column into the shared zone overlaps the neighbour's copy there with IoS 1 on a few pixels, while
    the neighbour's true fragment overlaps it on thousands with IoS 0.99.
    """
    by_tile: dict[int, list[int]] = {}
    for i in members:
        by_tile.setdefault(border[i].tile_id, []).append(i)
    conflicts: set[tuple[int, int]] = set()
    for same in by_tile.values():
        for x, i in enumerate(same):
            for j in same[x + 1 :]:
                if are_neighbours(border[i], border[j]):
                    conflicts.add((min(i, j), max(i, j)))
    if not conflicts:
        return [sorted(members)]
    group = {i: {i} for i in members}

    def order(link: Link) -> tuple[int, float, tuple[Any, ...]]:
        a, b = sorted((_key(border[link.i]), _key(border[link.j])))
        return (-link.shared_px, -link.ios, (a, b))

    for link in sorted(links, key=order):
        i, j = link.i, link.j
        gi, gj = group[i], group[j]
        if gi is gj or any((min(x, y), max(x, y)) in conflicts for x in gi for y in gj):
            continue
        gi |= gj
        for k in gj:
            group[k] = gi
    unique = {id(g): g for g in group.values()}
    return sorted(sorted(g) for g in unique.values())


def group_border_instances(border: Sequence[Instance], tiles: TileLookup, ios_threshold: float) -> list[list[int]]:
    """Group border instances that are one object; return index groups (each sorted, list sorted)."""
    groups: list[list[int]] = []
    for members, links in link_components(border, tiles, ios_threshold):
        groups.extend(split_component(members, links, border))
    return sorted(groups)


def fuse(members: Sequence[Instance], tiles: TileLookup) -> Instance:
    """Fuse instances of one object seen by several tiles into one instance (``tile_id = -1``)."""
    if len(members) == 1:
        return members[0]
    c0 = min(m.col_off for m in members)
    r0 = min(m.row_off for m in members)
    c1 = max(m.col_off + m.width for m in members)
    r1 = max(m.row_off + m.height for m in members)
    shape = (r1 - r0, c1 - c0)
    union = np.zeros(shape, dtype=bool)
    from_core = np.zeros(shape, dtype=bool)
    owner = np.full(shape, -1, dtype=np.int64)  # which member tile's core holds each pixel (-1: none)
    for m in members:
        mr, mc = m.row_off - r0, m.col_off - c0
        union[mr : mr + m.height, mc : mc + m.width] |= m.mask
        core = _bounds(tiles[m.tile_id].core)
        zone = _overlap(m.bounds(), core)
        cz = _overlap((c0, r0, c1, r1), core)
        if cz is not None:
            owner[cz[1] - r0 : cz[3] - r0, cz[0] - c0 : cz[2] - c0] = m.tile_id
        if zone is not None:
            zc0, zr0, zc1, zr1 = zone
            from_core[zr0 - r0 : zr1 - r0, zc0 - c0 : zc1 - c0] |= m.mask[
                zr0 - m.row_off : zr1 - m.row_off, zc0 - m.col_off : zc1 - m.col_off
            ]
    mask = fill_seam_holes(from_core | (union & (owner < 0)), union, owner)
    best = max(members, key=lambda m: (m.score, -m.class_id))
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:  # cannot happen for non-empty members, but never return an empty instance
        return best
    return Instance(
        row_off=r0 + int(rows[0]),
        col_off=c0 + int(cols[0]),
        mask=np.ascontiguousarray(mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]),
        score=best.score,
        class_id=best.class_id,
        tile_id=-1,
    )


def fill_seam_holes(mask: npt.NDArray[np.bool_], union: npt.NDArray[np.bool_], owner: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """Fill the holes of a fused mask that no tile saw: inside some member's mask, or a thin slit where cores meet.

    Taking each core's pixels from its own tile can leave a few pixels where cores meet that the owning
    tile's (jittered) outline missed and the other tiles' outlines cover: a hole no tile saw. A real
    hole (a courtyard) is a hole of every member, so no member covers it and it stays.

    Two notches side by side, one in each tile's outline on either side of the line where their cores
    meet, leave a slit that no member covers either. ``owner`` is the member tile whose core holds
    each pixel (-1 for none); a hole is also filled when it is thin — no pixel of it farther than
    :data:`NEIGHBOUR_GAP_PX` from the mask (a slit up to 4 px across), the outline noise the merge allows
    elsewhere — and touches the cores of two different members. A courtyard is wider, and one inside a
    single core, or between one member's core and pixels no member's core holds, is never touched.
    """
    holes = ndimage.binary_fill_holes(mask) & ~mask
    if not holes.any():
        return mask
    lab, n = ndimage.label(holes)
    index = np.arange(1, n + 1)
    fill = np.asarray(ndimage.minimum(union, lab, index), dtype=bool)
    if not fill.all():
        thin = np.asarray(ndimage.maximum(ndimage.distance_transform_edt(holes), lab, index)) <= NEIGHBOUR_GAP_PX
        boxes = ndimage.find_objects(lab)
        for k in np.flatnonzero(thin & ~fill):
            rows, cols = boxes[k]
            # One pixel around the hole's box (a hole never touches the canvas edge: the mask encloses it).
            near = (slice(rows.start - 1, rows.stop + 1), slice(cols.start - 1, cols.stop + 1))
            ring = ndimage.binary_dilation(lab[near] == k + 1, structure=np.ones((3, 3), dtype=bool)) & mask[near]
            cores = np.unique(owner[near][ring])
            fill[k] = np.count_nonzero(cores >= 0) >= 2  # two member cores meet there (-1: no member's core)
    if not fill.any():
        return mask
    return mask | np.isin(lab, np.flatnonzero(fill) + 1)


def area_in_core(instance: Instance, tile: Tile) -> int:
    """Return how many of ``instance``'s pixels lie inside ``tile``'s core."""
    zone = _overlap(instance.bounds(), _bounds(tile.core))
    return _mask_area_in(instance, zone) if zone is not None else 0


def is_unconfirmed(members: Sequence[Instance], tiles: TileLookup) -> bool:
    """Return whether a group is one instance, linked to nothing, lying mostly outside its tile's core (rule 4)."""
    if len(members) != 1 or members[0].tile_id < 0:
        return False
    inst = members[0]
    return 2 * area_in_core(inst, tiles[inst.tile_id]) < inst.area_px


def close_groups(border: Sequence[Instance], groups: Iterable[Sequence[int]], tiles: TileLookup) -> list[Instance]:
    """Fuse each group of ``border`` into one instance, dropping unconfirmed lone instances (rule 4)."""
    out: list[Instance] = []
    for g in groups:
        members = [border[i] for i in g]
        if not is_unconfirmed(members, tiles):
            out.append(fuse(members, tiles))
    return out


def merge_border_instances(border: Sequence[Instance], tiles: TileLookup, ios_threshold: float) -> list[Instance]:
    """Group and fuse border instances; returns one instance per object."""
    return close_groups(border, group_border_instances(border, tiles, ios_threshold), tiles)


def merge_across_tiles(instances: Iterable[Instance], tiles: TileLookup, ios_threshold: float = 0.5) -> list[Instance]:
    """Merge per-tile instances (``tile_id`` set) into one instance per object across the raster."""
    private, border = split_private(instances, tiles)
    return private + merge_border_instances(border, tiles, ios_threshold)


def block_exclusive_window(tiles: Sequence[Tile], rows: range, cols: range) -> Window | None:
    """Return the pixels that no tile outside a rectangular block of the tile grid reads.

    A block is the tiles whose ``row`` is in ``rows`` and ``col`` in ``cols``. It generalises a tile's
    ``exclusive`` window to many tiles: an instance whose box lies inside it cannot be linked to any
    instance of a tile outside the block, so a group made only of such instances is final within the block.

    Args:
        tiles: Every tile of the raster's plan (their read windows, in working-grid pixels).
        rows: Tile-grid rows of the block.
        cols: Tile-grid columns of the block.

    Returns:
        The window in working-grid pixels, or ``None`` when every pixel of the block is also read outside it.
    """
    height = max(int(t.read.row_off + t.read.height) for t in tiles)
    width = max(int(t.read.col_off + t.read.width) for t in tiles)
    r0, r1, c0, c1 = 0, height, 0, width
    # Tile starts and ends grow monotonically along each axis, so the tiles just outside the block bound it.
    for t in tiles:
        top, left = int(t.read.row_off), int(t.read.col_off)
        bottom, right = top + int(t.read.height), left + int(t.read.width)
        if t.row < rows.start:
            r0 = max(r0, bottom)
        elif t.row >= rows.stop:
            r1 = min(r1, top)
        if t.col < cols.start:
            c0 = max(c0, right)
        elif t.col >= cols.stop:
            c1 = min(c1, left)
    if r0 >= r1 or c0 >= c1:
        return None
    return Window(c0, r0, c1 - c0, r1 - r0)


def merge_block(
    border: Sequence[Instance], tiles: TileLookup, exclusive: Window | None, ios_threshold: float
) -> tuple[list[Instance], list[Instance]]:
    """Merge the border instances of one block of tiles as far as the block alone can decide.

    Groups are formed exactly as :func:`group_border_instances` forms them. A link component whose members
    all lie inside ``exclusive`` (see :func:`block_exclusive_window`) has no link to any tile outside the
    block, so it is split and its groups closed now (fused, or dropped by rule 4 as in :func:`close_groups`).
    Any other component may continue outside (and an outside link could change how it splits): its
    members are returned unfused, to be merged again with the open instances of
    the neighbouring blocks. Applying this from small blocks up to one block covering the raster gives
    exactly :func:`merge_border_instances`, while each step only sees the instances near one block's
    edges.

    Args:
        border: Border instances of the block's tiles (and open instances of its sub-blocks).
        tiles: Lookup of every tile an instance names in ``tile_id``.
        exclusive: Pixels no tile outside the block reads, or ``None`` (nothing can be closed).
        ios_threshold: As in :func:`group_border_instances`.

    Returns:
        ``(finished, open)``: fused instances of closed groups (less those rule 4 drops), and members of
        open groups.
    """
    closed: list[list[int]] = []
    still_open: list[Instance] = []
    for members, links in link_components(border, tiles, ios_threshold):
        if exclusive is not None and all(window_contains(exclusive, *border[i].bounds()) for i in members):
            closed.extend(split_component(members, links, border))
        else:
            still_open.extend(border[i] for i in members)
    return close_groups(border, sorted(closed), tiles), still_open
