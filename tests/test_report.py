"""The run report: one self-contained HTML file, opened in a real browser (headless Chromium) with no request made.

The browser test skips where Debian's ``chromium`` is not installed; ``.ci/run`` installs it and sets
``GEOMASK_REQUIRE_CHROMIUM=1``, which turns the skip into a failure. Its screenshot goes to
``bench/results/report.png``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import geopandas as gpd
import pytest
import yaml

from workflows.cli import main

REQUIRE_CHROMIUM = os.environ.get("GEOMASK_REQUIRE_CHROMIUM") == "1"  # set by .ci/run, which installs chromium
SCREENSHOT = Path(__file__).resolve().parents[1] / "bench" / "results" / "report.png"


class _Links(HTMLParser):
    """Every URL-valued attribute of a page (src, href, ...), and the text of its headings."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.headings: list[str] = []
        self.images = 0
        self._in_heading = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.images += tag == "img"
        self._in_heading = tag in ("h1", "h2")
        self.urls += [v or "" for k, v in attrs if k in ("src", "href", "action", "poster", "data")]

    def handle_data(self, data: str) -> None:
        if self._in_heading and data.strip():
            self.headings.append(data.strip())
            self._in_heading = False


def _parse(page: str) -> _Links:
    links = _Links()
    links.feed(page)
    return links


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A serial predict run with the truth detector: its output and the report beside it."""
    from geomask.testing import make_scene, write_scene
    from tests.helpers import UTM, UTM_TRANSFORM

    d = tmp_path_factory.mktemp("report")
    image, labels = write_scene(d, make_scene(256, 256, 12, seed=3, max_size_px=60, n_big=0), UTM_TRANSFORM, UTM)
    cfg = d / "truth.yaml"
    cfg.write_text(yaml.safe_dump({"detector": {"factory": "geomask.testing:truth_detector", "options": {"labels": str(labels)}}}))
    out = d / "out.gpkg"
    main(["predict", str(image), "-o", str(out), "-c", str(cfg), "--serial"])
    return out, d / "out.gpkg.report.html"


def test_predict_writes_a_self_contained_report(run: tuple[Path, Path]) -> None:
    out, report = run
    page = report.read_text()
    links = _parse(page)
    assert {"Result", "Inputs", "Model", "Objects", "Run", "Settings"} <= set(links.headings)
    assert links.images == 2  # the quick-look and the histograms, both embedded
    assert links.urls and all(u.startswith("data:image/png;base64,") for u in links.urls)
    n = len(gpd.read_file(out, layer="instances", engine="pyogrio"))
    assert f'<td>all</td><td class="n">{n}</td>' in page
    assert "tiling:" in page and "scene.tif" in page


def test_evaluate_report_has_scores_seams_and_errors(run: tuple[Path, Path], tmp_path: Path) -> None:
    out, _ = run
    frame = gpd.read_file(out, layer="instances", engine="pyogrio")
    truth, pred = tmp_path / "truth.geojson", tmp_path / "pred.gpkg"
    frame.iloc[2:].to_file(truth, engine="pyogrio")  # two predictions have no truth: false positives
    frame.iloc[:-1].to_file(pred, engine="pyogrio")  # one truth object is not predicted: a miss
    report = tmp_path / "eval.html"
    main(["evaluate", str(pred), str(truth), "--report", str(report), "--tiles-from", str(out.parent / "scene.tif"), "--tile-size", "128"])
    page = report.read_text()
    links = _parse(page)
    assert {"Scores", "Seams", "Errors"} <= set(links.headings) and links.images == 1
    assert "false positive (2)" not in page  # the legend is inside the picture, not text
    assert all(u.startswith("data:") for u in links.urls)


def test_report_opens_in_a_browser_without_requests(run: tuple[Path, Path]) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if REQUIRE_CHROMIUM:
            pytest.fail("GEOMASK_REQUIRE_CHROMIUM=1 but chromium is not on PATH (apt-get install chromium)")
        pytest.skip("headless Chromium is not installed (apt-get install chromium); .ci/run installs it and requires this test")
    _, report = run
    assert _page_requests(chromium, report) == []
    # The check can fail: a page that loads one image over HTTP is caught (nothing listens there).
    control = report.with_name("control.html")
    control.write_text('<!DOCTYPE html><html><body><img src="http://127.0.0.1:9/x.png"></body></html>')
    assert _page_requests(chromium, control) == ["http://127.0.0.1:9/x.png"]
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        shot = subprocess.run(
            [
                chromium,
                *_flags(profile),
                f"--screenshot={SCREENSHOT}",
                "--window-size=1200,2400",
                "--hide-scrollbars",
                report.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert shot.returncode == 0 and SCREENSHOT.stat().st_size > 20_000, shot.stderr[-2000:]


def _flags(profile: str) -> list[str]:
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}/p",
    ]


def _page_requests(chromium: str, page: Path) -> list[str]:
    """Load ``page`` from disk; check the DOM the browser built; return the network URLs the page itself requested.

    Chromium's net log lists every request; those the browser makes on its own (time sync, updates, even
    with the flags above) have the initiator ``not an origin`` and are left out: a page's requests
    carry its origin (``null`` for a file).
    """
    with tempfile.TemporaryDirectory() as profile:
        net_log = Path(profile) / "net.json"
        cmd = [chromium, *_flags(profile), f"--log-net-log={net_log}", "--dump-dom", page.resolve().as_uri()]
        dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert dom.returncode == 0, dom.stderr[-2000:]
        links = _parse(dom.stdout)  # the page as the browser built it
        if page.name.endswith(".report.html"):
            assert "Objects" in links.headings and links.images == 2
            assert all(u.startswith("data:") for u in links.urls)
        events = json.loads(net_log.read_text()).get("events", [])
    urls = []
    for event in events:
        params = event.get("params", {})
        url, initiator = str(params.get("url", "")), params.get("initiator")
        if "method" in params and initiator is not None and initiator != "not an origin" and url.startswith(("http:", "https:", "ws")):
            urls.append(url)
    return sorted(set(urls))


@pytest.mark.parametrize("path", ["serial", "dask"])
def test_the_report_shows_the_accuracy_the_checkpoint_states_and_where_it_is_written(
    tmp_path: Path, path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("torch")
    from geomask.detect.checkpoint import export_half
    from geomask.models import bundled_model_path
    from geomask.testing import make_scene, write_scene
    from tests.helpers import UTM, UTM_TRANSFORM

    bundled = bundled_model_path(None)
    assert bundled is not None
    stated = {"heldout_f1": 0.6123, "heldout_precision": 0.7119, "heldout_recall": 0.5455, "heldout_n_truth": 231.0, "val_f1": 0.5}
    weights = export_half(bundled, tmp_path / "stated.pt", metrics=stated)
    image, _ = write_scene(tmp_path, make_scene(128, 128, 4, seed=1, max_size_px=40, n_big=0), UTM_TRANSFORM, UTM)
    out = tmp_path / "out.gpkg"
    extra = ["--serial"] if path == "serial" else ["--workers", "1"]
    with pytest.raises(SystemExit) as exc:
        main(["-q", "predict", str(image), "-o", str(out), "--weights", str(weights), "--no-preview", *extra])
        raise SystemExit(0)
    assert exc.value.code in (0, None), capsys.readouterr().err
    page = (tmp_path / "out.gpkg.report.html").read_text()
    assert "<td>expected accuracy</td><td>F1 0.612, precision 0.712, recall 0.545 on held-out images (231 objects)</td>" in page
    assert f"<td>accuracy source</td><td>the checkpoint&#x27;s metrics ({weights})</td>" in page
    assert "val_f1 0.5" in page  # every stated metric is listed, the chip-level validation too
    assert "OpenStreetMap" in page  # the attribution travels with the model


def test_the_cross_validation_mean_over_places_is_the_expected_accuracy_when_the_file_states_it() -> None:
    """``cv_mean_*`` (leave-one-place-out folds) beats held-out images of trained places; ``cv_folds`` is shown."""
    from geomask.detect.base import ModelCard
    from geomask.report import card_rows

    cv = {"cv_mean_f1": 0.3716, "cv_mean_precision": 0.3598, "cv_mean_recall": 0.4184, "cv_folds": 4.0}
    rows = card_rows(ModelCard({**cv, "heldout_f1": 0.6123, "heldout_n_truth": 231.0, "val_f1": 0.5}, "ckpt.pt metrics"))
    expected = "F1 0.372, precision 0.360, recall 0.418 on places never trained on (mean of 4 leave-one-place-out folds)"
    assert rows["expected accuracy"] == expected
    assert "heldout_f1 0.6123" in rows["stated metrics"] and "cv_folds 4" in rows["stated metrics"]
    no_folds = card_rows(ModelCard({"cv_mean_f1": 0.3716}, "x"))["expected accuracy"]
    assert no_folds == "F1 0.372 on places never trained on (mean of leave-one-place-out folds)"


def test_the_shipped_buildings_model_reports_its_cross_validation_mean() -> None:
    pytest.importorskip("torch")
    from geomask.detect.base import ModelCard
    from geomask.detect.checkpoint import load_checkpoint
    from geomask.models import BUNDLED_MODELS, MODELS_DIR
    from geomask.report import card_rows

    meta = load_checkpoint(MODELS_DIR / BUNDLED_MODELS["buildings"]).meta
    assert meta is not None
    row = card_rows(ModelCard(meta.metrics, "its metrics"))["expected accuracy"]
    assert row.startswith(f"F1 {meta.metrics['cv_mean_f1']:.3f}") and row.endswith(
        f"(mean of {meta.metrics['cv_folds']:.0f} leave-one-place-out folds)"
    )


def test_a_model_that_states_no_accuracy_is_reported_as_such(run: tuple[Path, Path]) -> None:
    page = run[1].read_text()  # the truth detector has no card
    assert "<td>expected accuracy</td><td>not stated: the model&#x27;s file carries no accuracy metrics</td>" in page
    assert "accuracy source" not in page
