"""``batchlab reproduce`` end to end at the smoke size: every claim's study runs and is judged."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from typer.testing import CliRunner

from batchlab.cli import app
from batchlab.reproduce.claims import CLAIMS, GRID, MODES, STUDY_PREFIX, Results, Setup, best_lr
from batchlab.reproduce.run import check_claims, reproduce
from batchlab.sweep.store import Store

SMOKE = Setup(mode="smoke", seeds=(0, 1))
VERDICTS = {"supported", "not_supported", "inconclusive"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke-size reproduce of all eight claims, shared by the tests below."""
    root = tmp_path_factory.mktemp("reproduce")
    result = reproduce(setup=SMOKE, db=root / "runs.sqlite", out=root / "report", workers=2)
    return root, result


def test_every_claim_is_judged_with_evidence_and_a_figure(smoke):
    _, result = smoke
    assert [c.claim.number for c in result.claims] == list(range(1, 9))
    for c in result.claims:
        d = c.to_dict()
        assert d["verdict"] in VERDICTS and d["source"] and d["rule"] == CLAIMS[d["claim"]].rule
        assert not d["reason"].startswith("could not"), (d["claim"], d["reason"])
        assert d["evidence"], d["claim"]
        assert c.judgement.figures, d["claim"]


def test_runs_are_stored_in_studies_and_shared(smoke):
    root, result = smoke
    with Store(root / "runs.sqlite", readonly=True) as store:
        names = {s.name for s in store.studies()}
        assert {
            STUDY_PREFIX + n for n in (GRID, "claim2", "claim5", "claim6", "claim7-noise")
        } <= names
        grid = store.runs(STUDY_PREFIX + GRID)
        z = MODES["smoke"]
        assert len(grid) == len(z.grid_batch_sizes) * len(z.grid_lrs) * len(SMOKE.seeds)
        assert result.runs_trained == len(store.runs())
        noise = store.runs(STUDY_PREFIX + "claim7-noise")
        assert all(store.history(r.id)[-1]["noise_scale"] is not None for r in noise)
        assert any(store.weights(r.id) is not None for r in grid)


def test_report_has_the_verdicts_on_top(smoke):
    root, result = smoke
    page = (root / "report" / "index.html").read_text()
    assert result.report == root / "report" / "index.html"
    assert page.index("Verdicts") < page.index("Claim 1:") < page.index("Claim 8:")
    assert "Pre-registered rule" in page
    for c in result.claims:
        for fig in c.judgement.figures:
            assert (root / "report" / "figures" / f"{fig.name}.png").stat().st_size > 0


def test_rerun_resumes_from_the_store(smoke):
    root, first = smoke
    again = reproduce([1, 8], setup=SMOKE, db=root / "runs.sqlite", out=None, executor="inline")
    assert again.runs_trained == 0 and again.runs_reused > 0
    assert [c.verdict for c in again.claims] == [first.claims[0].verdict, first.claims[7].verdict]


def test_base_lr_is_the_best_training_loss_at_64(smoke):
    root, result = smoke
    with Store(root / "runs.sqlite", readonly=True) as store:
        results = Results(store, SMOKE)
        lr = results.base_lr()
        data = results.data(GRID)
        by_lr = {}
        for run in data.at(64):
            by_lr.setdefault(run.lr, []).append(
                run.final["train_loss"] if run.status == "ok" else math.inf
            )
        finite = {k: statistics.median(v) for k, v in by_lr.items() if all(map(math.isfinite, v))}
        assert lr == min(finite, key=finite.get)
        assert result.claims[0].judgement.outcome.evidence["lr"] == lr
        assert best_lr(data, 64, "train_loss") == lr


def test_cli_json_and_bad_claims(smoke, tmp_path):
    root, _ = smoke
    runner = CliRunner()
    args = ["reproduce", "--smoke", "--seeds", "2", "--db", str(root / "runs.sqlite")]
    res = runner.invoke(app, [*args, "--claims", "1,3", "--out", str(tmp_path / "r"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [c["claim"] for c in out["claims"]] == [1, 3] and out["runs_trained"] == 0
    assert {"claim", "verdict", "evidence", "source"} <= set(out["claims"][0])
    for bad in ("9", "x", "1,,0"):
        res = runner.invoke(app, [*args, "--claims", bad])
        assert res.exit_code == 2 and res.stderr.startswith("error: claims: ")
    res = runner.invoke(app, [*args[:-2], "--seeds", "1"])
    assert res.exit_code == 2 and res.stderr.startswith("error: seeds: ")


def test_check_claims():
    assert [c.number for c in check_claims([7, 1, 7])] == [1, 7]
    with pytest.raises(ValueError, match="claims"):
        check_claims([])


def test_another_seed_set_in_the_same_store_is_judged_on_its_own_runs(smoke):
    root, _ = smoke
    other = Setup(mode="smoke", seeds=(2, 3))
    again = reproduce([1], setup=other, db=root / "runs.sqlite", out=None, executor="inline")
    assert again.runs_trained > 0  # the new seeds' grid runs
    [claim1] = again.claims
    assert len(claim1.judgement.outcome.evidence["loss_per_seed"]) == 2  # seeds 2, 3 only
    with Store(root / "runs.sqlite", readonly=True) as store:
        results = Results(store, SMOKE)
        results.expect({GRID: SMOKE.grid()})
        assert results.data(GRID).seeds == (0, 1)
