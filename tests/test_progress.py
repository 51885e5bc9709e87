"""Progress, on the Dask path and --serial alike: a live bar when stderr is a terminal, log lines when it is not."""

from __future__ import annotations

import io
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from geomask.config import Config, merge_overrides
from geomask.pipeline import predict_raster
from geomask.testing import truth_detector, write_scene
from tests.helpers import UTM, UTM_TRANSFORM
from workflows.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    screen = _Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    progress = Progress(10, every_s=0.0)
    progress.add(3, 7, computed=True, failures=1)
    progress.add(7, 5, computed=True)
    progress.log()
    text = screen.getvalue()
    assert "10/10" in text and "objects=12" in text and "failed=1" in text


def test_no_terminal_keeps_the_log_lines(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with caplog.at_level(logging.INFO, logger="workflows.progress"):
        progress = Progress(10, every_s=0.0)
        progress.add(3, 7, computed=True)
    assert progress.bar is None and "tiles 3/10 (30%" in caplog.text and "7 objects" in caplog.text


def test_a_serial_run_on_a_terminal_gets_the_same_bar(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--serial draws the Dask path's bar: tiles done/total, objects found, failed tiles."""
    labels = np.zeros((160, 160), np.int32)
    labels[20:60, 30:90] = 1
    labels[100:140, 100:150] = 2
    image, label_path = write_scene(tmp_path, labels, UTM_TRANSFORM, UTM)
    detector = truth_detector(str(label_path))
    screen = _Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    config = merge_overrides(Config(), {"tiling.size_px": 64, "tiling.overlap_px": 8})
    _, feats, summary = predict_raster(image, config, detector, progress_every_s=0.0)
    text = screen.getvalue()
    assert summary.n_tiles == 9 and len(feats) == 2
    assert "tiles: 100%" in text and "9/9" in text and "failed=0" in text, text
    objects = [int(m) for m in re.findall(r"objects=(\d+)", text)]
    assert objects and objects[-1] >= 2 and objects == sorted(objects)  # per-tile pieces before the merge, counted as they come


def test_a_serial_run_off_a_terminal_logs_lines_with_objects(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    labels = np.zeros((160, 160), np.int32)
    labels[20:60, 30:90] = 1
    image, label_path = write_scene(tmp_path, labels, UTM_TRANSFORM, UTM)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    config = merge_overrides(Config(), {"tiling.size_px": 64, "tiling.overlap_px": 8})
    with caplog.at_level(logging.INFO, logger="geomask"):
        predict_raster(image, config, truth_detector(str(label_path)), progress_every_s=0.0)
    lines = [r.getMessage() for r in caplog.records if "tiles/s" in r.getMessage()]
    assert lines and "tiles 9/9 (100%)" in lines[-1] and " objects, " in lines[-1], lines
