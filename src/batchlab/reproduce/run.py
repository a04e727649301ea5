"""``reproduce()``: plan every chosen claim's studies stage by stage, run what is not stored, judge.

Runs go through the sweep runner (``run_specs``) into the store, so an interrupted reproduce resumes
where it stopped; the report is ``batchlab report`` of the shared grid study with a verdict section
per claim on top.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchlab.engine.spec import RunSpec, SpecError
from batchlab.report.html import Section, escape, paragraph, table
from batchlab.reproduce import verdicts as v
from batchlab.reproduce.claims import (
    CLAIMS,
    GRID,
    STUDY_PREFIX,
    Claim,
    Judgement,
    Results,
    Setup,
    claim7_target,
)
from batchlab.sweep.runner import SweepReport, run_specs
from batchlab.sweep.store import Store, StoreError

log = logging.getLogger(__name__)

Progress = Callable[[str, SweepReport], None]
"""Called as ``progress(stage_label, report)`` while the runs of a stage train."""


@dataclass(frozen=True)
class ClaimResult:
    """One claim's verdict with its evidence, or why it could not be judged."""

    claim: Claim
    judgement: Judgement

    @property
    def verdict(self) -> v.Verdict:
        return self.judgement.outcome.verdict

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` object of one claim."""
        o = self.judgement.outcome
        return {
            "claim": self.claim.number,
            "title": self.claim.title,
            "verdict": o.verdict,
            "reason": o.reason,
            "evidence": o.evidence,
            "source": self.claim.source,
            "rule": self.claim.rule,
            "superseded_rule": self.claim.superseded,
        }


@dataclass
class ReproduceResult:
    """Every judged claim, where the runs and the report are, and what it cost."""

    claims: list[ClaimResult]
    db: Path
    report: Path | None
    setup: Setup
    runs_trained: int = 0
    runs_reused: int = 0
    wall_s: float = 0.0
    stages: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` object."""
        return {
            "claims": [c.to_dict() for c in self.claims],
            "mode": self.setup.mode,
            "seeds": list(self.setup.seeds),
            "task": self.setup.task,
            "db": str(self.db),
            "report": str(self.report) if self.report else None,
            "runs_trained": self.runs_trained,
            "runs_reused": self.runs_reused,
            "wall_s": self.wall_s,
            "stages": self.stages,
        }


def check_claims(numbers: Sequence[int]) -> list[Claim]:
    """The claims named by number, in order; an unknown number is a ``SpecError``."""
    unknown = sorted(set(numbers) - set(CLAIMS))
    if unknown or not numbers:
        raise SpecError(
            "claims", f"must be numbers in 1..{len(CLAIMS)}, got {', '.join(map(str, numbers))}"
        )
    return [CLAIMS[n] for n in sorted(set(numbers))]


def _plan_stage(
    claims: Sequence[Claim], stage: int, setup: Setup, results: Results, failed: dict[int, str]
) -> dict[str, list[RunSpec]]:
    """Every study's runs for ``stage``, deduplicated by id; a claim that cannot plan is noted."""
    planned: dict[str, dict[str, RunSpec]] = {}
    for claim in claims:
        planner = claim.studies.get(stage)
        if planner is None or claim.number in failed:
            continue
        try:
            studies = planner(setup, results)
        except StoreError:  # the store itself is unreadable: not a claim's problem
            raise
        except (ValueError, KeyError) as exc:  # e.g. every run at batch 64 diverged
            failed[claim.number] = f"could not plan stage {stage}: {exc}"
            log.warning("claim %d: %s", claim.number, failed[claim.number])
            continue
        for study, specs in studies.items():
            planned.setdefault(STUDY_PREFIX + study, {}).update({s.run_id: s for s in specs})
    return {study: list(specs.values()) for study, specs in planned.items()}


def _judge(claim: Claim, setup: Setup, results: Results, failed: dict[int, str]) -> ClaimResult:
    """The claim's judgement; a claim whose runs or analysis failed is inconclusive, saying why."""
    if claim.number in failed:
        return ClaimResult(claim, Judgement(v.Outcome("inconclusive", failed[claim.number])))
    try:
        return ClaimResult(claim, claim.judge(setup, results))
    except StoreError:
        raise
    except (ValueError, KeyError, IndexError, ZeroDivisionError) as exc:
        log.warning("claim %d could not be judged: %s", claim.number, traceback.format_exc())
        reason = f"could not be judged: {type(exc).__name__}: {exc}"
        return ClaimResult(claim, Judgement(v.Outcome("inconclusive", reason)))


def reproduce(
    claims: Sequence[int] = tuple(CLAIMS),
    *,
    setup: Setup | None = None,
    db: str | os.PathLike[str] = "batchlab.sqlite",
    out: str | os.PathLike[str] | None = "report",
    executor: str | None = None,
    workers: int | None = None,
    device: str | None = None,
    progress: Progress | None = None,
) -> ReproduceResult:
    """Run the studies of ``claims`` (reusing stored runs), judge each claim, write the report.

    Args:
        claims: claim numbers (1..8).
        setup: the mode (quick, full, smoke), seeds and task; default: quick, seeds 0, 1, 2, MNIST-1D.
        db: the run store (created when missing).
        out: report folder, or None for no report.
        executor, workers, device: as for ``batchlab sweep`` (default: a local process pool).
    """
    chosen = check_claims(list(claims))
    setup = setup or Setup()
    started = time.perf_counter()
    result = ReproduceResult([], Path(db), None, setup)
    failed: dict[int, str] = {}
    with Store(db) as store:
        results = Results(store, setup)
        for stage in sorted({s for c in chosen for s in c.studies}):
            studies = _plan_stage(chosen, stage, setup, results, failed)
            results.expect(studies)
            label = f"stage {stage}: {', '.join(s.removeprefix(STUDY_PREFIX) for s in studies)}"
            log.info("%s (%d runs)", label, sum(len(s) for s in studies.values()))
            report = run_specs(
                studies,
                store,
                executor=executor or "local",
                workers=workers,
                device=device,
                keep_weights={STUDY_PREFIX + GRID},  # claim 4's sharpness, whichever claims run
                retry_failed=True,  # a failed run is no result: a rerun tries it again
                progress=(lambda r, label=label: progress(label, r)) if progress else None,
            )
            result.runs_trained += report.to_run
            result.runs_reused += report.skipped
            result.stages.append({"stage": stage, "studies": sorted(studies), **report.to_dict()})
            results.forget()  # the next stage plans on what this one stored
        result.claims = [_judge(c, setup, results, failed) for c in chosen]
        if out is not None:
            result.report = write_reproduce_report(result, store, results, Path(out))
    result.wall_s = time.perf_counter() - started
    return result


def verdict_sections(result: ReproduceResult) -> list[Section]:
    """The summary table and one section per claim: statement, verdict, numbers, figure, rule."""
    mode = result.setup.mode
    summary = table(
        ["claim", "verdict", "why", "source"],
        [
            (
                f"{c.claim.number}. {c.claim.title}",
                c.verdict,
                c.judgement.outcome.reason,
                c.claim.source,
            )
            for c in result.claims
        ],
        text_columns=4,
    )
    intro = paragraph(
        f"{mode} mode on {result.setup.task}, seeds {', '.join(map(str, result.setup.seeds))}. "
        "Each verdict comes from a rule written before any study was run (shown with each claim); "
        "'not supported' means the rule's condition failed on this task, not that the paper is wrong."
    )
    sections = [Section("Verdicts", intro + summary, anchor="verdicts")]
    for c in result.claims:
        o = c.judgement.outcome
        head = (
            f'<p>Verdict: <span class="{escape(o.verdict)}">{escape(o.verdict.replace("_", " "))}</span>'
            f" &mdash; {escape(o.reason)}.</p>" + paragraph(f"Source: {c.claim.source}.", "muted")
        )
        numbers = (
            table(["number", "value"], c.judgement.rows, text_columns=1) if c.judgement.rows else ""
        )
        rule = paragraph(f"Pre-registered rule: {c.claim.rule}", "note")
        if c.claim.superseded:
            rule += paragraph(
                f"Superseded rule (kept for the record; the verdict does not use it): "
                f"{c.claim.superseded}",
                "muted",
            )
        sections.append(
            Section(
                f"Claim {c.claim.number}: {c.claim.title}",
                head + numbers,
                figures=c.judgement.figures,
                after_html=rule,
                anchor=f"claim-{c.claim.number}",
            )
        )
    return sections


def write_reproduce_report(
    result: ReproduceResult, store: Store, results: Results, out: Path
) -> Path | None:
    """The report of the grid study (when it was run) with the verdict sections on top."""
    from batchlab.report import write_report

    grid = STUDY_PREFIX + GRID
    names = {s.name for s in store.studies()}
    study = (
        grid
        if grid in names
        else next((n for n in sorted(names) if n.startswith(STUDY_PREFIX)), None)
    )
    if study is None:
        return None
    target = None
    if study == grid:
        try:
            target = claim7_target(results.data(GRID))
        except StoreError:
            raise
        except ValueError:
            target = None
    return write_report(
        store,
        out,
        study=study,
        target=target,
        extra_sections=verdict_sections(result),
        title="batchlab reproduce: the classic claims about batch size and learning rate",
    )


def seeds_from(count: int, first: int = 0) -> tuple[int, ...]:
    """``count`` consecutive seeds from ``first`` (a second seed set: another ``first``)."""
    if count < 2:
        raise SpecError("seeds", f"must be >= 2 (verdicts need a spread over seeds), got {count}")
    return tuple(range(first, first + count))
