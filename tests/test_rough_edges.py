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


@pytest.mark.parametrize(
    ("yaml_text", "needle"),
    [
        (
            "tiling:\n  size_px: '512'\n",
            "tiling.size_px: Input should be a valid integer, got the text '512'; write the value without quotes",
        ),
        ("dask:\n  gpu: 'yes'\n", "dask.gpu: Input should be a valid boolean, got the text 'yes'"),
        ("merge:\n  ios_threshold: '0.5'\n", "merge.ios_threshold: Input should be a valid number"),
        ("export:\n  geojson_crs: EPSG:99999\n", "export.geojson_crs: 'EPSG:99999' is not a CRS pyproj knows"),
        ("export:\n  layer: ''\n", "export.layer"),
    ],
    ids=["int-as-text", "bool-as-text", "float-as-text", "unknown-crs", "empty-layer"],
)
def test_config_values_are_checked_as_written_when_loaded(
    tmp_path: Path, scene: Scene, capsys: pytest.CaptureFixture[str], yaml_text: str, needle: str
) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    code, err = run_cli(["predict", str(scene[0]), "-o", str(tmp_path / "out.geojson"), "-c", str(cfg), "--serial"], capsys)
    assert_clean_failure(code, err, needle, tmp_path)


def test_yaml_integers_and_lists_still_fill_float_and_tuple_fields(tmp_path: Path) -> None:
    from geomask.config import load_config

    cfg = tmp_path / "ok.yaml"
    cfg.write_text(
        "merge:\n  ios_threshold: 1\nraster:\n  gsd_m: 1\n  normalize:\n    percentiles: [1, 99]\nexport:\n  geojson_crs: EPSG:3857\n"
    )
    loaded = load_config(cfg)
    assert (loaded.merge.ios_threshold, loaded.raster.gsd_m, loaded.raster.normalize.percentiles) == (1.0, 1.0, (1.0, 99.0))


def test_only_result_changing_settings_refuse_a_resume(tmp_path: Path, scene: Scene) -> None:
    from geomask.config import load_config, merge_overrides
    from geomask.errors import ConfigError
    from workflows.store import open_run_dir

    base = load_config(scene[1])
    run_dir = tmp_path / "run"
    open_run_dir(run_dir, [scene[0]], base)
    faster = {"detector.batch_size": 16, "dask.n_workers": 3, "dask.threads_per_worker": 2, "dask.retries": 5, "dask.dashboard": False}
    open_run_dir(run_dir, [scene[0]], merge_overrides(base, faster))  # same results: resumable
    for changed in ({"merge.ios_threshold": 0.7}, {"dask.tiles_per_task": 4}, {"tiling.size_px": 64}):
        with pytest.raises(ConfigError, match="another config"):
            open_run_dir(run_dir, [scene[0]], merge_overrides(base, changed))


def test_a_gsd_units_slip_is_refused_naming_both_gsds(tmp_path: Path, scene: Scene, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = yaml.safe_load(scene[1].read_text())
    cfg["raster"] = {"gsd_m": 0.0001}  # meant 0.1 m? 10 cm? -- a 500 000² working grid
    path = tmp_path / "slip.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, err = run_cli(["predict", str(scene[0]), "-o", str(tmp_path / "out.gpkg"), "-c", str(path), "--serial"], capsys)
    assert_clean_failure(
        code, err, "0.25 m/px source resampled to 0.0001 m/px (2501x finer), beyond raster.max_resample_factor 4;", tmp_path
    )
    assert "set raster.max_resample_factor: 2502 to allow it" in err


def _coarse_scene(tmp_path: Path, gsd: float) -> Path:
    from tests.helpers import write_raster

    data = np.zeros((3, 40, 40), np.uint8)
    data[:, 10:20, 10:30] = 255
    return write_raster(tmp_path / "coarse.tif", data, UTM_TRANSFORM @ UTM_TRANSFORM.scale(gsd / 0.25))


def test_a_10m_raster_is_refused_by_a_30cm_model_unless_allowed(tmp_path: Path) -> None:
    from geomask.config import Config, merge_overrides
    from geomask.errors import GeomaskError
    from geomask.pipeline import predict_raster
    from tests.test_pipeline import BrightObjectDetector

    image = _coarse_scene(tmp_path, 10.0)
    with pytest.raises(GeomaskError, match=r"10 m/px source resampled to 0\.3 m/px \(33x finer\), beyond raster\.max_resample_factor 4;"):
        predict_raster(image, Config(), BrightObjectDetector(0.3, 256))
    allowed = merge_overrides(Config(), {"raster.max_resample_factor": 40})
    plan, feats, _ = predict_raster(image, allowed, BrightObjectDetector(0.3, 256))
    assert plan.grid.gsd_m == pytest.approx(0.3, rel=1e-3) and plan.grid.width > 1300 and len(feats) == 1


def test_a_mild_gsd_mismatch_is_warned_about_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from geomask.config import Config
    from geomask.pipeline import predict_raster
    from tests.test_pipeline import BrightObjectDetector

    image = _coarse_scene(tmp_path, 0.5)
    with caplog.at_level("WARNING", logger="geomask"):
        predict_raster(image, Config(), BrightObjectDetector(0.25, 64))
    warned = [r.getMessage() for r in caplog.records if "resampled" in r.getMessage()]
    assert len(warned) == 1 and "0.5 m/px source resampled to 0.25 m/px (2.0x finer)" in warned[0], warned
    caplog.clear()
    with caplog.at_level("WARNING", logger="geomask"):
        predict_raster(image, Config(), BrightObjectDetector(0.4, 64))  # 1.25x: fine, no word
    assert not [r for r in caplog.records if "resampled" in r.getMessage()]


def test_non_square_pixels_are_resampled_to_a_square_grid_at_the_models_gsd(tmp_path: Path) -> None:
    """A 2:1 pixel raster gives the model the same square image, and so the same objects, as a square one."""
    import shapely
    from affine import Affine
    from rasterio.features import rasterize

    from geomask.config import Config
    from geomask.pipeline import predict_raster
    from tests.helpers import write_raster
    from tests.test_pipeline import BrightObjectDetector

    x0, y0 = 400_000.0, 5_600_000.0
    truth = [shapely.box(x0 + 4 * i + 1, y0 - 10 - 2 * (i % 3), x0 + 4 * i + 3.5, y0 - 4) for i in range(12)]  # 12 narrow buildings
    found = {}
    for name, (rx, ry) in {"square": (0.25, 0.25), "2to1": (0.25, 0.5)}.items():
        transform = Affine(rx, 0, x0, 0, -ry, y0)
        shape = (round(16 / ry), round(48 / rx))
        bright = rasterize([(g, 255) for g in truth], out_shape=shape, transform=transform, dtype=np.uint8)
        image = write_raster(tmp_path / f"{name}.tif", np.stack([bright] * 3), transform, crs="EPSG:32633")
        plan, feats, _ = predict_raster(image, Config(), BrightObjectDetector(0.25, 64))
        assert plan.grid.transform.a == pytest.approx(-plan.grid.transform.e) == pytest.approx(0.25), plan.grid.transform
        found[name] = sorted(f.geometry.bounds for f in feats)
    assert len(found["square"]) == 12
    assert np.allclose(found["2to1"], found["square"], atol=0.5)  # one source row (0.5 m) of edge error at most


@pytest.mark.parametrize("mode", [["--serial"], []], ids=["serial", "dask"])
def test_a_folder_given_as_input_is_reported_as_a_folder(
    tmp_path: Path, scene: Scene, capsys: pytest.CaptureFixture[str], mode: list[str]
) -> None:
    folder = tmp_path / "tiles"
    folder.mkdir()
    code, err = run_cli(["predict", str(folder), "-o", str(tmp_path / "out.gpkg"), "-c", str(scene[1]), *mode], capsys)
    assert_clean_failure(
        code, err, f"input {str(folder)!r} is a folder, not a raster; give its files, e.g. '{folder}/*.tif' (quoted)", tmp_path
    )


def test_a_folder_is_a_folder_in_the_library_too(tmp_path: Path) -> None:
    from geomask.errors import RasterReadError
    from geomask.raster import inspect_raster

    with pytest.raises(RasterReadError, match="is a folder, not a raster"):
        inspect_raster(tmp_path)


def _layer(path: Path, geoms: list[object], crs: int = 32633) -> Path:
    import geopandas as gpd

    gpd.GeoDataFrame({"score": [0.9] * len(geoms)}, geometry=geoms, crs=crs).to_file(path)
    return path


@pytest.mark.parametrize(
    "case",
    ["wrong-crs", "point-truth", "empty-truth", "empty-pred"],
)
def test_evaluate_refuses_layers_that_would_score_zeros(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    import geopandas as gpd
    from shapely.geometry import Point, box

    house = box(500_000, 4_999_990, 500_010, 5_000_000)
    pred = _layer(tmp_path / "pred.gpkg", [house])
    truth = _layer(tmp_path / "truth.gpkg", [house])
    if case == "wrong-crs":  # the same numbers, labelled EPSG:3857: 5000 km away
        gpd.GeoDataFrame(geometry=[house], crs=3857).to_file(truth)
    elif case == "point-truth":
        _layer(truth, [Point(500_005, 4_999_995)])
    elif case == "empty-truth":
        gpd.GeoDataFrame(geometry=gpd.GeoSeries([], crs=32633)).to_file(truth)
    else:
        gpd.GeoDataFrame(geometry=gpd.GeoSeries([], crs=32633)).to_file(pred)
    needle = {
        "wrong-crs": "no overlap between the two layers' extents",
        "point-truth": f"truth must be polygons (or boxes drawn as polygons), {truth} holds Point",
        "empty-truth": f"truth {truth} are an empty layer",
        "empty-pred": f"predictions {pred} are an empty layer",
    }[case]
    code, err = run_cli(["evaluate", str(pred), str(truth)], capsys)
    assert_clean_failure(code, err, needle, tmp_path)
    if case == "wrong-crs":
        assert "check their CRSs (EPSG:32633 and EPSG:3857)" in err


def test_train_with_point_labels_says_labels_must_be_polygons(tmp_path: Path, scene: Scene, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    from shapely.geometry import Point

    points = _layer(tmp_path / "crowns.gpkg", [Point(500_010, 4_999_990), Point(500_020, 4_999_980)])
    args = ["train", "--images", str(scene[0]), "--labels", str(points), "-o", str(tmp_path / "out.pt"), "--arch", "tiny_fpn"]
    code, err = run_cli([*args, "--native-gsd", "--iterations", "2", "--chip-size", "64", "--threads", "1"], capsys)
    assert_clean_failure(code, err, "hold Point geometries; training labels must be polygons or boxes", tmp_path)


def test_a_single_band_16_bit_image_is_told_to_set_raster_bands(tmp_path: Path) -> None:
    from geomask.config import Config, merge_overrides
    from geomask.detect.base import ModelHints
    from geomask.errors import RasterContentError
    from geomask.pipeline import predict_raster
    from tests.helpers import write_raster
    from tests.test_pipeline import BrightObjectDetector

    data = np.full((1, 64, 64), 1000, np.uint16)
    data[0, 10:30, 10:40] = 50_000
    image = write_raster(tmp_path / "gray16.tif", data)
    rgb = BrightObjectDetector(0.25, 64)
    rgb.hints = ModelHints(tile_size_px=64, gsd_m=0.25, bands=(1, 2, 3), channels=3)  # what the bundled models declare
    with pytest.raises(
        RasterContentError, match=r"has 1 band\(s\) but raster.bands \(or the model\) asks for \[1, 2, 3\]; set raster.bands: \[1\]"
    ):
        predict_raster(image, Config(), rgb)
    _, feats, _ = predict_raster(image, merge_overrides(Config(), {"raster.bands": [1]}), rgb)  # the fix works
    assert len(feats) == 1


def test_serial_runs_say_what_is_happening(
    tmp_path: Path, scene: Scene, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A model-load line, progress lines every --progress-every seconds, and the load in the closing line."""
    args = ["predict", str(scene[0]), "-o", str(tmp_path / "out.gpkg"), "-c", str(scene[1]), "--tile-size", "64", "--overlap", "8"]
    with caplog.at_level("INFO", logger="geomask"):
        code, _ = run_cli([*args, "--serial", "--progress-every", "0"], capsys)
    assert code == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("loading the model (geomask.testing:truth_detector)") for m in messages), messages
    progress = [m for m in messages if ": tiles " in m and "tiles/s" in m]
    assert len(progress) >= 2 and "tiles 9/9 (100%)" in progress[-1], progress


def test_the_closing_line_reports_the_model_load(tmp_path: Path, scene: Scene, capfd: pytest.CaptureFixture[str]) -> None:
    from workflows.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["predict", str(scene[0]), "-o", str(tmp_path / "out.gpkg"), "-c", str(scene[1]), "--serial"])
        raise SystemExit(0)
    assert exc.value.code in (0, None)
    out = capfd.readouterr().out
    assert "objects from 1 tiles in" in out and "(model load " in out, out


def test_dask_runs_say_when_the_model_loads_and_report_the_start_up(
    tmp_path: Path, scene: Scene, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from workflows.cli import main

    with caplog.at_level("INFO", logger="workflows"), pytest.raises(SystemExit) as exc:
        main(["predict", str(scene[0]), "-o", str(tmp_path / "out.gpkg"), "-c", str(scene[1]), "--workers", "1"])
        raise SystemExit(0)
    assert exc.value.code in (0, None)
    messages = [r.getMessage() for r in caplog.records]
    assert "loading the model (geomask.testing:truth_detector) on 1 worker(s)" in messages, messages
    out = capfd.readouterr().out
    assert "before that: cluster start " in out and ", model load " in out, out


def test_drone_imagery_read_at_a_coarser_model_gsd_is_allowed(tmp_path: Path) -> None:
    """7.4 cm imagery (the README's sample) at the 0.3 m model's GSD is 4x coarser: normal, not refused."""
    from affine import Affine

    from geomask.errors import GeomaskError
    from geomask.raster import inspect_raster, working_grid
    from tests.helpers import write_raster

    image = write_raster(tmp_path / "drone.tif", np.zeros((3, 400, 400), np.uint8), Affine(0.0744, 0, 500_000, 0, -0.0744, 5_000_000))
    grid = working_grid(inspect_raster(image), 0.3, 4.0)
    assert grid.width == round(400 * 0.0744 / 0.3)
    with pytest.raises(GeomaskError, match=r"coarser\), beyond raster\.max_resample_factor 4 \(x4 when coarser\)"):
        working_grid(inspect_raster(image), 0.0744 * 20, 4.0)
