"""Tile planning invariants: cores partition the raster, reads cover it, exclusive zones are private."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geomask.errors import ConfigError
from geomask.tiling import plan_tiles


def _fill(shape: tuple[int, int], windows: list) -> np.ndarray:
    count = np.zeros(shape, dtype=np.int32)
    for w in windows:
        count[w.row_off : w.row_off + w.height, w.col_off : w.col_off + w.width] += 1
    return count


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(1, 900),
    height=st.integers(1, 900),
    size=st.integers(16, 300),
    data=st.data(),
)
def test_cores_partition_and_reads_cover(width: int, height: int, size: int, data: st.DataObject) -> None:
    overlap = data.draw(st.integers(1, size - 1))
    tiles = plan_tiles(width, height, size, overlap)
    assert _fill((height, width), [t.core for t in tiles]).tolist() == np.ones((height, width), np.int32).tolist()
    assert (_fill((height, width), [t.read for t in tiles]) >= 1).all()
    for t in tiles:
        r, c = t.read, t.core
        assert r.col_off >= 0 and r.col_off + r.width <= width and r.row_off >= 0 and r.row_off + r.height <= height
        assert r.width == min(size, width) and r.height == min(size, height)  # full-size tiles, no padding
        assert r.col_off <= c.col_off and c.col_off + c.width <= r.col_off + r.width
        assert r.row_off <= c.row_off and c.row_off + c.height <= r.row_off + r.height
    assert [t.index for t in tiles] == list(range(len(tiles)))


@settings(max_examples=40, deadline=None)
@given(width=st.integers(40, 700), height=st.integers(40, 700), size=st.integers(16, 200), data=st.data())
def test_exclusive_windows_are_read_by_one_tile_only(width: int, height: int, size: int, data: st.DataObject) -> None:
    overlap = data.draw(st.integers(1, size - 1))
    tiles = plan_tiles(width, height, size, overlap)
    reads = _fill((height, width), [t.read for t in tiles])
    for t in tiles:
        if t.exclusive is None:
            continue
        e, c = t.exclusive, t.core
        assert (reads[e.row_off : e.row_off + e.height, e.col_off : e.col_off + e.width] == 1).all()
        assert c.col_off <= e.col_off and e.col_off + e.width <= c.col_off + c.width


def test_raster_smaller_than_a_tile_is_one_tile() -> None:
    (tile,) = plan_tiles(100, 60, 512, 64)
    assert (tile.read.width, tile.read.height) == (100, 60)
    assert tile.core == tile.read and tile.exclusive == tile.read


def test_neighbouring_reads_overlap_by_the_overlap() -> None:
    tiles = plan_tiles(1000, 300, 256, 32)
    first, second = tiles[0], tiles[1]
    assert first.read.col_off + first.read.width - second.read.col_off == 32


@pytest.mark.parametrize("size, overlap", [(256, 256), (256, 0), (256, 300), (8, 2)])
def test_bad_tiling_values_raise_config_error(size: int, overlap: int) -> None:
    with pytest.raises(ConfigError, match="tiling"):
        plan_tiles(1000, 1000, size, overlap)
