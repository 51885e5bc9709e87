"""The job's progress: a live bar when stderr is a terminal, log lines when it is not."""

from __future__ import annotations

import io
import logging
import sys

import pytest

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
