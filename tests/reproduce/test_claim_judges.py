"""Claim judges on hand-built studies (no training): curves in, the verdict and report rows out."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from batchlab.analysis import StudyData
from batchlab.core.rules import apply_rule
from batchlab.reproduce import verdicts as v
from batchlab.reproduce.claims import CLAIMS, Judgement, Results, Setup, judge_claim2
from batchlab.reproduce.run import ClaimResult, ReproduceResult, verdict_sections
from batchlab.sweep.store import RunRecord

SETUP = Setup(mode="smoke", seeds=(0, 1, 2))
EPOCHS = [0.0, 0.25, 0.5, 0.75, 1.0]  # the smoke mode's claim-2 budget is 1 epoch


def base_curve(seed: int) -> list[float]:
    return [2.0 - e + 0.01 * seed for e in EPOCHS]


def record(batch_size: int, lr: float, seed: int, status: str, final_loss: float) -> RunRecord:
    spec = SETUP.spec(6_250, batch_size=batch_size, lr=lr, budget=1.0, seed=seed)
    return RunRecord(
        spec.run_id, spec, status, 1, 1, 1.0, 0.0, None, None,
        {"train_loss": final_loss}, {}, ("reproduce/claim2",), "", "", "",
    )  # fmt: skip


class Stored(Results):
    """Results whose claim-2 study is given, not read from a store."""

    def __init__(self, data: StudyData) -> None:
        self._data = data

    def data(self, study: str) -> StudyData:
        return self._data


def study(
    factors: dict[int, list[float]], diverged: frozenset[tuple[int, int]] = frozenset()
) -> StudyData:
    """Batch 64 at both grid lrs (the smaller one best), every larger batch at the scaled best lr
    with its loss curve ``factor x`` batch 64's curve of the same seed."""
    low, high = (0.03, 0.06)
    runs, histories = [], {}
    for seed in SETUP.seeds:
        for lr, scale in ((low, 1.0), (high, 1.5)):
            curve = [scale * y for y in base_curve(seed)]
            runs.append(record(64, lr, seed, "ok", curve[-1]))
            histories[runs[-1].id] = curve
        for b, per_seed in factors.items():
            lr = apply_rule("linear", base_batch=64, base_lr=low, batch_size=b).lr
            curve = [per_seed[seed] * y for y in base_curve(seed)]
            status = "diverged" if (b, seed) in diverged else "ok"
            runs.append(record(b, lr, seed, status, curve[-1]))
            histories[runs[-1].id] = curve if status == "ok" else curve[:2]
    rows = {
        rid: [{"epoch": e, "train_loss": y} for e, y in zip(EPOCHS, curve, strict=False)]
        for rid, curve in histories.items()
    }
    for rid in rows:  # step 0 has no training loss yet
        rows[rid][0]["train_loss"] = None
    return StudyData("reproduce/claim2", tuple(runs), rows)


def test_claim2_is_judged_on_the_curves_with_the_old_rule_beside():
    # 256: curves 4-6% above batch 64's; 1024: 8, 12, 16% (interval [0.074, 0.166] straddles 10%);
    # 4096 diverges in seed 1. The final loss of 1024 is 12% off on average: the old rule fails it.
    data = study(
        {256: [1.04, 1.05, 1.06], 1024: [1.08, 1.12, 1.16], 4096: [1.0, 1.0, 1.0]},
        diverged=frozenset({(4096, 1)}),
    )
    judgement = judge_claim2(SETUP, Stored(data))
    ev = judgement.outcome.evidence
    assert judgement.outcome.verdict == "inconclusive"
    assert ev["match"] == ["base", "match", "undecided", "diverged"]
    assert ev["curve_distance"][1:3] == pytest.approx([0.05, 0.12], rel=1e-9)
    se = 0.04 / math.sqrt(3)  # std of 0.08, 0.12, 0.16
    assert ev["curve_distance_low"][2] == pytest.approx(0.12 - 2 * se, rel=1e-9)
    assert ev["base_lr"] == 0.03 and ev["warmup_epochs"] == pytest.approx(0.2)
    old = ev["superseded_rule"]
    assert old["verdict"] == "not_supported"
    # final losses 1.00, 1.01, 1.02 at batch 64: (1.08 x 1.00 + 1.12 x 1.01 + 1.16 x 1.02) / 3.03
    final_1024 = (1.08 * 1.00 + 1.12 * 1.01 + 1.16 * 1.02) / 3.03
    assert old["final_loss_relative_difference"][2] == pytest.approx(final_1024 - 1, rel=1e-9)
    rows = dict(judgement.rows)
    assert rows["batch 1024: curve distance [interval], undecided"] == "0.120 [0.074, 0.166]"
    assert rows["superseded rule's verdict"] == "not supported"


def test_claim2_supported_when_both_intervals_lie_below_the_tolerance():
    data = study({256: [1.02, 1.03, 1.04], 1024: [1.05, 1.06, 1.07], 4096: [1.5, 1.6, 1.7]})
    out = judge_claim2(SETUP, Stored(data)).outcome
    assert out.verdict == "supported" and out.evidence["break_batch_size"] == 4096


def test_report_shows_the_rule_and_the_superseded_rule():
    outcome = v.Outcome("inconclusive", "the interval straddles")
    result = ReproduceResult([ClaimResult(CLAIMS[2], Judgement(outcome))], Path("x"), None, SETUP)
    claim2 = verdict_sections(result)[1]
    page = claim2.html + claim2.after_html
    assert CLAIMS[2].rule == v.RULES[2] and CLAIMS[2].superseded == v.SUPERSEDED[2]
    assert page.index("Pre-registered rule: With lr scaled") < page.index("Superseded rule")
    assert "final training loss is within 10%" in page
    assert result.claims[0].to_dict()["superseded_rule"] == v.SUPERSEDED[2]
    assert CLAIMS[3].superseded is None
