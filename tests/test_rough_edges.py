"""Bad inputs and rough edges a new user meets (issues 18 and 11): one line naming the cause and the fix, exit code 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from geomask.testing import write_scene
from tests.helpers import UTM, UTM_TRANSFORM
from tests.test_bad_input import assert_clean_failure, run_cli

Scene = tuple[Path, Path]


@pytest.fixture
def scene(tmp_path: Path) -> Scene:
    """A 160² scene with two objects and a config running the truth detector on it."""
    labels = np.zeros((160, 160), np.int32)
    labels[20:60, 30:90] = 1
    labels[100:140, 100:150] = 2
    image, label_path = write_scene(tmp_path, labels, UTM_TRANSFORM, UTM)
    cfg = tmp_path / "truth.yaml"
    cfg.write_text(yaml.safe_dump({"detector": {"factory": "geomask.testing:truth_detector", "options": {"labels": str(label_path)}}}))
    return image, cfg


def _random_files(folder: Path, n: int, seed: int) -> list[Path]:
    """Random bytes, some behind a pickle or zip header (what torch's loader tries first), of random lengths."""
    rng = np.random.default_rng(seed)
    headers = [b"", b"\x80\x02", b"PK\x03\x04"]
    paths = []
    for i in range(n):
        path = folder / f"random{i:02d}.pt"
        path.write_bytes(headers[i % 3] + rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes())
        paths.append(path)
    return paths


def test_random_files_as_weights_are_one_line_each(tmp_path: Path, scene: Scene, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    weights = tmp_path / "weights"
    weights.mkdir()
    for path in _random_files(weights, 60, seed=0):
        code, err = run_cli(["predict", str(scene[0]), "-o", str(tmp_path / "out.gpkg"), "--weights", str(path), "--serial"], capsys)
        assert_clean_failure(code, err, str(path), tmp_path)
        assert "not a readable PyTorch checkpoint" in err, err


def test_a_random_file_as_weights_on_a_dask_cluster_is_one_line(tmp_path: Path, scene: Scene, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    (path,) = _random_files(tmp_path, 1, seed=36)
    code, err = run_cli(["predict", str(scene[0]), "-o", str(tmp_path / "out.gpkg"), "--weights", str(path), "--workers", "1"], capsys)
    errors = [ln for ln in err.splitlines() if "error" in ln.lower()]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "not a readable PyTorch checkpoint" in errors[0]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out")]


def test_pickled_code_in_weights_is_explained_in_our_words(tmp_path: Path, scene: Scene, capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": Path("x")}, evil)
    code, err = run_cli(["predict", str(scene[0]), "-o", str(tmp_path / "out.gpkg"), "--weights", str(evil), "--serial"], capsys)
    assert_clean_failure(code, err, "holds pickled Python objects", tmp_path)
    assert "which could run arbitrary code; geomask loads only weights-only checkpoints" in err, err
