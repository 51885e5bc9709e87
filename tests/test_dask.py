"""The Dask workflow on real local clusters (worker processes): same polygons as the serial path."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed import Client, LocalCluster

from geomask.config import load_config, merge_overrides
from geomask.errors import ConfigError, ExportError
from geomask.pipeline import run_serial
from tests.test_dask_support import SLOW, make_inputs, polygons, serial_polygons, write_config
from workflows.inputs import plan_outputs
from workflows.job import JobSummary, run_job
from workflows.store import open_run_dir, recorded_outputs

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, Path]]:
    return make_inputs(tmp_path_factory.mktemp("scenes"), n=2)


@pytest.fixture(scope="module")
def reference(scenes: list[tuple[Path, Path]], tmp_path_factory: pytest.TempPathFactory) -> list[list[tuple[object, ...]]]:
    """Serial-path polygons of each scene: what every distributed run must reproduce."""
    d = tmp_path_factory.mktemp("serial")
    return [serial_polygons(image, write_config(d / f"{k}.yaml", labels), d / f"{k}.gpkg") for k, (image, labels) in enumerate(scenes)]


def _cluster(n_workers: int) -> tuple[LocalCluster, Client]:
    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0")
    return cluster, Client(cluster)


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    cluster, c = _cluster(2)
    with cluster, c:
        yield c


def _run(
    client: Client, image: Path, config: Path, out: Path, run_dir: Path | None = None, accept_repaired: bool = False, **overrides: object
) -> JobSummary:
    cfg = load_config(config)
    if overrides:
        cfg = merge_overrides(cfg, overrides)
    # Re-running with the same run folder replaces the outputs it wrote (as the CLI does), nothing else.
    owned = recorded_outputs(run_dir) if run_dir else frozenset()
    store = open_run_dir(run_dir, [image], cfg, accept_repaired=accept_repaired) if run_dir else None
    return run_job(client, [image], plan_outputs(str(out), [image], owned=owned), cfg, store, progress_every_s=1.0)


def test_one_and_two_workers_equal_serial(
    client: Client, scenes: list[tuple[Path, Path]], reference: list[list[tuple[object, ...]]], tmp_path: Path
) -> None:
    image, labels = scenes[0]
    config = write_config(tmp_path / "c.yaml", labels)
    summary = _run(client, image, config, tmp_path / "two.gpkg")
    assert summary.tasks_computed == summary.tasks_total == 16
    assert summary.merges_computed > 0 and not summary.failures
    assert summary.n_tiles == 49 and summary.n_objects == len(reference[0])
    assert polygons(tmp_path / "two.gpkg") == reference[0]
    cluster, one = _cluster(1)
    with cluster, one:
        _run(one, image, config, tmp_path / "one.gpkg")
    assert polygons(tmp_path / "one.gpkg") == reference[0]


@pytest.mark.parametrize("tiles_per_task", [1, 9])
def test_task_size_does_not_change_polygons(
    client: Client, scenes: list[tuple[Path, Path]], reference: list[list[tuple[object, ...]]], tmp_path: Path, tiles_per_task: int
) -> None:
    image, labels = scenes[0]
    _run(client, image, write_config(tmp_path / "c.yaml", labels), tmp_path / "o.gpkg", **{"dask.tiles_per_task": tiles_per_task})
    assert polygons(tmp_path / "o.gpkg") == reference[0]


def test_many_inputs_to_a_folder_and_to_one_file(
    client: Client, scenes: list[tuple[Path, Path]], reference: list[list[tuple[object, ...]]], tmp_path: Path
) -> None:
    # The truth detector knows one scene, so one folder run per scene checks each file against its reference.
    images = [image for image, _ in scenes]
    for k, (image, labels) in enumerate(scenes):
        cfg = load_config(write_config(tmp_path / f"{k}.yaml", labels))
        layout = plan_outputs(str(tmp_path / "folder") + "/", [image])
        run_job(client, [image], layout, cfg)
        assert polygons(tmp_path / "folder" / f"scene{k}.gpkg") == reference[k]
    # One file with a `source` field: the same detector on both inputs (the truth of scene 0 applied to both).
    cfg = load_config(write_config(tmp_path / "both.yaml", scenes[0][1]))
    summary = run_job(client, images, plan_outputs(str(tmp_path / "both.gpkg"), images), cfg)
    assert summary.n_inputs == 2 and summary.n_tiles == 98
    assert polygons(tmp_path / "both.gpkg", source="scene0.tif") == reference[0]
    assert len(polygons(tmp_path / "both.gpkg", source="scene1.tif")) > 0


def test_worker_killed_mid_run_gives_the_same_output(
    client: Client, scenes: list[tuple[Path, Path]], reference: list[list[tuple[object, ...]]], tmp_path: Path
) -> None:
    image, labels = scenes[0]
    config = write_config(tmp_path / "slow.yaml", labels, SLOW, delay_s=0.12)
    run_dir = tmp_path / "run"
    pids_before = client.run(os.getpid)
    result: dict[str, JobSummary] = {}
    job = threading.Thread(target=lambda: result.update(s=_run(client, image, config, tmp_path / "o.gpkg", run_dir)))
    job.start()
    deadline = time.monotonic() + 60
    while not list(run_dir.glob("results/*/L0-*.npz")) and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = sorted(pids_before.values())[0]
    os.kill(victim, signal.SIGKILL)  # mid-run: both workers are busy with 0.24 s tasks
    job.join(90)
    assert not job.is_alive()
    summary = result["s"]
    assert not summary.failures
    assert summary.tasks_computed == 16
    assert polygons(tmp_path / "o.gpkg") == reference[0]
    client.wait_for_workers(2, timeout=30)
    assert victim not in client.run(os.getpid).values(), "the nanny restarted the killed worker"


def test_data_failures_are_recorded_and_redone_on_resume(
    client: Client, scenes: list[tuple[Path, Path]], reference: list[list[tuple[object, ...]]], tmp_path: Path
) -> None:
    image, labels = scenes[0]
    flag = tmp_path / "broken"
    flag.mkdir()
    bad_tiles = [8, 40]  # two tiles in two different tasks (2 × 2 tiles each)
    config = write_config(tmp_path / "c.yaml", labels, SLOW, fail_tiles=bad_tiles, fail_while=str(flag))
    run_dir = tmp_path / "run"
    first = _run(client, image, config, tmp_path / "o.gpkg", run_dir)
    assert sorted(f.tile for f in first.failures) == bad_tiles
    assert {f.stage for f in first.failures} == {"detect"}
    assert first.failed_tiles == 2
    ledger = [json.loads(line) for line in (run_dir / "failures.jsonl").read_text().splitlines()]
    assert sorted(e["tile"] for e in ledger) == bad_tiles and "unreadable garbage" in ledger[0]["error"]
    assert polygons(tmp_path / "o.gpkg") != reference[0]  # written, but missing what the bad tiles held
    # objects touching the bad tiles are marked partial, exactly as the serial path marks them
    run_serial(image, tmp_path / "s.gpkg", load_config(config))
    marked = [_partial(tmp_path / name) for name in ("o.gpkg", "s.gpkg")]
    assert marked[0] == marked[1] and 0 < sum(p for _, p in marked[0]) < len(marked[0])
    flag.rmdir()
    second = _run(client, image, config, tmp_path / "o.gpkg", run_dir)
    assert not second.failures
    assert (second.tasks_computed, second.tasks_loaded) == (2, 14)
    assert polygons(tmp_path / "o.gpkg") == reference[0]
    assert not any(p for _, p in _partial(tmp_path / "o.gpkg"))
    assert (run_dir / "failures.jsonl").read_text() == ""


def _partial(path: Path) -> list[tuple[str, bool]]:
    import pyogrio
    import shapely

    frame = pyogrio.read_dataframe(path)
    return sorted(zip(shapely.to_wkb(shapely.normalize(frame.geometry.values), hex=True), frame["partial"].astype(bool), strict=True))


def test_a_repaired_input_redoes_its_failed_tiles_and_their_neighbours(
    client: Client, scenes: list[tuple[Path, Path]], reference: list[list[tuple[object, ...]]], tmp_path: Path
) -> None:
    image, labels = scenes[0]
    copy = tmp_path / image.name
    copy.write_bytes(image.read_bytes())
    flag = tmp_path / "broken"
    flag.mkdir()
    config = write_config(tmp_path / "c.yaml", labels, SLOW, fail_tiles=[2], fail_while=str(flag))
    run_dir = tmp_path / "run"
    assert [f.tile for f in _run(client, copy, config, tmp_path / "o.gpkg", run_dir).failures] == [2]
    flag.rmdir()  # "repair" the file: rewrite it, so that it changes on disk
    copy.write_bytes(image.read_bytes())
    os.utime(copy, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(ConfigError, match="--accept-repaired"):
        _run(client, copy, config, tmp_path / "o.gpkg", run_dir)
    repaired = _run(client, copy, config, tmp_path / "o.gpkg", run_dir, accept_repaired=True)
    assert not repaired.failures and polygons(tmp_path / "o.gpkg") == reference[0]
    # tile 2 (block r0-c1) is redone, and block r0-c0, whose tile 1 reads some of tile 2's pixels; no other
    assert (repaired.tasks_computed, repaired.tasks_loaded) == (2, 14)
    # a change that the ledger cannot account for is refused even with the flag
    os.utime(copy, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    with pytest.raises(ConfigError, match="changed on disk but had no failed tiles"):
        _run(client, copy, config, tmp_path / "o.gpkg", run_dir, accept_repaired=True)


def test_resume_refuses_a_changed_config_or_model(client: Client, scenes: list[tuple[Path, Path]], tmp_path: Path) -> None:
    image, labels = scenes[0]
    config = write_config(tmp_path / "c.yaml", labels)
    run_dir = tmp_path / "run"
    _run(client, image, config, tmp_path / "o.gpkg", run_dir)
    again = _run(client, image, config, tmp_path / "o.gpkg", run_dir)
    assert (again.tasks_computed, again.tasks_loaded, again.merges_computed) == (0, 16, 0)
    # a damaged and a lost result (their parent merges are stored) are computed again, nothing else
    results = run_dir / "results" / "00000"
    (results / "L0-r0-c0.npz").write_bytes(b"not an npz")
    (results / "L0-r3-c3.npz").unlink()
    repaired = _run(client, image, config, tmp_path / "r.gpkg", run_dir)
    assert (repaired.tasks_computed, repaired.tasks_loaded, repaired.merges_computed) == (2, 14, 0)
    assert polygons(tmp_path / "r.gpkg") == polygons(tmp_path / "o.gpkg")
    with pytest.raises(ConfigError, match=r"another config .*use a new --run-dir or add --fresh"):
        _run(client, image, config, tmp_path / "o.gpkg", run_dir, **{"merge.ios_threshold": 0.3})
    other_labels = scenes[1][1]
    with pytest.raises(ConfigError, match=r"another model .*use a new --run-dir or add --fresh"):
        _run(client, image, config, tmp_path / "o.gpkg", run_dir, **{"detector.options": {"labels": str(other_labels)}})
    cfg = merge_overrides(load_config(config), {"merge.ios_threshold": 0.3})
    with pytest.raises(ExportError, match=r"o.gpkg already holds layer 'instances'; add --overwrite"):
        plan_outputs(str(tmp_path / "o.gpkg"), [image])  # not from this run folder's point of view: it is the user's
    layout = plan_outputs(str(tmp_path / "o.gpkg"), [image], owned=recorded_outputs(run_dir))  # --fresh keeps what the folder wrote
    fresh = run_job(client, [image], layout, cfg, open_run_dir(run_dir, [image], cfg, fresh=True))
    assert fresh.tasks_computed == 16


def test_task_results_round_trip_exactly_through_the_run_dir(tmp_path: Path) -> None:
    import numpy as np
    from shapely.geometry import MultiPolygon, box

    from geomask.instances import Instance
    from geomask.vectorize import Feature
    from workflows.store import decode_result, encode_result
    from workflows.tasks import BlockResult, Failure

    rng = np.random.default_rng(0)
    feats = [Feature(MultiPolygon([box(500_000.1, 5e6, 500_003.7, 5e6 + 2.9)]), 1, 0.123456789, 10.4399999, 13.2)]
    insts = [Instance(5, 7, rng.random((h, w)) > 0.5, float(rng.random()), 2, 9) for h, w in [(1, 1), (3, 17), (40, 9)]]
    result = BlockResult(feats, insts, 4, 1, 12, [Failure("a.tif", "L0-r0-c0", 3, "read", "boom")], 0.5)
    back = decode_result(encode_result(result))
    assert [(f.geometry.wkb, f.class_id, f.score, f.area_m2, f.perim_m) for f in back.features] == [
        (f.geometry.wkb, f.class_id, f.score, f.area_m2, f.perim_m) for f in feats
    ]
    for a, b in zip(back.open, insts, strict=True):
        assert (a.row_off, a.col_off, a.score, a.class_id, a.tile_id) == (b.row_off, b.col_off, b.score, b.class_id, b.tile_id)
        assert np.array_equal(a.mask, b.mask)
    assert (back.n_tiles, back.n_skipped, back.n_instances, back.failures, back.seconds) == (4, 1, 12, result.failures, 0.5)
    empty = decode_result(encode_result(BlockResult()))
    assert empty.features == [] and empty.open == []


def test_inputs_from_paths_globs_and_list_files(tmp_path: Path) -> None:
    from geomask.errors import ExportError, RasterReadError
    from workflows.inputs import expand_inputs

    for name in ("a.tif", "b.tif", "sub/c.tif"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "list.txt").write_text("# comment\n\nsub/c.tif\na.tif\n")
    got = expand_inputs([str(tmp_path / "*.tif"), str(tmp_path / "list.txt")])
    assert [p.name for p in got] == ["a.tif", "b.tif", "c.tif"]
    with pytest.raises(RasterReadError, match="no file matches"):
        expand_inputs([str(tmp_path / "*.jp2")])
    with pytest.raises(RasterReadError, match="does not exist"):
        expand_inputs([str(tmp_path / "missing.tif")])
    layout = plan_outputs(str(tmp_path / "out") + "/", got, "geojson")
    assert layout.per_input is not None and layout.per_input[got[2]] == tmp_path / "out" / "c.geojson"
    (tmp_path / "sub" / "a.tif").write_bytes(b"")
    with pytest.raises(ExportError, match="would both write"):
        plan_outputs(str(tmp_path / "out"), [got[0], tmp_path / "sub" / "a.tif"])
    assert plan_outputs(str(tmp_path / "one.gpkg"), got).combined == tmp_path / "one.gpkg"


def test_gpu_tasks_need_workers_that_offer_a_gpu(
    client: Client, scenes: list[tuple[Path, Path]], reference: list[list[tuple[object, ...]]], tmp_path: Path
) -> None:
    from workflows.cluster import ClusterError, check_resources

    image, labels = scenes[0]
    cfg = merge_overrides(load_config(write_config(tmp_path / "c.yaml", labels)), {"dask.gpu": True})
    with pytest.raises(ClusterError, match="no worker offers resources GPU"):
        check_resources(client, cfg.dask)
    # a worker announcing GPU=1 runs the tagged tasks (the "GPU" is a label for the scheduler; no device is touched)
    with (
        LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0", resources={"GPU": 1}) as cluster,
        Client(cluster) as gpu_client,
    ):
        check_resources(gpu_client, cfg.dask)
        run_job(gpu_client, [image], plan_outputs(str(tmp_path / "gpu.gpkg"), [image]), cfg)
    assert polygons(tmp_path / "gpu.gpkg") == reference[0]


def test_a_detector_that_cannot_be_built_is_one_line_for_the_user(client: Client, scenes: list[tuple[Path, Path]], tmp_path: Path) -> None:
    from geomask.errors import DetectorError

    image, labels = scenes[0]
    config = write_config(tmp_path / "c.yaml", labels, "tests.test_dask_support:broken_detector")
    with pytest.raises(DetectorError, match=r"^detector factory tests.test_dask_support:broken_detector failed on a worker: CUDA error"):
        _run(client, image, config, tmp_path / "o.gpkg")
    assert not (tmp_path / "o.gpkg").exists()


def test_bad_inputs_on_the_dask_path_are_one_line(client: Client, scenes: list[tuple[Path, Path]], tmp_path: Path) -> None:
    """Planning on workers: a bad input comes back as its one-line error, computed once (no retries)."""
    import numpy as np

    from geomask.errors import RasterContentError
    from tests.helpers import write_raster

    config = write_config(tmp_path / "c.yaml", scenes[0][1])
    empty = write_raster(tmp_path / "empty.tif", np.zeros((3, 300, 300), np.uint8), nodata=0)
    with pytest.raises(RasterContentError, match="no valid pixels"):
        _run(client, empty, config, tmp_path / "o.gpkg")
    assert not (tmp_path / "o.gpkg").exists()


def test_a_new_bundled_model_is_a_changed_model_for_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import geomask.models as base
    from geomask.config import DEFAULT_DETECTOR
    from workflows.store import model_hash

    monkeypatch.setattr(base, "MODELS_DIR", tmp_path)
    for name, file in base.BUNDLED_MODELS.items():
        (tmp_path / file).write_bytes(b"weights of release 1")
        options = {} if name == "buildings" else {"weights": name}
        first = model_hash(DEFAULT_DETECTOR, options)
        assert model_hash(DEFAULT_DETECTOR, {**options, "device": "cpu"}) != first  # options count too
        (tmp_path / file).write_bytes(b"weights of release 2")
        assert model_hash(DEFAULT_DETECTOR, options) != first, name
