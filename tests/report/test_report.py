"""The HTML report: self-contained, escaped, every figure written, the extra-section hook, missing
data as notes, and a real headless-Chromium load (no console errors, every figure decoded)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread
from tests.analysis.synthetic import Truth, synthetic_result, write_study
from tests.report.browser import CHROMIUM, Browser

from batchlab.analysis import analyze
from batchlab.engine.spec import SpecError
from batchlab.report import ReportFigure, Section, escape, table, write_report
from batchlab.report.figures import BUILDERS
from batchlab.sweep.store import Store

EVIL_STUDY = "<script>alert(1)</script>"
EVIL_TASK = '<img src=x onerror="alert(2)">'
FIGURES = [name for name, _, _ in BUILDERS]


def _verdict_section() -> Section:
    fig = Figure(figsize=(3, 2))
    fig.add_subplot().plot([1, 2, 3], [3, 1, 2])
    body = f'<p class="supported">supported: {escape(EVIL_STUDY)}</p>' + table(
        ("claim", "verdict"), [("B_crit near noise scale", "supported")], text_columns=2
    )
    return Section(
        "Verdict", body, figures=(ReportFigure("verdict", "Verdict figure", "A test figure.", fig),)
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    with Store(root / "runs.sqlite") as store:
        write_study(
            store,
            EVIL_STUDY,
            Truth(),
            [16, 64, 256],
            seeds=(0, 1),
            steps=2000,
            eval_every=100,
            task=EVIL_TASK,
            noise_scale=True,
        )
    return write_report(root / "runs.sqlite", root / "out", extra_sections=[_verdict_section()])


def test_every_figure_is_embedded_and_saved(report: Path) -> None:
    page = report.read_text(encoding="utf-8")
    for name in [*FIGURES, "verdict"]:
        png = report.parent / "figures" / f"{name}.png"
        svg = report.parent / "figures" / f"{name}.svg"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert svg.read_text(encoding="utf-8").lstrip().startswith("<?xml")
        assert f'id="fig-{name}"' in page
    assert page.count('src="data:image/png;base64,') == len(FIGURES) + 1


def test_page_is_self_contained_and_escaped(report: Path) -> None:
    page = report.read_text(encoding="utf-8")
    assert "<script" not in page.lower()
    assert "<img src=x" not in page and 'onerror="' not in page  # the task name stays text
    assert escape(EVIL_STUDY) in page and escape(EVIL_TASK) in page
    # Every src/href is a data URI, an in-page anchor or a relative link to the saved figures.
    links = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert links and all(re.match(r"data:|#|figures/[a-z0-9_-]+\.(png|svg)$", u) for u in links)
    assert "http://" not in page and "https://" not in page and "@import" not in page


def test_extra_section_comes_first(report: Path) -> None:
    page = report.read_text(encoding="utf-8")
    assert page.index('id="verdict"') < page.index('id="overview"') < page.index('id="loss_curves"')
    assert '<p class="supported">' in page  # the trusted fragment is kept as HTML


def test_missing_data_becomes_notes(tmp_path: Path) -> None:
    truth = Truth()
    with Store(tmp_path / "runs.sqlite") as store:
        # No target, no noise scale, and batch 512 has only a diverged run.
        runs = [
            synthetic_result(truth, b, lr, 0, steps=300, eval_every=100)
            for b in (16, 64)
            for lr in (0.02, 0.05, 0.1)
        ]
        runs.append(synthetic_result(truth, 512, 10.0, 0, steps=300, eval_every=100))
        store.put_many(runs, study="plain")
        a = analyze(store)
    assert a.target is None and a.scaling is None and a.noise is None
    page = write_report(a, tmp_path / "out").read_text(encoding="utf-8")
    assert "No steps-to-target figure" in page and "No noise-scale figure" in page
    assert 'id="fig-lr_heatmap"' in page and "Diverged and failed runs" in page
    written = sorted(p.name for p in (tmp_path / "out" / "figures").iterdir())
    assert "steps_to_target.png" not in written and "lr_heatmap.svg" in written


def test_only_diverged_runs_still_give_a_report(tmp_path: Path) -> None:
    truth = Truth()
    with Store(tmp_path / "runs.sqlite") as store:
        store.put(synthetic_result(truth, 64, 50.0, 0, steps=100, eval_every=50), study="bad")
        page = write_report(store, tmp_path / "out").read_text(encoding="utf-8")
    assert "No loss curves" in page and "No best-learning-rate figure" in page


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            Section("x", figures=(ReportFigure("lr_heatmap", "clash", "-", Figure()),)),
            "figure names",
        ),
        (Section("Overview", "<p>a second overview</p>"), "section anchors"),
    ],
)
def test_clashing_extra_sections_are_rejected(
    tmp_path: Path, report: Path, section, message
) -> None:
    # Checked before anything is written.
    with pytest.raises(SpecError, match=message):
        write_report(report.parent.parent / "runs.sqlite", tmp_path, extra_sections=[section])
    assert not (tmp_path / "index.html").exists()


@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (`make setup` installs Debian's chromium)"
)
def test_report_loads_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    with Browser(tmp_path / "profile") as browser:
        browser.open(report.as_uri())
        images = browser.evaluate(
            "Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
        )
        scripts = browser.evaluate("document.scripts.length")
        title = browser.evaluate("document.title")
        shot = browser.screenshot(tmp_path / "report.png")
        problems, requests = browser.problems(), browser.requests()
    assert problems == []
    assert len(images) == len(FIGURES) + 1
    assert all(done and w > 0 and h > 0 for done, w, h in images)
    assert scripts == 0 and EVIL_STUDY in title  # shown as text, never run
    assert all(u.startswith(("data:", "file:")) for u in requests)
    pixels = imread(shot)  # saved in the test's tmp dir; not blank: dark text on white
    assert pixels.shape[:2] == (900, 1280) and pixels.std() > 0.05
