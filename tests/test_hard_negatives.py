"""Hard-negative mining on the square scenes of :mod:`tests.test_train`: where false positives are found, and how chips use them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch

from geomask.detect.checkpoint import load_checkpoint
from geomask.detect.training import TrainSettings, train
from geomask.detect.training.chips import ChipReader, ChipSampler, Spot, open_rasters
from geomask.detect.training.hard_negatives import false_positives
from geomask.detect.training.trainer import Trainer, load_data
from tests.test_train import SETTINGS, square_scene

CHIP = 64


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[tuple[ChipReader, TrainSettings, list[tuple[int, int, int]]]]:
    image, labels, squares = square_scene(tmp_path, "a", 21, size=200, n=6)
    settings = TrainSettings(arch="tiny_fpn", chip_size_px=CHIP, gsd_m=None, min_area_px=4, color_jitter=0.0)
    reader = ChipReader(open_rasters([str(image)], [str(labels)], settings), CHIP, 4)
    yield reader, settings, squares
    reader.close()


class FixedBoxes(torch.nn.Module):
    """Stands in for the detector: reports the same boxes ``(x0, y0, x1, y1, score)`` on every chip."""

    def __init__(self, boxes: list[tuple[float, float, float, float, float]]):
        super().__init__()
        self.boxes = boxes

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        assert not self.training  # mining runs the model in eval mode
        b = torch.tensor([box[:4] for box in self.boxes], dtype=torch.float32)
        return [{"boxes": b, "scores": torch.tensor([box[4] for box in self.boxes])} for _ in images]


def test_false_positives_are_unlabelled_detections_mapped_to_the_working_grid(
    scene: tuple[ChipReader, TrainSettings, list[tuple[int, int, int]]],
) -> None:
    reader, _, squares = scene
    r, c, side = squares[0]
    row0, col0 = max(0, r - 10), max(0, c - 10)  # a window holding the first square 10 px from its corner
    on_label = (c - col0, r - row0, c - col0 + side, r - row0 + side, 0.9)
    labelled = np.zeros((CHIP, CHIP), dtype=bool)
    for rr, cc, ss in squares:
        labelled[max(0, rr - row0) : max(0, rr - row0 + ss), max(0, cc - col0) : max(0, cc - col0 + ss)] = True
    free = next((y, x) for y in range(0, CHIP - 8, 2) for x in range(0, CHIP - 8, 2) if not labelled[y : y + 8, x : x + 8].any())
    off_label = (free[1], free[0], free[1] + 8, free[0] + 8, 0.8)
    weak = (free[1], free[0], free[1] + 8, free[0] + 8, 0.2)
    model = FixedBoxes([on_label, off_label, weak])
    model.train()
    spots = false_positives(model, reader, [(0, float(row0), float(col0))], 0.5, torch.device("cpu"), nullcontext)
    assert spots == [Spot(0, row0 + free[0] + 4.0, col0 + free[1] + 4.0)]  # only the confident, unlabelled one
    assert model.training  # left as it was found


def test_chips_are_centred_near_the_mined_spots(scene: tuple[ChipReader, TrainSettings, list[tuple[int, int, int]]]) -> None:
    reader, settings, _ = scene
    spot = Spot(0, 120.0, 90.0)
    sampler = ChipSampler(reader, settings.replace(hard_negatives=1.0, scale_jitter=(1.0, 1.0)), np.random.default_rng(0))
    reads: list[tuple[float, float]] = []
    read = reader.read

    def spy(k: int, row: float, col: float, scale: float = 1.0):  # type: ignore[no-untyped-def]
        reads.append((row, col))
        return read(k, row, col, scale)

    reader.read = spy  # type: ignore[method-assign]
    sampler.add_hard_negatives([spot])
    for _ in range(10):
        sampler.sample()
    assert len(reads) >= 10
    for row, col in reads:  # the spot lies in the chip's central 80 %
        assert row + 0.1 * CHIP - 1e-6 <= spot.row <= row + 0.9 * CHIP + 1e-6
        assert col + 0.1 * CHIP - 1e-6 <= spot.col <= col + 0.9 * CHIP + 1e-6


def test_mining_switched_off_or_not_started_changes_no_chip(scene: tuple[ChipReader, TrainSettings, list[tuple[int, int, int]]]) -> None:
    reader, settings, _ = scene
    plain = ChipSampler(reader, settings, np.random.default_rng(3))
    off = ChipSampler(reader, settings, np.random.default_rng(3))
    off.add_hard_negatives([Spot(0, 50.0, 50.0)])  # a pool, but hard_negatives is 0
    empty = ChipSampler(reader, settings.replace(hard_negatives=0.5), np.random.default_rng(3))  # on, nothing mined yet
    for _ in range(6):
        a, b, c = plain.sample(), off.sample(), empty.sample()
        assert np.array_equal(a.pixels, b.pixels) and np.array_equal(a.pixels, c.pixels)


def test_training_mines_on_schedule_and_keeps_a_pool(tmp_path: Path) -> None:
    image, labels, _ = square_scene(tmp_path, "m", 5, size=256, n=10)
    settings = SETTINGS.replace(
        iterations=30, warmup_iters=10, val_every=30, hard_negatives=0.5, hard_negative_every=10, hard_negative_windows=4, keep="last"
    )
    out = tmp_path / "hn.pt"
    train([str(image)], [str(labels)], out, settings, val_images=[])
    records = [json.loads(line) for line in out.with_name("hn.pt.log.jsonl").read_text().splitlines()]
    mined = [r for r in records if "hard_negatives_found" in r]
    assert [r["iteration"] for r in mined] == [10, 20, 30]
    pools = [r["hard_negative_pool"] for r in mined]
    assert pools == sorted(pools) and pools[-1] == sum(r["hard_negatives_found"] for r in mined)


def test_a_resumed_run_keeps_its_mined_pool(tmp_path: Path) -> None:
    image, labels, _ = square_scene(tmp_path, "p", 5, size=256, n=10)
    settings = SETTINGS.replace(
        iterations=10, warmup_iters=5, val_every=10, hard_negatives=0.5, hard_negative_every=10, hard_negative_windows=4, keep="last"
    )
    out = tmp_path / "hn.pt"
    data = load_data([str(image)], [str(labels)], [], None, settings)
    first = Trainer(settings, data, out)
    first.start(resume=False)
    first.sampler.add_hard_negatives([Spot(0, 50.0, 60.0), Spot(0, 120.5, 30.25)])
    first.save_last(0, 0.0)  # as a run stopped after mining would
    resumed = Trainer(settings, data, out)
    resumed.start(resume=True)
    assert resumed.sampler.hard == first.sampler.hard
    resumed.run(0.0)
    records = [json.loads(line) for line in out.with_name("hn.pt.log.jsonl").read_text().splitlines()]
    (mined,) = [r for r in records if "hard_negatives_found" in r]
    assert mined["hard_negative_pool"] == 2 + mined["hard_negatives_found"]  # the resumed pool, then what it found
    assert load_checkpoint(out.with_name("hn.pt.last.pt")).train_state["hard_negatives"][:2] == [[0, 50.0, 60.0], [0, 120.5, 30.25]]
