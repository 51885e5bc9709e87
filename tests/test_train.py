"""Training on synthetic rasters with vector labels: the loss falls and the model finds its objects.

The scene is cheap on purpose (bright squares on a dark textured background, the ``tiny_fpn``
architecture, 128-px chips), so the whole file runs in well under a minute on two CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine

from geomask.config import config_from_dict
from geomask.detect.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from geomask.detect.maskrcnn import build, build_model
from geomask.detect.training import TrainSettings, train
from geomask.detect.training.augment import augment
from geomask.detect.training.chips import ChipReader, chip_target, open_rasters
from geomask.detect.training.trainer import autocast_dtype, native_bf16_cpu
from geomask.detect.training.validation import match_f1, touches_edge
from geomask.detect.training.weights import init_weights
from geomask.errors import ConfigError, LabelError, WeightsError
from geomask.pipeline import predict_raster

CRS = "EPSG:32633"
TRANSFORM = Affine(0.5, 0.0, 400_000.0, 0.0, -0.5, 6_000_000.0)


def square_scene(directory: Path, name: str, seed: int, size: int = 384, n: int = 24) -> tuple[Path, Path, list[tuple[int, int, int]]]:
    """Write a GeoTIFF of bright squares on a noisy dark background and their polygons as GeoJSON.

    Each seed puts its scene at a different place on the map, so label files of several scenes do
    not overlap each other's rasters. Returns ``(image, labels, squares)``, squares as ``(row, col, side)`` in pixels.
    """
    transform = TRANSFORM @ Affine.translation(seed * 1000, 0)
    rng = np.random.default_rng(seed)
    taken = np.zeros((size, size), dtype=bool)
    squares: list[tuple[int, int, int]] = []
    while len(squares) < n:
        side = int(rng.integers(10, 22))
        r, c = (int(v) for v in rng.integers(2, size - side - 2, size=2))
        if not taken[max(0, r - 4) : r + side + 4, max(0, c - 4) : c + side + 4].any():
            taken[r : r + side, c : c + side] = True
            squares.append((r, c, side))
    pixels = rng.integers(20, 70, size=(3, size, size)).astype(np.uint8)
    pixels[:, taken] = rng.integers(190, 230, size=(3, int(taken.sum()))).astype(np.uint8)
    image = directory / f"{name}.tif"
    with rasterio.open(image, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs=CRS, transform=transform) as dst:
        dst.write(pixels)
    features = []
    for r, c, side in squares:
        ring = [transform @ (x, y) for x, y in ((c, r), (c + side, r), (c + side, r + side), (c, r + side), (c, r))]
        features.append({"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}})
    labels = directory / f"{name}.geojson"
    collection = {"type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32633"}}}
    labels.write_text(json.dumps({**collection, "features": features}))
    return image, labels, squares


SETTINGS = TrainSettings(
    arch="tiny_fpn",
    classes=("square",),
    chip_size_px=128,
    gsd_m=None,
    batch_size=4,
    iterations=100,
    lr=3e-3,
    warmup_iters=10,
    val_every=100,
    threads=1,
    device="cpu",
    log_every=10,
    attribution="synthetic",
    amp=False,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[tuple[int, int, int]]]:
    """Train the tiny model once for the module; return (checkpoint, validation image, its squares)."""
    d = tmp_path_factory.mktemp("train")
    img_a, lab_a, _ = square_scene(d, "a", 1)
    img_b, lab_b, squares_b = square_scene(d, "b", 2)
    out = d / "model.pt"
    train([str(img_a), str(img_b)], [str(lab_a), str(lab_b)], out, SETTINGS, val_images=[str(img_b)])
    return out, img_b, squares_b


def test_loss_decreases(trained: tuple[Path, Path, list[tuple[int, int, int]]]) -> None:
    log = [json.loads(line) for line in trained[0].with_name("model.pt.log.jsonl").read_text().splitlines()]
    losses = [rec["loss"] for rec in log if "loss" in rec]
    assert len(losses) >= 10
    assert np.mean(losses[-3:]) < 0.7 * losses[0]


def test_trained_model_finds_its_objects(trained: tuple[Path, Path, list[tuple[int, int, int]]]) -> None:
    ckpt = load_checkpoint(trained[0])
    assert ckpt.meta is not None and ckpt.meta.metrics["val_f1"] > 0.8
    assert ckpt.meta.arch == "tiny_fpn" and ckpt.meta.tile_size_px == 128 and ckpt.meta.attribution == "synthetic"


def test_trained_model_through_the_pipeline(trained: tuple[Path, Path, list[tuple[int, int, int]]]) -> None:
    """The checkpoint's hints drive predict; polygons land on the squares (global coordinates right)."""
    model, image, squares = trained
    detector = build(str(model), device="cpu")
    assert detector.hints.tile_size_px == 128
    cfg = config_from_dict({"tiling": {"overlap_px": 32}})
    plan, feats, _ = predict_raster(image, cfg, detector)
    assert plan.config.tiling.size_px == 128
    truth = []
    for r, c, side in squares:
        m = np.zeros((384, 384), dtype=bool)
        m[r : r + side, c : c + side] = True
        truth.append(m)
    preds = []
    from rasterio.features import rasterize

    for f in feats:
        preds.append(rasterize([f.geometry], out_shape=(384, 384), transform=TRANSFORM @ Affine.translation(2000, 0)).astype(bool))
    tp, fp, fn = match_f1(preds, [f.score for f in feats], truth)
    f1 = 2 * tp / max(1, 2 * tp + fp + fn)
    assert f1 > 0.8, (tp, fp, fn)


def test_checkpoint_inference_defaults_drive_predict_and_the_config_overrides_them(
    trained: tuple[Path, Path, list[tuple[int, int, int]]], tmp_path: Path
) -> None:
    """Squares are 25-121 m²: a carried min_area_m2 of 60 drops the small ones unless the config says otherwise."""
    from geomask.detect.checkpoint import set_inference_defaults
    from geomask.pipeline import build_detector

    model, image, _ = trained
    carried = set_inference_defaults(model, tmp_path / "carried.pt", {"min_area_m2": 60.0, "score_threshold": 0.3})
    options = {"weights": str(carried), "device": "cpu"}
    plan, feats, _ = predict_raster(
        image, config_from_dict({"detector": {"options": options}}), build_detector(config_from_dict({"detector": {"options": options}}))
    )
    assert plan.config.vectorize.min_area_m2 == 60.0 and feats and min(f.geometry.area for f in feats) >= 60.0
    override = {"detector": {"options": {**options, "score_threshold": 0.9}}, "vectorize": {"min_area_m2": 1.0}}
    cfg = config_from_dict(override)
    det = build_detector(cfg)
    assert det.score_threshold == 0.9  # type: ignore[attr-defined]
    plan, more, _ = predict_raster(image, cfg, det)
    assert plan.config.vectorize.min_area_m2 == 1.0 and min(f.geometry.area for f in more) < 60.0


@pytest.mark.parametrize("mode", [["--serial"], ["--workers", "1"]], ids=["serial", "dask"])
def test_predict_with_an_ensemble_from_the_command_line(
    trained: tuple[Path, Path, list[tuple[int, int, int]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: list[str]
) -> None:
    """``--ensemble`` of the model with a copy of itself writes the model's own polygons; the provenance names the ensemble.

    Through a Dask cluster too, with the member given as a path relative to the working directory: the worker
    processes build the ensemble from the resolved path and hash the member file into the provenance.
    """
    import pyogrio

    from workflows.cli import main

    model, image, _ = trained
    (tmp_path / "copy.pt").write_bytes(model.read_bytes())
    monkeypatch.chdir(tmp_path)
    base = ["predict", str(image), "--weights", str(model), *mode, "--no-preview"]
    for name, extra in (("plain", []), ("pair", ["--ensemble", "copy.pt"])):
        main([*base, *extra, "-o", str(tmp_path / f"{name}.gpkg")])
    plain, pair = (pyogrio.read_dataframe(tmp_path / f"{n}.gpkg", layer="instances") for n in ("plain", "pair"))
    assert len(plain) >= 5 and len(pair) == len(plain)
    assert set(pair["model"]) == {f"maskrcnn-tiny_fpn:{model.name}+1"}
    assert sorted(round(a, 3) for a in pair.geometry.area) == sorted(round(a, 3) for a in plain.geometry.area)


def test_chips_and_targets(tmp_path: Path) -> None:
    image, labels, squares = square_scene(tmp_path, "s", 3, size=200, n=10)
    settings = TrainSettings(arch="tiny_fpn", chip_size_px=128, gsd_m=None)
    (raster,) = open_rasters([str(image)], [str(labels)], settings)
    assert len(raster.labels) == 10
    reader = ChipReader([raster], 128, 4)
    chip = reader.read(0, 0, 0, 1.0)
    inside = [(r, c, s) for r, c, s in squares if r + s <= 128 and c + s <= 128]
    for r, c, s in inside:  # a whole square becomes exactly its own mask
        assert any(m[r : r + s, c : c + s].all() and m.sum() == s * s for m in chip.masks)
    target = chip_target(augment(chip, np.random.default_rng(0), 0.1))
    assert target["masks"].shape[0] == target["boxes"].shape[0] == len(chip.masks)
    assert (target["boxes"][:, 2] > target["boxes"][:, 0]).all()
    small = ChipReader([raster], 256, 4).read(0, 0, 0, 1.0)  # raster smaller than a chip: zero padding
    assert small.pixels.shape == (3, 256, 256) and not small.valid[200:].any()
    reader.close()


def test_validation_f1_counts(tmp_path: Path) -> None:
    a = np.zeros((8, 8), dtype=bool)
    a[:4, :4] = True
    b = np.zeros((8, 8), dtype=bool)
    b[4:, 4:] = True
    assert match_f1([a, b, a], [0.9, 0.8, 0.7], [a]) == (1, 2, 0)
    assert match_f1([], [], [a]) == (0, 0, 1)
    assert match_f1([a, b], [0.9, 0.8], [a], ignore_true=[True], ignore_pred=[False, True]) == (0, 0, 0)
    assert match_f1([b], [0.9], [a], ignore_true=[True]) == (0, 1, 0)
    assert touches_edge(b) and not touches_edge(np.pad(a, 1)[:8, :8])


def test_bad_settings_and_labels(tmp_path: Path) -> None:
    image, labels, _ = square_scene(tmp_path, "s", 4, size=128, n=3)
    with pytest.raises(ConfigError, match="chip_size_px"):
        train([str(image)], [str(labels)], tmp_path / "m.pt", TrainSettings(chip_size_px=100))
    with pytest.raises(LabelError, match="matches no file"):
        train([str(image)], [str(tmp_path / "nope*.geojson")], tmp_path / "m.pt", TrainSettings(arch="tiny_fpn"))
    with pytest.raises(ConfigError, match="validation"):
        train([str(image)], [str(labels)], tmp_path / "m.pt", TrainSettings(arch="tiny_fpn"), val_images=[str(image)])


@pytest.mark.parametrize("native", [False, True])
def test_amp_auto_uses_bf16_only_where_the_cpu_has_it(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # The CPU's feature probes are the hardware boundary: both answers are exercised on any machine.
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert native_bf16_cpu() is native
    assert autocast_dtype("auto", cpu) == (torch.bfloat16 if native else None)
    assert autocast_dtype(True, cpu) == torch.bfloat16  # forced: bf16 even where it is emulated
    assert autocast_dtype(False, cpu) is None and autocast_dtype(False, cuda) is None
    assert autocast_dtype("auto", cuda) == torch.float16 == autocast_dtype(True, cuda)
    assert TrainSettings().amp == "auto" and TrainSettings(amp=True).amp is True
    with pytest.raises(ConfigError, match="amp"):
        TrainSettings(amp="fast")


def test_resume_continues_where_it_stopped(tmp_path: Path) -> None:
    image, labels, _ = square_scene(tmp_path, "r", 5, size=160, n=6)
    short = SETTINGS.replace(iterations=4, val_every=2, log_every=1, batch_size=2, rois_per_image=32)
    out = tmp_path / "r.pt"
    train([str(image)], [str(labels)], out, short.replace(iterations=2))
    state = load_checkpoint(out.with_name("r.pt.last.pt")).train_state
    assert state is not None and state["iteration"] == 2
    result = train([str(image)], [str(labels)], out, short, resume=True)
    assert result.iterations == 4
    log = [json.loads(line) for line in out.with_name("r.pt.log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log if "loss" in r] == [1, 2, 3, 4]
    with pytest.raises(WeightsError, match="was trained as 'tiny_fpn'"):
        train([str(image)], [str(labels)], out, short.replace(arch="resnet18_fpn"), resume=True)


def test_weight_average_is_what_gets_validated_saved_and_resumed(tmp_path: Path) -> None:
    """With ``ema_decay`` the validated and written model is the moving average (not the last step),
    ``keep="last"`` writes the latest weights whatever their score, ``keep="best"`` the best-scoring
    ones, and resuming carries the average on (and refuses to drop it silently)."""
    img_a, lab_a, _ = square_scene(tmp_path, "ea", 7, size=160, n=6)
    img_b, lab_b, _ = square_scene(tmp_path, "eb", 8, size=160, n=6)
    data = ([str(img_a), str(img_b)], [str(lab_a), str(lab_b)])
    short = SETTINGS.replace(iterations=4, val_every=2, log_every=1, batch_size=2, rois_per_image=32, ema_decay=0.9, keep="last")
    out = tmp_path / "e.pt"
    train(*data, out, short.replace(iterations=2), val_images=[str(img_b)])
    with pytest.raises(ConfigError, match="weight average; pass --ema"):
        train(*data, out, short.replace(ema_decay=None), val_images=[str(img_b)], resume=True)
    result = train(*data, out, short, val_images=[str(img_b)], resume=True)
    last = load_checkpoint(out.with_name("e.pt.last.pt"))
    saved = load_checkpoint(out)
    assert last.train_state is not None and last.train_state["ema_steps"] == 4
    assert saved.meta is not None and saved.meta.metrics["iteration"] == 4 and "val_f1" in saved.meta.metrics  # the latest
    average = last.train_state["ema"]
    assert all(torch.equal(saved.state_dict[k], v) for k, v in average.items())
    floats = [k for k, v in average.items() if v.is_floating_point()]
    assert any(not torch.equal(average[k], last.state_dict[k]) for k in floats)  # an average, not the last step
    assert result.history[-1]["iteration"] == 4

    best_out = tmp_path / "b.pt"
    result = train(*data, best_out, short.replace(keep="best"), val_images=[str(img_b)])
    scores = [h["val_f1"] for h in result.history]
    best = load_checkpoint(best_out).meta
    assert best is not None and best.metrics["val_f1"] == max(scores)
    assert best.metrics["iteration"] == result.history[scores.index(max(scores))]["iteration"]
    for bad, match in (({"ema_decay": 1.0}, "ema_decay"), ({"keep": "worst"}, "keep")):
        with pytest.raises(ConfigError, match=match):
            train(*data, tmp_path / "x.pt", short.replace(**bad))  # type: ignore[arg-type]


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from workflows.cli import main

    image, labels, _ = square_scene(tmp_path, "c", 6, size=128, n=4)
    out = tmp_path / "cli.pt"
    defaults = tmp_path / "inference.json"
    defaults.write_text('{"score_threshold": 0.6, "tta": 4, "shape": "regularized"}')
    args = ["train", "--images", str(image), "--labels", str(labels), "-o", str(out), "--arch", "tiny_fpn", "--native-gsd"]
    main([*args, "--iterations", "2", "--val-every", "2", "--chip-size", "64", "--batch-size", "2", "--threads", "1", "--classes", "sq"])
    first = load_checkpoint(out).meta
    assert first is not None and first.training["precision"] == ("bfloat16" if native_bf16_cpu() else "float32")  # amp: auto
    main(
        [
            *args,
            "--iterations",
            "2",
            "--val-every",
            "1",
            "--chip-size",
            "64",
            "--batch-size",
            "2",
            "--threads",
            "1",
            "--classes",
            "sq",
            "--ema",
            "0.9",
            "--keep",
            "last",
            "--copy-paste",
            "0.5",
            "--jpeg",
            "0.5",
            "--hue-jitter",
            "0.05",
            "--inference-defaults",
            str(defaults),
            "--amp",
            "off",
            "--overwrite",  # onto the first run's checkpoint
        ]
    )
    assert capsys.readouterr().out.count("2 iterations") == 2
    ckpt = load_checkpoint(out)
    assert ckpt.meta is not None and ckpt.meta.classes == ("sq",) and ckpt.meta.gsd_m is None
    assert ckpt.meta.training["command"].startswith("geomask train --images") and "--arch tiny_fpn" in ckpt.meta.training["command"]
    assert "--ema 0.9 --keep last" in ckpt.meta.training["command"] and json.loads(ckpt.meta.training["settings"])["ema_decay"] == 0.9
    assert ckpt.meta.inference == {"score_threshold": 0.6, "tta": 4, "shape": "regularized"}
    assert ckpt.meta.training["precision"] == "float32" and json.loads(ckpt.meta.training["settings"])["amp"] is False
    assert json.loads(ckpt.meta.training["settings"])["copy_paste"] == 0.5 and "--copy-paste 0.5" in ckpt.meta.training["command"]
    trained = out.read_bytes()
    with pytest.raises(SystemExit) as exc:  # onto a model without --overwrite (or --resume): refused before training starts
        main([*args, "--iterations", "2"])
    assert exc.value.code == 2 and f"output {out} exists; add --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == trained
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  bogus: 1\n")
    with pytest.raises(SystemExit) as exc:
        main([*args, "-c", str(bad)])
    assert exc.value.code == 2 and "unknown training setting(s) ['bogus']" in capsys.readouterr().err


HEADS = sorted(
    f"roi_heads.{name}.{part}"
    for name in ("box_predictor.cls_score", "box_predictor.bbox_pred", "mask_predictor.mask_fcn_logits")
    for part in ("weight", "bias")
)


def _tiny_checkpoint(path: Path, classes: tuple[str, ...], arch: str = "tiny_fpn", seed: int = 123) -> dict[str, torch.Tensor]:
    """Save a freshly initialised model (seeded apart from training's seed 0) as a geomask checkpoint."""
    torch.manual_seed(seed)
    state = build_model(arch, len(classes), 64).state_dict()
    save_checkpoint(path, CheckpointMeta(arch=arch, classes=classes, tile_size_px=64), state)
    return state


def test_init_from_a_checkpoint_loads_every_tensor_or_replaces_the_heads(tmp_path: Path) -> None:
    same = _tiny_checkpoint(tmp_path / "one.pt", ("square",))
    torch.manual_seed(0)
    model = build_model("tiny_fpn", 1, 64)
    assert init_weights(model, str(tmp_path / "one.pt"), 1, "tiny_fpn") == []
    assert all(torch.equal(v, same[k]) for k, v in model.state_dict().items())

    three = _tiny_checkpoint(tmp_path / "three.pt", ("a", "b", "c"))
    torch.manual_seed(0)
    model = build_model("tiny_fpn", 1, 64)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    assert init_weights(model, str(tmp_path / "three.pt"), 1, "tiny_fpn") == HEADS
    state = model.state_dict()
    assert (
        state["roi_heads.box_predictor.cls_score.weight"].shape[0] == 2 and three["roi_heads.box_predictor.cls_score.weight"].shape[0] == 4
    )
    for k, v in state.items():
        assert torch.equal(v, fresh[k] if k in HEADS else three[k]), k


def test_init_from_another_architecture_is_one_line(tmp_path: Path) -> None:
    _tiny_checkpoint(tmp_path / "tiny.pt", ("square",))
    model = build_model("resnet18_fpn", 1, 64)
    with pytest.raises(WeightsError, match="holds a 'tiny_fpn' model but training uses arch 'resnet18_fpn'; set --arch tiny_fpn") as exc:
        init_weights(model, str(tmp_path / "tiny.pt"), 1, "resnet18_fpn")
    assert "\n" not in str(exc.value)
    torch.save(load_checkpoint(tmp_path / "tiny.pt").state_dict, tmp_path / "plain.pt")  # no metadata naming the arch
    with pytest.raises(WeightsError, match="does not fit architecture 'resnet18_fpn'") as exc:
        init_weights(model, str(tmp_path / "plain.pt"), 1, "resnet18_fpn")
    assert "\n" not in str(exc.value)


def test_train_starts_from_the_init_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One step at a negligible learning rate: the trained parameters are still the checkpoint's."""
    image, labels, _ = square_scene(tmp_path, "i", 7, size=128, n=4)
    start = _tiny_checkpoint(tmp_path / "start.pt", ("square",), seed=123)
    settings = SETTINGS.replace(
        chip_size_px=64, iterations=1, val_every=1, log_every=1, batch_size=1, rois_per_image=16, lr=1e-12, weight_decay=0.0
    )
    out = tmp_path / "tuned.pt"
    with caplog.at_level("INFO", logger="geomask"):
        train([str(image)], [str(labels)], out, settings.replace(init=str(tmp_path / "start.pt")))
    assert any(m.startswith(f"initialised from {tmp_path / 'start.pt'} (") for m in caplog.messages)
    tuned = load_checkpoint(out).state_dict
    params = [k for k, _ in build_model("tiny_fpn", 1, 64).named_parameters()]
    assert all(torch.allclose(tuned[k], start[k], atol=1e-8) for k in params)
    train([str(image)], [str(labels)], tmp_path / "scratch.pt", settings)  # without init: training's own seed, other weights
    scratch = load_checkpoint(tmp_path / "scratch.pt").state_dict
    conv = "backbone.body.stem.0.weight"  # randomly initialised (BatchNorm weights start at 1 either way)
    assert not torch.allclose(scratch[conv], start[conv], atol=1e-3) and torch.allclose(tuned[conv], start[conv], atol=1e-8)


def test_init_coco_by_name_from_the_torch_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``init='coco'``: a locally made file in torchvision's cache stands in for the download (91 COCO classes).

    Like the real file it has no BatchNorm step counters (torchvision trained it with frozen BatchNorm).
    """
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(1)
    coco = {k: v for k, v in build_model("resnet50_fpn", 90, 128).state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(coco, cache / MaskRCNN_ResNet50_FPN_Weights.DEFAULT.url.rsplit("/", 1)[-1])
    torch.manual_seed(0)
    model = build_model("resnet50_fpn", 2, 128)
    fresh = {k: v.clone() for k, v in model.state_dict().items() if k in HEADS}
    assert init_weights(model, "coco", 2, "resnet50_fpn") == HEADS
    state = model.state_dict()
    assert state["roi_heads.box_predictor.cls_score.weight"].shape == (3, 1024)
    assert state["roi_heads.box_predictor.bbox_pred.weight"].shape == (12, 1024)
    assert state["roi_heads.mask_predictor.mask_fcn_logits.weight"].shape == (3, 256, 1, 1)
    assert coco["roi_heads.box_predictor.cls_score.weight"].shape == (91, 1024)
    for k, v in state.items():
        if k in HEADS:
            assert torch.equal(v, fresh[k]), k
        elif k in coco:
            assert torch.equal(v, coco[k]), k
    assert all(k.endswith("num_batches_tracked") for k in state if k not in coco)
    with pytest.raises(WeightsError, match="holds a 'resnet50_fpn' model but training uses arch 'tiny_fpn'; set --arch resnet50_fpn"):
        init_weights(build_model("tiny_fpn", 2, 64), "coco", 2, "tiny_fpn")


def test_no_validation_trains_on_every_raster(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--no-val`` (``val_images=[]``): the final run of a recipe chosen by cross-validation trains on every
    raster, including the last folder's that the default would hold out, and needs ``keep="last"``."""
    from workflows.cli import main

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    img_a, lab_a, _ = square_scene(tmp_path / "a", "na", 9, size=128, n=4)
    img_b, lab_b, _ = square_scene(tmp_path / "b", "nb", 10, size=128, n=4)
    data = ([str(img_a), str(img_b)], [str(lab_a), str(lab_b)])
    short = SETTINGS.replace(iterations=2, val_every=2, log_every=1, batch_size=2, chip_size_px=64, rois_per_image=16)
    held = train(*data, tmp_path / "held.pt", short)
    meta = load_checkpoint(tmp_path / "held.pt").meta
    assert meta is not None and meta.training["val_images"] == ["nb.tif"] and meta.training["images"] == ["na.tif"]
    assert "val_f1" in held.history[-1]
    train(*data, tmp_path / "all.pt", short.replace(keep="last"), val_images=[])
    meta = load_checkpoint(tmp_path / "all.pt").meta
    assert meta is not None and meta.training["val_images"] == [] and sorted(meta.training["images"]) == ["na.tif", "nb.tif"]
    assert "val_f1" not in meta.metrics and meta.metrics["iteration"] == 2
    with pytest.raises(ConfigError, match="keep last"):
        train(*data, tmp_path / "best.pt", short, val_images=[])
    args = ["train", "--images", str(img_a), "--labels", str(lab_a), "-o", str(tmp_path / "c.pt"), "--arch", "tiny_fpn"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--native-gsd", "--no-val", "--val-images", str(img_b), "--keep", "last"])
    assert exit_info.value.code == 2 and "--no-val and --val-images" in capsys.readouterr().err
