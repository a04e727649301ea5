"""``write_report``: a study -> ``index.html`` (self-contained) plus every figure as PNG and SVG.

Other modules put their own sections on top through ``extra_sections`` (``batchlab reproduce``
adds its verdicts that way): a ``Section`` carries a title, trusted HTML fragments and figures,
which are embedded and saved exactly like the standard ones.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import batchlab
from batchlab.analysis import StudyAnalysis, Target, analyze
from batchlab.engine.spec import SpecError
from batchlab.report import figures
from batchlab.report.html import ReportFigure, Section, fmt, paragraph, render_page, table
from batchlab.sweep.store import Store

log = logging.getLogger(__name__)

MAX_LISTED_RUNS = 100
FIGURES_DIR = "figures"


def _overview(a: StudyAnalysis) -> Section:
    body = table(None, a.facts(), text_columns=2)
    key = a.key_numbers()
    if key:
        body += table(("key number", "value [interval]"), key, text_columns=1)
    return Section("Overview", body)


def _best_lr_table(a: StudyAnalysis) -> str:
    if a.best_lr is None:
        return ""
    return table(
        (
            "batch size",
            "best lr",
            "seed range",
            "best grid lr",
            f"final {a.objective}",
            "on grid edge",
            "diverged runs",
        ),
        (
            (r.batch_size, r.lr, (r.lr_low, r.lr_high), r.grid_lr, r.value, r.at_edge, r.n_diverged)
            for r in a.best_lr.rows
        ),
    )


def _target_table(a: StudyAnalysis) -> str:
    if not a.to_target:
        return ""
    regions = dict(a.scaling.regions) if a.scaling else {}
    return table(
        (
            "batch size",
            "steps",
            "seed range",
            "samples",
            "epochs",
            "wall s",
            "fastest lr",
            "seeds reached",
            "region",
        ),
        (
            (
                r.batch_size,
                r.steps,
                (r.steps_low, r.steps_high),
                r.samples,
                r.epochs,
                r.wall_s,
                r.best_lr,
                f"{r.n_reached}/{r.n_seeds}",
                regions.get(r.batch_size, "-").replace("_", " "),
            )
            for r in a.to_target
        ),
    )


def _gap_tables(a: StudyAnalysis) -> str:
    parts = []
    for t in (a.gap_epochs, a.gap_steps):
        if t is None:
            continue
        parts.append(paragraph(f"At {fmt(t.at)} {t.basis}:"))
        parts.append(
            table(
                (
                    "batch size",
                    "lr",
                    "train loss",
                    "val loss",
                    "loss gap",
                    "SE",
                    f"{a.metric_name} gap",
                    "SE",
                    "from",
                ),
                (
                    (
                        r.batch_size,
                        r.lr,
                        r.train_loss,
                        r.val_loss,
                        r.gap_loss,
                        r.gap_loss_se,
                        r.gap_metric,
                        r.gap_metric_se,
                        r.source,
                    )
                    for r in t.rows
                ),
            )
        )
    return "".join(parts)


def _cost_section(a: StudyAnalysis) -> Section:
    if not a.cost:
        return Section("Cost", paragraph("No batch size has a finished run.", "note"))
    basis = a.cost[0].basis
    where = (
        f"to reach {a.target.describe()}"
        if basis == "target" and a.target
        else "for the whole budget"
    )
    intro = paragraph(
        f"What each batch size paid {where} at its best learning rate (medians over seeds). "
        "Speed-up is steps at the smallest batch divided by steps here; efficiency is speed-up "
        "divided by the batch-size ratio (1 = perfect scaling, 0.5 = half the examples wasted)."
    )
    body = table(
        (
            "batch size",
            "steps",
            "samples",
            "wall s",
            "speed-up (steps)",
            "speed-up (wall)",
            "efficiency",
        ),
        (
            (r.batch_size, r.steps, r.samples, r.wall_s, r.speedup, r.wall_speedup, r.efficiency)
            for r in a.cost
        ),
    )
    return Section("Cost", intro + body)


def _unfinished_section(a: StudyAnalysis) -> Section | None:
    if not a.unfinished:
        return None
    shown = a.unfinished[:MAX_LISTED_RUNS]
    more = len(a.unfinished) - len(shown)
    body = paragraph(
        "These runs are shown in the heatmap but left out of every fit: a diverged run counts as "
        "the worst result at its learning rate, a failed run (an error) as missing."
    ) + table(
        ("batch size", "lr", "seed", "status", "at step", "error", "run id"),
        (
            (r.batch_size, r.lr, r.seed, r.status, r.at_step, (r.error or "")[:200], r.run_id)
            for r in shown
        ),
    )
    if more:
        body += paragraph(f"... and {more} more.", "muted")
    return Section("Diverged and failed runs", body)


_TITLES = {
    "loss_curves": "Loss curves",
    "lr_heatmap": "Learning-rate grid",
    "best_lr": "Best learning rate",
    "steps_to_target": "Steps and samples to target",
    "generalization_gap": "Generalization gap",
    "noise_scale": "Gradient noise scale",
}


def standard_sections(a: StudyAnalysis) -> list[Section]:
    """The report's own sections in order: overview, one per figure (with its table), cost, runs."""
    after = {
        "best_lr": _best_lr_table(a),
        "steps_to_target": _target_table(a),
        "generalization_gap": _gap_tables(a),
    }
    sections = [_overview(a)]
    for name, build, note in figures.BUILDERS:
        fig = build(a)
        if fig is None:
            sections.append(Section(_TITLES[name], paragraph(note, "note"), anchor=name))
        else:
            sections.append(
                Section(_TITLES[name], figures=(fig,), after_html=after.get(name, ""), anchor=name)
            )
        if name == "steps_to_target":
            sections.append(_cost_section(a))
    unfinished = _unfinished_section(a)
    if unfinished is not None:
        sections.append(unfinished)
    return sections


def write_report(
    source: Store | str | os.PathLike[str] | StudyAnalysis,
    out_dir: str | os.PathLike[str],
    *,
    study: str | None = None,
    target: Target | None = None,
    extra_sections: Sequence[Section] = (),
    title: str | None = None,
) -> Path:
    """Write ``out_dir/index.html`` and ``out_dir/figures/<name>.png|.svg``; return the page's path.

    ``figures/`` is the report's own folder: PNG and SVG files already there are replaced.
    ``source`` is a store, a store path or an analysis already made. ``extra_sections`` come first,
    above the standard sections, in the order given; their figures are saved alongside.
    """
    a = source if isinstance(source, StudyAnalysis) else analyze(source, study, target=target)
    sections = [*extra_sections, *standard_sections(a)]
    all_figures: list[ReportFigure] = [f for s in sections for f in s.figures]
    for what, names in (
        ("figure names", [f.name for f in all_figures]),
        ("section anchors", [s.anchor for s in sections]),
    ):
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SpecError(
                "extra_sections", f"{what} must be unique, repeated: {', '.join(dupes)}"
            )
    out = Path(out_dir)
    fig_dir = out / FIGURES_DIR
    fig_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*fig_dir.glob("*.png"), *fig_dir.glob("*.svg")]:
        stale.unlink()  # figures/ belongs to the report: no figure of an older report survives
    pngs = {}
    for f in all_figures:
        pngs[f.name] = f.png()
        (fig_dir / f"{f.name}.png").write_bytes(pngs[f.name])
        (fig_dir / f"{f.name}.svg").write_text(f.svg(), encoding="utf-8")
    heading = title or f"batchlab report: {a.study or 'all runs'}"
    subtitle = (
        f"{a.n_runs} runs of {', '.join(a.tasks) or 'no task'}; "
        f"made by batchlab {batchlab.__version__}. Figures are embedded; "
        f"PNG and SVG copies are in {FIGURES_DIR}/."
    )
    page = out / "index.html"
    page.write_text(
        render_page(heading, subtitle, sections, pngs, files=FIGURES_DIR), encoding="utf-8"
    )
    log.info("report with %d figures written to %s", len(all_figures), page)
    return page
