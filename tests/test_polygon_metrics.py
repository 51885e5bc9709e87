"""Outline metrics on hand-made polygons whose values are known."""

from __future__ import annotations

import pytest
from shapely import affinity
from shapely.geometry import Polygon, box

from geomask.evaluate import Objects, evaluate
from geomask.polygon_metrics import c_iou, max_tangent_angle_error, polis, shape_scores, vertex_count

SQUARE = box(0, 0, 10, 10)


def test_identical_outlines_score_perfectly() -> None:
    s = shape_scores([SQUARE], [SQUARE])
    assert (s.mean_iou, s.c_iou, s.polis, s.max_angle_deg, s.vertex_ratio) == (1.0, 1.0, 0.0, 0.0, 1.0)


def test_c_iou_discounts_extra_vertices() -> None:
    five = Polygon([(0, 0), (5, 0), (10, 0), (10, 10), (0, 10)])  # same square, one collinear vertex more
    assert vertex_count(five) == 5 and vertex_count(SQUARE) == 4
    assert c_iou(five, SQUARE) == pytest.approx(1.0 * (1 - 1 / 9))


def test_polis_of_a_taller_rectangle() -> None:
    taller = box(0, 0, 10, 11)
    # taller's vertices to the square: 0, 0, 1, 1 (mean 0.5); the square's vertices lie on taller's boundary.
    assert polis(taller, SQUARE) == pytest.approx(0.25)
    assert c_iou(taller, SQUARE) == pytest.approx(100 / 110)


def test_max_tangent_angle_error_is_the_rotation() -> None:
    assert max_tangent_angle_error(affinity.rotate(SQUARE, 10), SQUARE) == pytest.approx(10.0)
    assert max_tangent_angle_error(affinity.rotate(SQUARE, 80), SQUARE) == pytest.approx(10.0)  # folded to 0-90


def test_evaluate_reports_shape_metrics_of_matched_pairs() -> None:
    pred = Objects.of([box(0, 0, 10, 11), box(50, 50, 51, 51)])
    truth = Objects.of([SQUARE])
    result = evaluate(pred, truth, shape_metrics=True, compute_ap=False)
    assert result.shape is not None and result.shape.n_pairs == 1 and result.shape.polis == pytest.approx(0.25)
    assert "C-IoU" in result.table() and result.to_dict()["shape"]["n_pairs"] == 1
    assert evaluate(pred, truth, compute_ap=False).shape is None
