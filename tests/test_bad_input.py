"""Bad input: one line naming the cause and the fix, exit code 2, no traceback, no partial output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from geomask.testing import write_scene
from tests.helpers import UTM_TRANSFORM, write_raster
from workflows.cli import main


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
        raise SystemExit(0)
    return int(exc.value.code or 0), capsys.readouterr().err


def assert_clean_failure(code: int, err: str, needle: str, out_dir: Path) -> None:
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert needle in lines[0], lines[0]
    leftovers = [p.name for p in out_dir.iterdir() if p.name.startswith((".out", "out"))]
    assert leftovers == [], leftovers


@pytest.fixture
def scene(tmp_path: Path) -> tuple[Path, Path]:
    labels = np.zeros((200, 200), np.int32)
    labels[50:100, 50:120] = 1
    image, label_path = write_scene(tmp_path, labels, UTM_TRANSFORM, "EPSG:32633")
    cfg = tmp_path / "truth.yaml"
    cfg.write_text(yaml.safe_dump({"detector": {"factory": "geomask.testing:truth_detector", "options": {"labels": str(label_path)}}}))
    return image, cfg


def test_not_a_raster(tmp_path: Path, scene: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "notes.tif"
    bogus.write_text("this is not an image\n")
    code, err = run_cli(["predict", str(bogus), "-o", str(tmp_path / "out.gpkg"), "-c", str(scene[1]), "--serial"], capsys)
    assert_clean_failure(code, err, "not a readable raster", tmp_path)


def test_truncated_raster(tmp_path: Path, scene: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    data = np.random.default_rng(0).integers(0, 255, (3, 600, 600)).astype(np.uint8)
    full = write_raster(tmp_path / "full.tif", data, tiled=True, blockxsize=256, blockysize=256)
    cut = tmp_path / "cut.tif"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    code, err = run_cli(["predict", str(cut), "-o", str(tmp_path / "out.gpkg"), "-c", str(scene[1]), "--serial"], capsys)
    assert_clean_failure(code, err, "corrupt or truncated", tmp_path)


def test_no_crs(tmp_path: Path, scene: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    path = write_raster(tmp_path / "nocrs.tif", np.ones((3, 64, 64), np.uint8), crs=None)
    code, err = run_cli(["predict", str(path), "-o", str(tmp_path / "out.gpkg"), "-c", str(scene[1]), "--serial"], capsys)
    assert_clean_failure(code, err, "has no CRS", tmp_path)


def test_all_nodata_image(tmp_path: Path, scene: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    path = write_raster(tmp_path / "empty.tif", np.zeros((3, 300, 300), np.uint8), nodata=0)
    code, err = run_cli(["predict", str(path), "-o", str(tmp_path / "out.gpkg"), "-c", str(scene[1]), "--serial"], capsys)
    assert_clean_failure(code, err, "no valid pixels", tmp_path)


def test_unknown_config_key(tmp_path: Path, scene: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("tiling:\n  sise_px: 256\n")
    code, err = run_cli(["predict", str(scene[0]), "-o", str(tmp_path / "out.gpkg"), "-c", str(cfg), "--serial"], capsys)
    assert_clean_failure(code, err, "unknown key 'tiling.sise_px'", tmp_path)


def test_overlap_not_less_than_size(tmp_path: Path, scene: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "predict",
        str(scene[0]),
        "-o",
        str(tmp_path / "out.gpkg"),
        "-c",
        str(scene[1]),
        "--serial",
        "--tile-size",
        "128",
        "--overlap",
        "128",
    ]
    code, err = run_cli(args, capsys)
    assert_clean_failure(code, err, "overlap_px (128) must be less than tiling.size_px (128)", tmp_path)


def test_bad_config_value_type(tmp_path: Path, scene: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("merge:\n  ios_threshold: 2.0\n")
    code, err = run_cli(["predict", str(scene[0]), "-o", str(tmp_path / "out.gpkg"), "-c", str(cfg), "--serial"], capsys)
    assert_clean_failure(code, err, "merge.ios_threshold", tmp_path)


def test_unwritable_output_folder(tmp_path: Path, scene: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "missing" / "out.gpkg"
    code, err = run_cli(["predict", str(scene[0]), "-o", str(target), "-c", str(scene[1]), "--serial"], capsys)
    assert_clean_failure(code, err, "does not exist; create it first", tmp_path)


def test_unknown_output_extension(tmp_path: Path, scene: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(["predict", str(scene[0]), "-o", str(tmp_path / "out.xyz"), "-c", str(scene[1]), "--serial"], capsys)
    assert_clean_failure(code, err, "cannot infer an output format from '.xyz'", tmp_path)


def test_bad_detector_factory(tmp_path: Path, scene: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    args = ["predict", str(scene[0]), "-o", str(tmp_path / "out.gpkg"), "--detector", "nosuch.module:build", "--serial"]
    code, err = run_cli(args, capsys)
    assert_clean_failure(code, err, "cannot import detector module 'nosuch.module'", tmp_path)


def test_failure_mid_run_leaves_no_output(tmp_path: Path, scene: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "missing_labels.yaml"
    cfg.write_text(
        yaml.safe_dump({"detector": {"factory": "geomask.testing:truth_detector", "options": {"labels": str(tmp_path / "gone.tif")}}})
    )
    with pytest.raises(Exception, match=r"gone\.tif"):  # a crash inside the detector, not a validated input
        main(["predict", str(scene[0]), "-o", str(tmp_path / "out.gpkg"), "-c", str(cfg), "--serial"])
    assert not (tmp_path / "out.gpkg").exists() and not (tmp_path / "out.gpkg.config.yaml").exists()


def test_console_script_exit_code_is_2(tmp_path: Path) -> None:
    bogus = tmp_path / "x.tif"
    bogus.write_text("no")
    exe = Path(sys.executable).with_name("geomask")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "workflows.cli"]
    proc = subprocess.run(
        [*cmd, "predict", str(bogus), "-o", str(tmp_path / "out.gpkg"), "--serial"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "not a readable raster" in proc.stderr


@pytest.fixture
def wrong_weights(tmp_path: Path) -> Path:
    """A plain state dict of the tiny architecture: it does not fit the default ResNet-50-FPN."""
    torch = pytest.importorskip("torch")
    from geomask.detect.maskrcnn import build_model

    torch.manual_seed(0)
    path = tmp_path / "tiny_state.pt"
    torch.save(build_model("tiny_fpn", 1, 64).state_dict(), path)
    return path


def test_incompatible_weights(tmp_path: Path, scene: tuple[Path, Path], wrong_weights: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(["predict", str(scene[0]), "-o", str(tmp_path / "out.gpkg"), "--weights", str(wrong_weights), "--serial"], capsys)
    assert_clean_failure(code, err, "does not fit architecture 'resnet50_fpn'", tmp_path)


def test_incompatible_weights_on_a_dask_cluster(
    tmp_path: Path, scene: tuple[Path, Path], wrong_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["predict", str(scene[0]), "-o", str(tmp_path / "out.gpkg"), "--weights", str(wrong_weights), "--workers", "1"]
    code, err = run_cli(args, capsys)
    # The cluster's own log lines (dashboard link) may precede it; the error itself is one line, from the worker.
    errors = [ln for ln in err.splitlines() if "error" in ln.lower()]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "does not fit architecture 'resnet50_fpn'" in errors[0]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out")]


def test_weights_that_would_run_code_are_refused(tmp_path: Path, scene: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": Path("x")}, evil)  # a pickled object, not plain data
    code, err = run_cli(["predict", str(scene[0]), "-o", str(tmp_path / "out.gpkg"), "--weights", str(evil), "--serial"], capsys)
    assert_clean_failure(code, err, str(evil), tmp_path)
    assert "holds pickled Python objects" in err and "which could run arbitrary code; geomask loads only weights-only checkpoints" in err, (
        err
    )


def test_bad_input_on_the_default_dask_path_fails_before_a_cluster_starts(
    tmp_path: Path, scene: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    bogus = tmp_path / "notes.tif"
    bogus.write_text("this is not an image\n")
    code, err = run_cli(["predict", str(bogus), "-o", str(tmp_path / "out.gpkg"), "-c", str(scene[1])], capsys)
    assert_clean_failure(code, err, "not a readable raster", tmp_path)  # one line: no cluster log, no worker traceback


def test_malformed_scheduler_address(tmp_path: Path, scene: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(
        ["predict", str(scene[0]), "-o", str(tmp_path / "out.gpkg"), "-c", str(scene[1]), "--scheduler", "foo://x:1"], capsys
    )
    assert_clean_failure(code, err, "cannot reach the Dask scheduler at foo://x:1", tmp_path)


def test_overlap_option_replaces_an_overlap_in_metres(tmp_path: Path, scene: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    cfg = yaml.safe_load(scene[1].read_text())
    cfg["tiling"] = {"size_px": 64, "overlap_m": 8.0}
    path = tmp_path / "metres.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, err = run_cli(
        ["predict", str(scene[0]), "-o", str(tmp_path / "out.gpkg"), "-c", str(path), "--overlap", "12", "--serial"], capsys
    )
    assert code == 0, err
    resolved = yaml.safe_load((tmp_path / "out.gpkg.config.yaml").read_text())
    assert (resolved["tiling"]["overlap_px"], resolved["tiling"]["overlap_m"]) == (12, None)


@pytest.mark.parametrize("mode", [["--workers", "1"], ["--serial"]], ids=["dask", "serial"])
def test_band_selection_the_model_cannot_take_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: list[str]) -> None:
    """The model declares the bands it takes (``ModelHints.channels``); a selection giving others stops before any tile."""
    two_bands = write_raster(tmp_path / "two.tif", np.random.default_rng(0).integers(1, 255, (2, 200, 200)).astype(np.uint8))
    cfg = tmp_path / "two_bands.yaml"
    cfg.write_text(yaml.safe_dump({"raster": {"bands": [1, 2]}}))
    code, err = run_cli(["predict", str(two_bands), "-o", str(tmp_path / "out.gpkg"), "-c", str(cfg), *mode], capsys)
    errors = [ln for ln in err.splitlines() if "error" in ln.lower()]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "takes 3-band tiles but raster.bands selects [1, 2]" in errors[0] and "the raster has only 2 band(s)" in errors[0]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out")]


def _crashing_config(tmp_path: Path) -> Path:
    """A config whose detector crashes on its first tile: a run that reaches any tile fails with a traceback."""
    cfg = tmp_path / "crash.yaml"
    cfg.write_text(
        yaml.safe_dump({"detector": {"factory": "geomask.testing:truth_detector", "options": {"labels": str(tmp_path / "gone.tif")}}})
    )
    return cfg


@pytest.mark.parametrize("mode", [["--workers", "1"], ["--serial"]], ids=["dask", "serial"])
def test_an_existing_output_is_refused_before_any_tile_without_overwrite(
    tmp_path: Path, scene: tuple[Path, Path], capsys: pytest.CaptureFixture[str], mode: list[str]
) -> None:
    old = tmp_path / "old.geojson"
    old.write_text('{"type": "FeatureCollection", "features": []}\n')
    code, err = run_cli(["predict", str(scene[0]), "-o", str(old), "-c", str(_crashing_config(tmp_path)), *mode], capsys)
    assert_clean_failure(code, err, f"output {old} exists; add --overwrite to replace it", tmp_path)
    assert old.read_text() == '{"type": "FeatureCollection", "features": []}\n'
    assert not (tmp_path / "old.geojson.config.yaml").exists()


def test_overwrite_replaces_an_existing_output(tmp_path: Path, scene: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    import pyogrio

    old = tmp_path / "old.geojson"
    old.write_text('{"type": "FeatureCollection", "features": []}\n')
    code, err = run_cli(["predict", str(scene[0]), "-o", str(old), "-c", str(scene[1]), "--serial", "--overwrite"], capsys)
    assert code == 0, err
    assert len(pyogrio.read_dataframe(old)) == 1 and (tmp_path / "old.geojson.config.yaml").is_file()


def test_a_read_only_output_is_refused_even_with_overwrite(
    tmp_path: Path, scene: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    old = tmp_path / "old.gpkg"
    code, err = run_cli(["predict", str(scene[0]), "-o", str(old), "-c", str(scene[1]), "--serial"], capsys)
    assert code == 0, err
    old.chmod(0o444)
    before = old.read_bytes()
    code, err = run_cli(["predict", str(scene[0]), "-o", str(old), "-c", str(scene[1]), "--serial", "--overwrite"], capsys)
    assert_clean_failure(code, err, f"output {old} is read-only; make it writable", tmp_path)
    assert old.read_bytes() == before and oct(old.stat().st_mode & 0o777) == "0o444"


def _evaluation_inputs(tmp_path: Path) -> tuple[Path, Path]:
    import geopandas as gpd
    from shapely.geometry import box

    truth = tmp_path / "truth.geojson"
    gpd.GeoDataFrame(geometry=[box(500000, 4999990, 500010, 5000000)], crs=32633).to_file(truth)
    return truth, truth


def test_evaluate_json_is_not_overwritten_without_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pred, truth = _evaluation_inputs(tmp_path)
    scores = tmp_path / "scores.json"
    scores.write_text("{}\n")
    code, err = run_cli(["evaluate", str(pred), str(truth), "--json", str(scores)], capsys)
    assert code == 2 and err.strip() == f"geomask: error: output {scores} exists; add --overwrite to replace it, or choose another output"
    assert scores.read_text() == "{}\n"
    code, err = run_cli(["evaluate", str(pred), str(truth), "--json", str(scores), "--overwrite"], capsys)
    assert code == 0, err
    assert '"f1": 1.0' in scores.read_text()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, a folder nobody (not even root) can create files in")
def test_evaluate_json_into_an_unwritable_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pred, truth = _evaluation_inputs(tmp_path)
    code, err = run_cli(["evaluate", str(pred), str(truth), "--json", "/proc/self/scores.json"], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip() == "geomask: error: output folder /proc/self is not writable; choose another output path"
