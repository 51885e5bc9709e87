"""The run report: one self-contained HTML file per run (no CDN, no network; pictures embedded as base64 PNG).

A report travels by e-mail or sits in a run folder for years: every byte it shows is in the file, and
it makes no request when opened (checked in a real browser by ``tests/test_report.py``). It says what
went in (inputs and their grids, the model and its card, the settings), what came out (counts per class,
histograms of area and score), how it went (tiles/s, wall time, failed tiles), and, from ``geomask
evaluate --report``, how good it is (F1/AP per class and seam group) with a picture of the errors.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import geopandas as gpd
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from geomask.atomic import write_text_atomic
from geomask.detect.base import ModelCard
from geomask.matching import match_one_to_one, overlapping_pairs
from geomask.scores import Evaluation, Scores

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #ccc}pre{background:#f6f6f6;padding:.6em;overflow:auto;font-size:12px}
.bad{color:#b00}
"""


#: Metric name prefixes, most telling first: the mean over leave-one-place-out folds (the expected accuracy on a
#: new place) beats scores on held-out images of trained places, which beat chip-level validation.
_SPLITS = (
    ("cv_mean_", "places never trained on (mean of N leave-one-place-out folds)"),
    ("heldout_", "held-out images"),
    ("test_", "test images"),
    ("val_", "validation chips"),
)
_SCORES = (("precision", "precision"), ("recall", "recall"), ("ap50", "AP50"), ("ap", "AP"))


def card_rows(card: ModelCard) -> dict[str, str]:
    """Return the report's model rows for what the model's file states: expected accuracy, its source, all metrics.

    The expected accuracy is the F1 of the most telling split the file names (the cross-validation mean
    over places, then held-out, then test, then validation), as stored; nothing is computed or rounded
    beyond three decimals. The cross-validation split names its number of folds (``cv_folds``) where the
    others name their number of objects (``*_n_truth``).
    """
    metrics = dict(card.metrics)
    rows = {"expected accuracy": "not stated: the model's file carries no accuracy metrics"}
    for prefix, split in _SPLITS:
        f1 = metrics.get(prefix + "f1")
        if f1 is None:
            continue
        parts = [f"F1 {f1:.3f}"] + [f"{label} {metrics[prefix + key]:.3f}" for key, label in _SCORES if prefix + key in metrics]
        if prefix == "cv_mean_":
            folds = metrics.get("cv_folds")
            split = split.replace("N ", f"{folds:.0f} " if folds else "")
            rows["expected accuracy"] = f"{', '.join(parts)} on {split}"
        else:
            n_truth = metrics.get(prefix + "n_truth")
            rows["expected accuracy"] = f"{', '.join(parts)} on {split}" + (f" ({n_truth:.0f} objects)" if n_truth else "")
        break
    if metrics:
        rows["accuracy source"] = card.source or "the detector's card"
        rows["stated metrics"] = ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))
    if card.attribution:
        rows["attribution"] = card.attribution
    return rows


@dataclass(frozen=True)
class InputFacts:
    """One input raster and the grid it was processed on (sizes in pixels, GSD in metres)."""

    path: str
    width: int
    height: int
    crs: str
    gsd_m: float
    working_gsd_m: float
    n_tiles: int


@dataclass(frozen=True)
class FailedTile:
    """A tile that failed: its input, tile index (``-1``: a whole merge), stage and one-line reason."""

    source: str
    tile: int
    stage: str
    error: str


@dataclass(frozen=True)
class RunFacts:
    """What a predict run did, for the report (all plain values: the report needs neither torch nor Dask).

    Attributes:
        inputs: The input rasters.
        model: The model's name and card summary, label → value (classes, GSD, expected accuracy, ...).
        settings_yaml: The resolved config as written beside the output.
        seconds: Wall time of the run.
        n_tiles: Tiles processed (skipped nodata tiles included).
        failures: Failed tiles.
    """

    inputs: Sequence[InputFacts]
    model: dict[str, str]
    settings_yaml: str
    seconds: float
    n_tiles: int
    failures: Sequence[FailedTile] = field(default_factory=tuple)

    @property
    def tiles_per_s(self) -> float:
        return self.n_tiles / self.seconds if self.seconds > 0 else 0.0


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(src: str, alt: str) -> str:
    return f'<img src="{src}" alt="{html.escape(alt)}">'


def png_data_uri(path: str | Path) -> str:
    """Return a PNG file as a ``data:`` URI, to embed a picture (the quick-look) in the report."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        cls = ' class="n"' if isinstance(v, int | float) and not isinstance(v, bool) else ""
        text = f"{v:.3f}" if isinstance(v, float) else str(v)
        return f"<td{cls}>{html.escape(text)}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def histograms(frame: gpd.GeoDataFrame) -> str:
    """Return the area and score histograms of an output table as one embedded PNG (``data:`` URI)."""
    fig = Figure(figsize=(10, 3.2))
    FigureCanvasAgg(fig)
    area_ax, score_ax = fig.subplots(1, 2)
    area = np.asarray(frame["area_m2"], dtype=float) if "area_m2" in frame else np.zeros(0)
    score = np.asarray(frame["score"], dtype=float) if "score" in frame else np.zeros(0)
    if area.size and area.max() > 0:
        bins = np.geomspace(max(area[area > 0].min(), 1e-3), area.max() * 1.0001, 30)
        area_ax.hist(area[area > 0], bins=bins, color="#1f77b4")
        area_ax.set_xscale("log")
    area_ax.set(title="object area", xlabel="m² (log scale)", ylabel="objects")
    score_ax.hist(score, bins=np.linspace(0, 1, 21), color="#ff7f0e")
    score_ax.set(title="detection score", xlabel="score", ylabel="objects", xlim=(0, 1))
    fig.tight_layout()
    return _png(fig)


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )


def run_report(frame: gpd.GeoDataFrame, facts: RunFacts, output: str, preview: str | None = None) -> str:
    """Return the HTML report of a predict run.

    Args:
        frame: The output table (geomask's fields).
        facts: Inputs, model, settings, timing and failures of the run.
        output: The output's path, as shown.
        preview: The quick-look as a ``data:`` URI (:func:`png_data_uri`), or ``None``.
    """
    parts = []
    if preview:
        parts.append("<h2>Result</h2>" + _img(preview, "quick-look of the result"))
    parts.append(f"<p>Output: <code>{html.escape(output)}</code></p>")
    rows = [(i.path, i.width, i.height, i.crs, i.gsd_m, i.working_gsd_m, i.n_tiles) for i in facts.inputs]
    parts.append("<h2>Inputs</h2>" + _table(["raster", "width px", "height px", "CRS", "GSD m", "working GSD m", "tiles"], rows))
    parts.append("<h2>Model</h2>" + _table(["", ""], list(facts.model.items())))
    counts = frame.groupby("class").size().sort_index() if "class" in frame and len(frame) else {}
    count_rows = [(str(k), int(v)) for k, v in dict(counts).items()] + [("all", len(frame))]
    parts.append("<h2>Objects</h2>" + _table(["class", "objects"], count_rows) + _img(histograms(frame), "histograms of area and score"))
    run_rows: list[tuple[str, object]] = [
        ("wall time s", round(facts.seconds, 1)),
        ("tiles", facts.n_tiles),
        ("tiles/s", round(facts.tiles_per_s, 2)),
        ("failed tiles", len(facts.failures)),
    ]
    parts.append("<h2>Run</h2>" + _table(["", ""], run_rows))
    if facts.failures:
        fail_rows = [(f.source, f.tile, f.stage, f.error) for f in facts.failures]
        parts.append('<h2 class="bad">Failures</h2>' + _table(["input", "tile", "stage", "error"], fail_rows))
    parts.append(f"<h2>Settings</h2><pre>{html.escape(facts.settings_yaml)}</pre>")
    return _page(f"geomask run: {Path(output).name}", "".join(parts))


def _score_rows(scores: Sequence[Scores]) -> list[tuple[object, ...]]:
    def f(v: float | None) -> object:
        return "–" if v is None else round(v, 3)

    return [(s.name, s.n_truth, s.n_pred, s.tp, f(s.precision), f(s.recall), f(s.f1), f(s.ap), s.duplicates, s.splits) for s in scores]


def error_picture(pred: gpd.GeoDataFrame, truth: gpd.GeoDataFrame, iou_threshold: float) -> str:
    """Draw matches, false positives, misses and splits (one-to-one at ``iou_threshold``) as an embedded PNG.

    Splits are unmatched truth objects with two or more predictions mostly (> half) inside them, as
    :mod:`geomask.evaluate` counts them.
    """
    pred = pred.to_crs(truth.crs) if pred.crs is not None and truth.crs is not None and pred.crs != truth.crs else pred
    p_geom, t_geom = np.asarray(pred.geometry.values), np.asarray(truth.geometry.values)
    pairs = overlapping_pairs(p_geom, t_geom)
    matched = match_one_to_one(pairs, iou_threshold)
    tp_p, tp_t = set(matched.pred.tolist()), set(matched.truth.tolist())
    inside = pairs.in_pred > 0.5
    pieces = np.bincount(pairs.truth[inside], minlength=len(truth)) if len(truth) else np.zeros(0, dtype=int)
    split = np.array([i not in tp_t and pieces[i] >= 2 for i in range(len(truth))], dtype=bool)
    miss = np.array([i not in tp_t for i in range(len(truth))], dtype=bool) & ~split
    fp = np.array([i not in tp_p for i in range(len(pred))], dtype=bool)
    fig = Figure(figsize=(10, 8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    layers = [  # (what, fill, outline, line width, legend)
        (truth[~miss & ~split], "#2ca02c33", "#2ca02c", 0.4, f"matched ({len(tp_t)})"),
        (truth[miss], "#d6272866", "#d62728", 0.8, f"missed ({int(miss.sum())})"),
        (truth[split], "#e377c266", "#e377c2", 0.8, f"split ({int(split.sum())})"),
        (pred[fp], "none", "#ff7f0e", 1.0, f"false positive ({int(fp.sum())})"),
    ]
    handles = []
    for part, fill, edge, width, label in layers:
        if len(part):
            part.plot(ax=ax, facecolor=fill, edgecolor=edge, linewidth=width)
        handles.append(Patch(facecolor=fill, edgecolor=edge, label=label))
    ax.legend(handles=handles, loc="upper right", fontsize=9)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"errors at IoU ≥ {iou_threshold:g}")
    fig.tight_layout()
    return _png(fig)


def evaluation_report(result: Evaluation, pred: str, truth: str, picture: str | None = None) -> str:
    """Return the HTML report of ``geomask evaluate``: scores overall, per class and per seam group, and the error picture."""
    header = ["", "truth", "pred", "TP", "precision", "recall", "F1", "AP", "duplicates", "splits"]
    parts = [
        f"<p>Predictions <code>{html.escape(pred)}</code> against truth <code>{html.escape(truth)}</code>, "
        f"one-to-one at IoU ≥ {result.iou_threshold:g}{' (boxes)' if result.box else ''}.</p>",
        "<h2>Scores</h2>" + _table(header, _score_rows([result.overall, *result.per_class])),
    ]
    if result.seams:
        parts.append("<h2>Seams</h2><p>Truth objects grouped by how the tiles cut them.</p>" + _table(header, _score_rows(result.seams)))
    if picture:
        parts.append("<h2>Errors</h2>" + _img(picture, "false positives, misses and splits"))
    return _page(f"geomask evaluation: {Path(pred).name}", "".join(parts))


def write_report(path: str | Path, page: str) -> Path:
    """Write a report atomically (a reader never sees half a page)."""
    return write_text_atomic(path, page)


def report_path(output: str | Path) -> Path:
    """Return where predict writes the report of an output (``<output>.report.html``)."""
    o = Path(output)
    return o.with_name(o.name + ".report.html")
