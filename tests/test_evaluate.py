"""geomask.evaluate and ``geomask evaluate`` on hand-made predictions with known answers."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import shapely
from affine import Affine
from shapely.geometry import box

from geomask.evaluate import Objects, evaluate, evaluate_frames, tile_cover, tile_polygons
from geomask.tiling import plan_tiles
from workflows.cli import main


def sq(x: float, y: float, s: float = 10.0) -> shapely.Polygon:
    return box(x, y, x + s, y + s)


TRUTH = [sq(0, 0), sq(20, 0), sq(40, 0)]


def run(pred: list[shapely.Geometry], truth: list[shapely.Geometry] = TRUTH, scores: list[float] | None = None, **kw: object):
    return evaluate(Objects.of(pred, scores), Objects.of(truth), **kw)  # type: ignore[arg-type]


def test_perfect_predictions_score_one() -> None:
    ev = run(TRUTH)
    assert (ev.overall.tp, ev.overall.fp, ev.overall.fn) == (3, 0, 0)
    assert ev.overall.f1 == 1.0 and ev.overall.mean_iou == 1.0
    assert ev.overall.ap == pytest.approx(1.0)
    assert ev.overall.duplicates == 0 and ev.overall.splits == 0


def test_one_missed_and_one_false_positive() -> None:
    missed = run(TRUTH[:2]).overall
    assert (missed.precision, missed.recall, missed.f1) == (1.0, pytest.approx(2 / 3), pytest.approx(0.8))
    extra = run([*TRUTH, sq(100, 100)]).overall
    assert (extra.tp, extra.fp, extra.fn) == (3, 1, 0)
    assert extra.precision == pytest.approx(0.75) and extra.f1 == pytest.approx(6 / 7)


def test_duplicate_is_a_matched_object_with_a_second_prediction_inside() -> None:
    ev = run([*TRUTH, box(0, 0, 6, 10)]).overall
    assert (ev.tp, ev.fp, ev.duplicates, ev.splits) == (3, 1, 1, 0)


def test_split_is_an_unmatched_object_covered_by_pieces() -> None:
    truth = [box(0, 0, 30, 10)]
    ev = run([box(0, 0, 10, 10), box(10, 0, 20, 10), box(20, 0, 30, 10)], truth).overall
    assert (ev.tp, ev.fp, ev.fn, ev.splits, ev.duplicates) == (0, 3, 1, 1, 0)


@pytest.mark.parametrize(("shift", "matched"), [(3.0, True), (4.0, False)])
def test_shifted_polygon_matches_only_above_the_iou(shift: float, matched: bool) -> None:
    # shift 3: IoU 70/130 = 0.54; shift 4: IoU 60/140 = 0.43
    ev = run([sq(shift, 0)], [sq(0, 0)]).overall
    assert ev.tp == int(matched)
    assert run([sq(shift, 0)], [sq(0, 0)], iou_threshold=0.4).overall.tp == 1


def test_iou_threshold_bound_is_inclusive() -> None:
    assert run([box(0, 0, 10, 10)], [box(0, 0, 10, 5)]).overall.tp == 1  # IoU exactly 0.5


def test_ap_follows_the_ranking() -> None:
    truth = [sq(0, 0), sq(20, 0)]
    fp_first = run([sq(100, 0), sq(0, 0), sq(20, 0)], truth, scores=[0.9, 0.8, 0.7]).overall
    assert fp_first.ap == pytest.approx(2 / 3)
    fp_middle = run([sq(0, 0), sq(100, 0), sq(20, 0)], truth, scores=[0.9, 0.8, 0.7]).overall
    assert fp_middle.ap == pytest.approx((51 * 1.0 + 50 * 2 / 3) / 101)
    assert fp_middle.f1 == pytest.approx(0.8)  # F1 ignores scores


def test_ap_averages_iou_thresholds() -> None:
    ev = run([box(0, 0, 10, 10)], [box(0, 0, 10, 7.2)]).overall  # IoU 0.72: matched at 0.50..0.70
    assert ev.ap50 == pytest.approx(1.0) and ev.ap75 == pytest.approx(0.0)
    assert ev.ap == pytest.approx(0.5)


def test_classes_must_agree_and_are_reported_per_class() -> None:
    truth = Objects.of([sq(0, 0), sq(20, 0)], label=["building", "tree"])
    pred = Objects.of([sq(0, 0), sq(20, 0)], label=["building", "building"])
    ev = evaluate(pred, truth)
    assert (ev.overall.tp, ev.overall.fp, ev.overall.fn) == (1, 1, 1)
    rows = {s.name: s for s in ev.per_class}
    assert (rows["building"].tp, rows["building"].n_pred, rows["tree"].n_truth, rows["tree"].n_pred) == (1, 2, 1, 0)
    assert rows["building"].ap == pytest.approx(1.0) and rows["tree"].ap == 0.0
    assert ev.overall.ap == pytest.approx(0.5)


def test_box_mode_compares_bounding_boxes() -> None:
    l_shape = shapely.Polygon([(0, 0), (10, 0), (10, 2), (2, 2), (2, 10), (0, 10)])  # 36 % of its box
    assert run([l_shape], [sq(0, 0)]).overall.tp == 0
    assert run([l_shape], [sq(0, 0)], box=True).overall.tp == 1


def test_ignore_layer_drops_objects_mostly_inside() -> None:
    edge = [box(35, -5, 60, 15)]  # holds the third truth square and a false positive
    pred = [sq(0, 0), sq(20, 0), sq(48, 2)]
    plain = run(pred).overall
    assert (plain.tp, plain.fp, plain.fn) == (2, 1, 1)
    ev = run(pred, ignore=np.asarray(edge, dtype=object))
    assert ev.overall.f1 == 1.0 and (ev.n_ignored_truth, ev.n_ignored_pred) == (1, 1)


def test_invalid_and_empty_predictions_are_repaired_or_dropped() -> None:
    bowtie = shapely.Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])  # self-intersecting: repaired to two triangles
    ev = run([*TRUTH[1:], bowtie, shapely.Polygon()])
    assert ev.overall.n_pred == 3 and ev.overall.tp == 3
    assert ev.overall.mean_iou == pytest.approx((1 + 1 + 0.5) / 3)


def test_matching_is_independent_of_input_order() -> None:
    rng = np.random.default_rng(0)
    truth = [sq(15.0 * (k % 8), 15.0 * (k // 8)) for k in range(40)]
    pred = [shapely.affinity.translate(g, *rng.uniform(-3, 3, 2)) for g in truth] + [sq(1000, 1000)]
    a = run(pred, truth).overall
    b = run(pred[::-1], truth[::-1]).overall
    assert (a.tp, a.fp, a.fn) == (b.tp, b.fp, b.fn) and a.mean_iou == pytest.approx(b.mean_iou)


def test_tile_cover_counts_tiles_that_see_an_object() -> None:
    tiles = tile_polygons(plan_tiles(100, 50, 60, 20), Affine.identity())  # reads x 0..60 and 40..100
    geoms = np.asarray([sq(5, 5), box(30, 5, 70, 15), sq(45, 5), box(95, 5, 110, 15)], dtype=object)
    cover = tile_cover(geoms, tiles)
    assert cover.span.tolist() == [1, 2, 2, 1]
    # the last one leaves the raster but no tile edge inside the raster cuts it
    assert cover.crosses.tolist() == [False, True, False, False]


def test_seam_groups_count_duplicates_and_splits() -> None:
    tiles = tile_polygons(plan_tiles(100, 50, 60, 20), Affine.identity())
    truth = [sq(5, 5), box(30, 5, 70, 15), box(20, 30, 90, 40)]
    pred = [sq(5, 5), box(30, 5, 70, 15), box(30, 5, 60, 15), box(20, 30, 45, 40), box(45, 30, 65, 40), box(65, 30, 90, 40)]
    ev = run(pred, truth, tiles=tiles)
    rows = {s.name: s for s in ev.seams}
    inside, crossing = rows["inside one tile"], rows["crosses a tile edge"]
    assert (inside.n_truth, inside.tp, inside.duplicates, inside.splits) == (1, 1, 0, 0)
    assert (crossing.n_truth, crossing.tp, crossing.duplicates, crossing.splits) == (2, 1, 1, 1)
    assert (crossing.n_pred, crossing.fp) == (5, 4)
    assert rows["seen by 2 tiles"].n_truth == 2 and rows["seen by >=5 tiles"].n_truth == 0
    assert rows["seen by >=5 tiles"].f1 is None
    assert "crosses a tile edge" in ev.table()


def test_frames_are_reprojected_to_the_truth_crs() -> None:
    truth = gpd.GeoDataFrame(
        {"class": ["building"] * 3}, geometry=[shapely.affinity.translate(g, 500000, 5000000) for g in TRUTH], crs=32633
    )
    pred = truth.to_crs(4326).assign(score=[0.9, 0.8, 0.7])
    ev = evaluate_frames(pred, truth)
    assert ev.overall.f1 == 1.0 and ev.overall.mean_iou == pytest.approx(1.0, abs=1e-6)
    assert [s.name for s in ev.per_class] == ["building"]


def _write(tmp: Path) -> tuple[Path, Path, Path]:
    geoms = [shapely.affinity.translate(g, 500000, 5000000) for g in TRUTH]
    truth = gpd.GeoDataFrame({"id": [1, 2, 3]}, geometry=geoms, crs=32633)
    pred = gpd.GeoDataFrame({"score": [0.9, 0.8, 0.7]}, geometry=[*geoms[:2], shapely.affinity.translate(geoms[0], 0, 500)], crs=32633)
    edge = gpd.GeoDataFrame(geometry=[box(500035, 4999995, 500060, 5000015)], crs=32633)
    paths = tmp / "pred.gpkg", tmp / "truth.geojson", tmp / "edge.geojson"
    pred.to_crs(3857).to_file(paths[0], layer="instances")
    truth.to_crs(4326).to_file(paths[1])
    edge.to_file(paths[2])
    return paths


def test_cli_prints_a_table_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pred, truth, edge = _write(tmp_path)
    out = tmp_path / "scores.json"
    main(["evaluate", str(pred), str(truth), "--ignore", str(edge), "--json", str(out)])
    text = capsys.readouterr().out
    assert "F1" in text and "ignored 1 truth" in text
    data = json.loads(out.read_text())
    assert data["overall"]["tp"] == 2 and data["overall"]["fp"] == 1 and data["overall"]["fn"] == 0
    assert data["n_ignored_truth"] == 1


@pytest.mark.parametrize("which", ["missing", "unreadable"])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], which: str) -> None:
    pred, truth, _ = _write(tmp_path)
    if which == "missing":
        truth = tmp_path / "nope.geojson"
    else:
        truth.write_text("not json at all")
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(pred), str(truth)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("geomask: error:") and len(err.splitlines()) == 1 and str(truth) in err


def test_cli_seam_statistics_from_the_raster_tiling(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import rasterio

    transform = Affine(0.5, 0, 500000, 0, -0.5, 5000050)  # 200 x 100 px raster, 100 m x 50 m
    raster = tmp_path / "scene.tif"
    with rasterio.open(
        raster, "w", driver="GTiff", width=200, height=100, count=1, dtype="uint8", crs="EPSG:32633", transform=transform
    ) as dst:
        dst.write(np.zeros((1, 100, 200), dtype="uint8"))
    # Pixel boxes → map: one object inside tile 0 only, one across the seam at column ~100 (tiles 0..120, 80..200).
    px = [box(10, 10, 30, 30), box(90, 40, 130, 60)]
    matrix = [transform.a, transform.b, transform.d, transform.e, transform.c, transform.f]
    geoms = [shapely.affinity.affine_transform(g, matrix) for g in px]
    truth, pred = tmp_path / "truth.gpkg", tmp_path / "pred.fgb"
    gpd.GeoDataFrame(geometry=geoms, crs=32633).to_file(truth)
    gpd.GeoDataFrame({"score": [0.9, 0.8]}, geometry=geoms, crs=32633).to_file(pred)
    out = tmp_path / "s.json"
    main(["evaluate", str(pred), str(truth), "--tiles-from", str(raster), "--tile-size", "120", "--overlap", "40", "--json", str(out)])
    assert "crosses a tile edge" in capsys.readouterr().out
    seams = {s["name"]: s for s in json.loads(out.read_text())["seams"]}
    assert seams["inside one tile"]["n_truth"] == 1 and seams["crosses a tile edge"]["tp"] == 1
    assert seams["seen by 2 tiles"]["n_truth"] == 1


def test_null_geometries_in_a_layer_are_skipped() -> None:
    truth = gpd.GeoDataFrame(geometry=TRUTH, crs=32633)
    pred = gpd.GeoDataFrame({"score": [0.9, 0.8, 0.7, 0.6]}, geometry=[*TRUTH, None], crs=32633)
    ev = evaluate_frames(pred, truth)
    assert (ev.overall.n_pred, ev.overall.tp, ev.overall.f1) == (3, 3, 1.0)


def test_objects_beyond_the_tiles_are_in_no_seam_group() -> None:
    tiles = tile_polygons(plan_tiles(100, 50, 60, 20), Affine.identity())
    ev = run([sq(5, 5)], [sq(5, 5), sq(200, 5)], tiles=tiles)
    rows = {s.name: s for s in ev.seams}
    assert rows["inside one tile"].n_truth == 1 and rows["seen by no tile"].n_truth == 1
    assert rows["seen by no tile"].fn == 1


def _fine_raster(tmp: Path) -> Path:
    """A 400 x 200 px raster at 7.5 cm (30 m x 15 m): 100 x 50 working pixels at 0.3 m."""
    import rasterio

    raster = tmp / "ortho.tif"
    transform = Affine(0.075, 0, 500000, 0, -0.075, 5000015)
    with rasterio.open(
        raster, "w", driver="GTiff", width=400, height=200, count=1, dtype="uint8", crs="EPSG:32633", transform=transform
    ) as dst:
        dst.write(np.zeros((1, 200, 400), dtype="uint8"))
    return raster


def _sizes(tiles: gpd.GeoSeries) -> set[tuple[float, float]]:
    b = tiles.bounds
    return {(round(w, 6), round(h, 6)) for w, h in zip(b.maxx - b.minx, b.maxy - b.miny, strict=True)}


def test_tiles_from_are_planned_on_the_working_grid(tmp_path: Path) -> None:
    from workflows.commands.evaluate import _tiles

    raster = _fine_raster(tmp_path)
    tiles = _tiles(None, str(raster), 40, 8, gsd=0.3)
    assert tiles is not None
    # 40 working px at 0.3 m = 12 m per side (not 40 x 0.075 = 3 m): 3 x 2 tiles over 100 x 50 px
    assert len(tiles) == 6 and _sizes(tiles) == {(12.0, 12.0)}
    b = tiles.bounds
    assert (b.minx.min(), b.maxx.max(), b.miny.min(), b.maxy.max()) == pytest.approx((500000, 500030, 5000000, 5000015))
    assert tiles.union_all().area == pytest.approx(30 * 15)
    native = _tiles(None, str(raster), 40, 8)
    assert native is not None and _sizes(native) == {(3.0, 3.0)}


def _sidecar(pred: Path, **overrides: object) -> None:
    from geomask.config import Config, dump_config, merge_overrides
    from geomask.export import config_sidecar

    config_sidecar(pred).write_text(dump_config(merge_overrides(Config(), overrides)))


def test_tiles_from_default_to_the_predict_sidecar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from workflows.commands.evaluate import _tiles

    raster = _fine_raster(tmp_path)
    # Map boxes 0.5..2.5 m below the top edge (tile row 1 starts 3 m down): one inside working tile 0 only
    # (x 2..4 m), one across tile 0's right edge at x 12 m (tiles 0 and 1 read x 0..12 and 9.6..21.6 m). On the raster's own pixels (3 m tiles) both cross edges.
    x0, y1 = 500000, 5000015
    geoms = [box(x0 + 2, y1 - 2.5, x0 + 4, y1 - 0.5), box(x0 + 11, y1 - 2.5, x0 + 13, y1 - 0.5)]
    truth, pred = tmp_path / "truth.geojson", tmp_path / "pred.gpkg"
    gpd.GeoDataFrame(geometry=geoms, crs=32633).to_file(truth)
    gpd.GeoDataFrame({"score": [0.9, 0.8]}, geometry=geoms, crs=32633).to_file(pred)
    _sidecar(pred, **{"raster.gsd_m": 0.3, "tiling.size_px": 40, "tiling.overlap_px": 8})

    tiles = _tiles(None, str(raster), None, None, pred=str(pred))
    assert tiles is not None and len(tiles) == 6 and _sizes(tiles) == {(12.0, 12.0)}
    # explicit options win over the sidecar, each on its own
    finer = _tiles(None, str(raster), None, None, gsd=0.15, pred=str(pred))
    assert finer is not None and _sizes(finer) == {(6.0, 6.0)}
    bigger = _tiles(None, str(raster), 48, None, pred=str(pred))
    assert bigger is not None and _sizes(bigger) == {(14.4, 14.4)}

    out = tmp_path / "s.json"
    main(["evaluate", str(pred), str(truth), "--tiles-from", str(raster), "--json", str(out)])
    capsys.readouterr()
    seams = {s["name"]: s for s in json.loads(out.read_text())["seams"]}
    assert seams["inside one tile"]["n_truth"] == 1 and seams["seen by 2 tiles"]["n_truth"] == 1
    assert seams["crosses a tile edge"]["tp"] == 1


def test_tiles_from_without_tile_size_or_sidecar_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raster = _fine_raster(tmp_path)
    pred, truth, _ = _write(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(pred), str(truth), "--tiles-from", str(raster), "--gsd", "0.3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--tile-size" in err and "pred.gpkg.config.yaml" in err
