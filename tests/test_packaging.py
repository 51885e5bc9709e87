"""The torch-free install (requirements/onnx-runtime.txt) stays the package's dependencies without torch."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
TORCH = {"torch", "torchvision"}


def name(requirement: str) -> str:
    return Requirement(requirement).name.lower()


def test_torch_free_requirements_are_the_dependencies_without_torch_plus_onnxruntime() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = [line.strip() for line in (ROOT / "requirements" / "onnx-runtime.txt").read_text().splitlines()]
    listed = [line for line in listed if line and not line.startswith("#")]
    expected = [r for r in project["dependencies"] if name(r) not in TORCH]
    runtime = [r for r in project["optional-dependencies"]["onnx"] if name(r) == "onnxruntime"]
    assert runtime, "the onnx extra names onnxruntime"
    assert listed == expected + runtime
    assert not {name(r) for r in listed} & TORCH
