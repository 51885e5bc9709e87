"""The one read → normalise → detect → clean loop, shared by the serial path and the Dask detect task.

Tiles are read (windowed, normalised by :class:`geomask.raster.RasterReader`) in a background thread one
batch ahead (:func:`prefetch`), so reading overlaps inference. A tile that cannot be read, or that the
detector rejects for a data reason (a :class:`GeomaskError`), is recorded as a :class:`TileFailure`
and the rest goes on: the serial and the distributed paths have the same failure semantics because
they run this same code. Instances are clipped to their tile and its valid pixels and tagged with the
tile (:func:`clean_instances`), then handed to the caller batch by batch.
"""

from __future__ import annotations

import contextlib
import ctypes
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from geomask.detect.base import Detector, TileImage
from geomask.errors import DetectorError, GeomaskError, first_line
from geomask.instances import Instance, from_mask
from geomask.raster import RasterReader
from geomask.tiling import Tile

T = TypeVar("T")
# A run of nodata tiles still hands control back this often, so a stop request is seen promptly.
SKIPPED_PER_YIELD = 32


@dataclass(frozen=True)
class TileFailure:
    """A tile that produced no result for a data reason: ``stage`` is ``read`` or ``detect``."""

    tile: int
    stage: str
    error: str


@dataclass
class ReadBatch:
    """Tiles read together: the images to detect, how many tiles had no valid pixel, which failed."""

    images: list[TileImage] = field(default_factory=list)
    skipped: int = 0
    failures: list[TileFailure] = field(default_factory=list)


@dataclass
class TileRun:
    """What :func:`run_tiles` did: counts and the failed tiles (instances went to the callback)."""

    n_tiles: int = 0
    n_skipped: int = 0
    n_instances: int = 0
    failures: list[TileFailure] = field(default_factory=list)


def _libc_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to trim
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, so RSS creeps up with image size)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Produce ``items`` from a background thread, ``depth`` ahead, so reading overlaps inference."""
    q: queue.Queue[tuple[bool, object]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put((True, item))
            q.put((False, None))
        except BaseException as err:  # noqa: BLE001 - re-raised in the consumer
            q.put((False, err))

    thread = threading.Thread(target=work, daemon=True, name="geomask-prefetch")
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                if isinstance(item, BaseException):
                    raise item
                return
            yield item  # type: ignore[misc]
    finally:
        # The consumer stopped (done, closed early, or raised): unblock the producer if it waits on a full
        # queue, so the thread ends and frees the tiles it holds instead of living on in a worker.
        stop.set()
        while thread.is_alive():
            with contextlib.suppress(queue.Empty):
                q.get(timeout=0.1)


def read_batches(reader: RasterReader, tiles: Sequence[Tile], batch_size: int) -> Iterator[ReadBatch]:
    """Read tiles into batches, skipping tiles with no valid pixel and isolating unreadable ones.

    A batch is yielded when it holds ``batch_size`` images, and also after every
    :data:`SKIPPED_PER_YIELD` nodata tiles, so that a consumer (and Ctrl-C) is never kept waiting
    while a long nodata collar is read.
    """
    batch = ReadBatch()
    for tile in tiles:
        try:
            pixels, valid = reader.read(tile.read)
        except GeomaskError as err:
            batch.failures.append(TileFailure(tile.index, "read", first_line(err)))
            continue
        if not valid.any():
            batch.skipped += 1
            if batch.skipped >= SKIPPED_PER_YIELD:
                yield batch
                batch = ReadBatch()
            continue
        batch.images.append(TileImage(tile, pixels, valid))
        if len(batch.images) == batch_size:
            yield batch
            batch = ReadBatch()
    if batch.images or batch.skipped or batch.failures:
        yield batch


def clean_instances(image: TileImage, found: Iterable[Instance]) -> list[Instance]:
    """Clip a detector's instances to the tile and its valid pixels, tag them with the tile, drop empties."""
    win = image.tile.read
    r0, c0 = int(win.row_off), int(win.col_off)
    h, w = image.valid.shape
    out = []
    for inst in found:
        rr0, cc0 = inst.row_off - r0, inst.col_off - c0
        if rr0 < 0 or cc0 < 0 or rr0 + inst.height > h or cc0 + inst.width > w:
            raise DetectorError(
                f"detector returned an instance at rows {inst.row_off}..{inst.row_off + inst.height}, cols "
                f"{inst.col_off}..{inst.col_off + inst.width}, outside tile {win}; instances must be in global pixels"
            )
        mask = inst.mask & image.valid[rr0 : rr0 + inst.height, cc0 : cc0 + inst.width]
        if not mask.any():
            continue
        if mask.sum() != inst.mask.sum():
            clipped = from_mask(mask, row_off=inst.row_off, col_off=inst.col_off, score=inst.score, class_id=inst.class_id)
            if clipped is None:
                continue
            inst = clipped
        out.append(Instance(inst.row_off, inst.col_off, inst.mask, inst.score, inst.class_id, image.tile.index))
    return out


def detect_batch(
    detector: Detector, images: list[TileImage], failures: list[TileFailure], lock: threading.Lock | None = None
) -> list[list[Instance]]:
    """Detect and clean a batch; when it fails for a data reason, retry tile by tile to name the bad tiles.

    Returns one list of cleaned instances per image that succeeded, in order (failed ones are left out
    and appended to ``failures``). ``lock`` serialises calls when several threads share one model.
    """
    if not images:
        return []
    try:
        with lock or contextlib.nullcontext():
            results = detector.detect(images)
        if len(results) != len(images):
            raise DetectorError(f"detector {detector.name} returned {len(results)} results for a batch of {len(images)} tiles")
        return [clean_instances(image, found) for image, found in zip(images, results, strict=True)]
    except GeomaskError as err:
        if len(images) == 1:
            failures.append(TileFailure(images[0].tile.index, "detect", first_line(err)))
            return []
        return [insts for image in images for insts in detect_batch(detector, [image], failures, lock)]


def run_tiles(
    reader: RasterReader,
    tiles: Sequence[Tile],
    detector: Detector,
    batch_size: int,
    consume: Callable[[list[Instance]], None],
    lock: threading.Lock | None = None,
    progress: Callable[[int, int, int], None] | None = None,
) -> TileRun:
    """Read, detect and clean ``tiles``, handing each tile's instances to ``consume``; failures are recorded.

    ``progress`` is told, per batch, how many tiles it covered (detected, skipped as nodata or failed),
    the instances found in them and the tiles that failed.
    """
    run = TileRun(n_tiles=len(tiles))
    for n_batches, batch in enumerate(prefetch(read_batches(reader, tiles, batch_size)), start=1):
        run.n_skipped += batch.skipped
        failed_before, found_before = len(run.failures), run.n_instances
        run.failures += batch.failures
        for found in detect_batch(detector, batch.images, run.failures, lock):
            run.n_instances += len(found)
            consume(found)
        if progress is not None:
            n_failed = len(run.failures) - failed_before  # read failures and tiles the detector rejected
            progress(len(batch.images) + batch.skipped + len(batch.failures), run.n_instances - found_before, n_failed)
        del batch
        if n_batches % 16 == 0:
            release_freed_memory()
    return run
