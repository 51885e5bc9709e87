"""Configs: the shipped YAML files load, default.yaml says exactly what the code defaults are."""

from __future__ import annotations

from pathlib import Path

import pytest

from geomask.config import Config, dump_config, load_config, merge_overrides
from geomask.errors import ConfigError

CONFIGS = sorted(
    p for p in (Path(__file__).parents[1] / "configs").glob("*.yaml") if not p.name.startswith("cluster-")
)  # cluster files: test_slurm.py


def test_default_yaml_is_the_code_defaults() -> None:
    assert load_config(Path(__file__).parents[1] / "configs" / "default.yaml") == Config()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path: Path) -> None:
    load_config(path)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_builds_its_detector(path: Path) -> None:
    """Detector options are free keywords of the factory: a misspelt one fails only when the detector is built."""
    from geomask.detect.base import load_detector

    cfg = load_config(path)
    options = {**cfg.detector.options, "device": "cpu"}
    detector = load_detector(cfg.detector.factory, options)
    assert detector.hints.channels == 3


def test_dump_round_trips(tmp_path: Path) -> None:
    cfg = merge_overrides(Config(), {"tiling.size_px": 300, "detector.options": {"weights": "x.pt"}})
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    "text, needle",
    [
        ("tiling: {size_px: 64, overlap_px: 64}", "must be less than tiling.size_px"),
        ("raster: {normalize: {percentiles: [98, 2]}}", "percentiles"),
        ("nonsense: 1", "unknown key 'nonsense'"),
        ("- a\n- b", "must hold a mapping"),
        ("tiling: [", "not valid YAML"),
        ("tiling: {overlap_px: 8, overlap_m: 2.0}", "not both"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path: Path, text: str, needle: str) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        load_config(p)
