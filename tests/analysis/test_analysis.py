"""Analysis over real stores: a hand-computed steps-to-target case and synthetic sweeps with known
critical batch size, lr exponent and generalization gap."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from tests.analysis.synthetic import Truth, write_study

from batchlab.analysis import StudyData, Target, analyze, load_study, to_target_table
from batchlab.core.fit import fit_steps_vs_batch
from batchlab.engine.spec import RunResult, RunSpec, SpecError
from batchlab.sweep.store import Store

EVERY = 10
SWEEP_EVERY = 50


def _result(b: int, lr: float, seed: int, metrics: list[float], status: str = "ok") -> RunResult:
    spec = RunSpec(
        task="digits-mlp", batch_size=b, lr=lr, seed=seed, budget_unit="steps", budget=40
    )
    history = [
        {
            "step": i * EVERY,
            "samples": i * EVERY * b,
            "epoch": i * EVERY * b / 1000,
            "lr": lr,
            "batch_size": b,
            "train_loss": 1.0 - m,
            "val_loss": 1.1 - m,
            "val_metric": m,
            "wall_s": i * EVERY * 0.01,
            "noise_scale": None,
        }
        for i, m in enumerate(metrics)
    ]
    steps = history[-1]["step"]
    final = {
        "train_loss": 1 - metrics[-1],
        "val_loss": 1.1 - metrics[-1],
        "train_metric": metrics[-1],
        "val_metric": metrics[-1],
    }
    if status == "diverged":
        final = dict.fromkeys(final, math.nan)
    return RunResult(
        spec,
        status,
        steps,
        steps * b,
        steps * 0.01,
        history,
        final,
        15 if status == "diverged" else None,
    )


NEVER = [0.1, 0.3, 0.5, 0.6, 0.7]
HAND_RUNS = [
    # batch 32: seed 0 -> lr 0.2 at step 20; seed 1 -> lr 0.1 at 40 (lr 0.2 diverged after showing
    # 0.85: a diverged run never counts); seed 2 -> lr 0.1 at 10 (0.8 reaches >= 0.8).
    (32, 0.1, 0, [0.1, 0.5, 0.79, 0.81, 0.9], "ok"),
    (32, 0.2, 0, [0.1, 0.6, 0.85, 0.9, 0.95], "ok"),
    (32, 0.1, 1, [0.1, 0.4, 0.7, 0.75, 0.82], "ok"),
    (32, 0.2, 1, [0.1, 0.85], "diverged"),
    (32, 0.1, 2, [0.1, 0.8, 0.85, 0.9, 0.9], "ok"),
    (32, 0.2, 2, NEVER, "ok"),
    # batch 64: seed 0 never; seed 1 -> lr 0.1 at 20; seed 2 -> lr 0.2 at 10.
    (64, 0.1, 0, NEVER, "ok"),
    (64, 0.2, 0, NEVER, "ok"),
    (64, 0.1, 1, [0.1, 0.5, 0.8, 0.9, 0.9], "ok"),
    (64, 0.2, 1, [0.1, 0.5, 0.7, 0.8, 0.9], "ok"),
    (64, 0.1, 2, NEVER, "ok"),
    (64, 0.2, 2, [0.2, 0.9, 0.9, 0.9, 0.9], "ok"),
    # batch 128: only seeds 0 and 1, neither reaches.
    (128, 0.1, 0, NEVER, "ok"),
    (128, 0.1, 1, NEVER, "ok"),
]


@pytest.fixture(scope="module")
def hand(tmp_path_factory: pytest.TempPathFactory) -> StudyData:
    db = tmp_path_factory.mktemp("hand") / "runs.sqlite"
    with Store(db) as store:
        store.put_many([_result(*r) for r in HAND_RUNS], study="hand")
    return load_study(db, target=Target("val_metric", 0.8))


def test_steps_to_target_hand_computed(hand: StudyData) -> None:
    rows = {r.batch_size: r for r in to_target_table(hand, hand.target)}
    b32, b64, b128 = rows[32], rows[64], rows[128]
    assert b32.per_seed_steps == (20.0, 40.0, 10.0)
    assert b32.per_seed_lr == (0.2, 0.1, 0.1)
    assert (b32.steps, b32.steps_low, b32.steps_high) == (20.0, 10.0, 40.0)
    assert b32.samples == 640.0  # median of 640, 1280, 320
    assert b32.epochs == pytest.approx(0.64)
    assert b32.wall_s == pytest.approx(0.2)
    assert b32.best_lr == 0.1  # two of three seeds were fastest at 0.1
    assert (b32.n_seeds, b32.n_reached) == (3, 3)
    assert b64.per_seed_steps == (math.inf, 20.0, 10.0)
    assert (b64.steps, b64.steps_low, b64.steps_high, b64.n_reached) == (20.0, 10.0, math.inf, 2)
    assert b64.reached
    assert b128.per_seed_steps[:2] == (math.inf, math.inf)
    assert math.isnan(b128.per_seed_steps[2])  # seed 2 has no run at batch 128
    assert (b128.reached, b128.n_seeds, b128.n_reached) == (False, 2, 0)


def test_target_from_study_config_and_override(tmp_path: Path) -> None:
    db = tmp_path / "runs.sqlite"
    with Store(db) as store:
        store.put_many([_result(*r) for r in HAND_RUNS], study="hand")
        store.set_study("hand", {"target": {"metric": "val_loss", "value": 0.26}})
    a = analyze(db)
    assert a.target == Target("val_loss", 0.26)
    # val_loss = 1.1 - metric <= 0.26  <=>  metric >= 0.84: batch 32 seed 0 at lr 0.2 step 20.
    assert {r.batch_size: r.per_seed_steps[0] for r in a.to_target}[32] == 20.0
    b = analyze(db, target=Target("val_metric", 0.95))
    assert b.target.describe() == "val_metric >= 0.95"


def test_study_resolution_errors(tmp_path: Path) -> None:
    db = tmp_path / "runs.sqlite"
    with Store(db) as store:
        store.put(_result(32, 0.1, 0, NEVER), study="a")
        store.put(_result(64, 0.1, 0, NEVER), study="b")
    with pytest.raises(SpecError, match="several studies") as err:
        analyze(db)
    assert err.value.field == "study"
    with pytest.raises(SpecError, match="no study 'c'"):
        analyze(db, "c")
    assert analyze(db, "b").batch_sizes == (64,)
    with pytest.raises(SpecError, match=r"^target:"):
        Target("accuracy", 0.5)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory):
    """alpha = 1 with lr* exactly on the factor-2 grid, so the fastest lr is lr* at every batch."""
    truth = Truth(alpha=1.0, lr0=0.0125, b_crit=100.0, s_min=310.0)
    db = tmp_path_factory.mktemp("sweep") / "runs.sqlite"
    batches = [8, 16, 32, 64, 128, 256, 512, 1024]
    with Store(db) as store:
        write_study(
            store, "sweep", truth, batches, steps=5000, eval_every=SWEEP_EVERY, noise_scale=True
        )
    return truth, batches, analyze(db, n_boot=100)


def test_steps_to_target_and_fit_match_truth(sweep) -> None:
    truth, batches, a = sweep
    # The median seed (seed 1) needs exactly S_min (1 + B_crit/B); the first eval at or after it:
    expected = [
        math.ceil(truth.steps_needed(b, truth.best_lr(b), 1) / SWEEP_EVERY) * SWEEP_EVERY
        for b in batches
    ]
    assert [r.steps for r in a.to_target] == pytest.approx(expected)
    assert [r.best_lr for r in a.to_target] == pytest.approx([truth.best_lr(b) for b in batches])
    assert [r.samples for r in a.to_target] == pytest.approx(
        [s * b for s, b in zip(expected, batches, strict=True)]
    )
    direct = fit_steps_vs_batch(batches, expected, n_boot=0)
    assert a.scaling.critical_batch == pytest.approx(direct.critical_batch, rel=1e-9)
    # Rounding up to the eval grid biases S a little; the fit still lands near the truth.
    assert a.scaling.critical_batch == pytest.approx(truth.b_crit, rel=0.10)
    assert a.scaling.s_min == pytest.approx(truth.s_min, rel=0.10)
    assert a.scaling.e_min == pytest.approx(a.scaling.s_min * a.scaling.critical_batch)
    low, high = a.scaling.critical_batch_interval
    assert a.scaling.interval_method == "seeds" and low <= a.scaling.critical_batch <= high
    regions = dict(a.scaling.regions)
    assert regions[8] == "perfect_scaling" and regions[1024] == "maximal_parallelism"
    assert regions[128] == "diminishing_returns"


def test_cost_table_speedup_and_efficiency(sweep) -> None:
    a = sweep[2]
    ref = a.cost[0]
    assert (ref.batch_size, ref.speedup, ref.efficiency, ref.basis) == (8, 1.0, 1.0, "target")
    for row, reach in zip(a.cost, a.to_target, strict=True):
        assert row.speedup == pytest.approx(ref.steps / reach.steps)
        assert row.efficiency == pytest.approx(ref.samples / reach.samples)
    assert a.cost[-1].efficiency < 0.2  # far past B_crit most examples are wasted


def test_generalization_gap_at_equal_steps_and_epochs(sweep) -> None:
    truth, batches, a = sweep
    steps, epochs = a.gap_steps, a.gap_epochs
    # Every run has 5000 steps: equal steps reads the final full-set numbers.
    assert steps.at == 5000 and {r.source for r in steps.rows} == {"final"}
    assert [r.gap_loss for r in steps.rows] == pytest.approx([truth.gap(b) for b in batches])
    assert [r.gap_metric for r in steps.rows] == pytest.approx([truth.gap(b) / 2 for b in batches])
    # Equal epochs: the smallest batch's 40 epochs; the others are interpolated in their history.
    assert epochs.at == pytest.approx(5000 * 8 / 1000)
    assert epochs.rows[0].source == "final" and epochs.rows[-1].source == "history"
    assert [r.gap_loss for r in epochs.rows] == pytest.approx([truth.gap(b) for b in batches])


def test_diverged_runs_are_counted_not_fitted(sweep) -> None:
    truth, _, a = sweep
    diverged = [r for r in a.unfinished if r.status == "diverged"]
    assert diverged and all(
        r.lr > truth.diverge_above * truth.best_lr(r.batch_size) for r in diverged
    )
    cells = {(c.batch_size, c.lr): c for c in a.grid}
    for r in diverged:
        cell = cells[(r.batch_size, r.lr)]
        assert cell.n_ok == 0 and math.isnan(cell.value)
    assert sum(c.n_diverged for c in a.grid) == a.n_diverged == len(diverged)
    assert a.n_ok + a.n_diverged == a.n_runs


def test_noise_scale_beside_fit(sweep) -> None:
    truth, _, a = sweep
    n = a.noise
    assert n is not None and len(n.series) == a.n_ok
    # Each run measures B_crit (0.3 + 0.7 t/T); the median of the second half is the value at
    # t = 3T/4 (an odd number of rows from T/2 to T), 0.825 B_crit, in every run.
    assert n.measured == pytest.approx(0.825 * truth.b_crit)
    assert n.measured_low == n.measured_high == n.measured
    assert n.critical_over_measured == pytest.approx(a.scaling.critical_batch / n.measured)
    assert all(np.allclose(np.array(s.high) / np.array(s.value), 1.1) for s in n.series)


def test_to_dict_is_json_and_omits_series_by_default(sweep) -> None:
    a = sweep[2]
    small = a.to_dict()
    assert "curves" not in small and "series" not in small["noise"]
    text = json.dumps(small)
    assert json.loads(text)["scaling"]["critical_batch"] == pytest.approx(a.scaling.critical_batch)
    assert len(a.to_dict(series=True)["curves"]) == len(a.batch_sizes)


def _lr_study(
    tmp_path: Path,
    truth: Truth,
    *,
    seeds: tuple[int, ...],
    n_boot: int,
    batches: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024),
    lrs: list[float] | None = None,
):
    """Short runs (only the final losses matter here) of ``truth`` on a fresh store, analysed."""
    with Store(tmp_path / "runs.sqlite") as store:
        write_study(store, "lr", truth, batches, seeds, lrs=lrs, steps=400, eval_every=100)
        return analyze(store, n_boot=n_boot)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_lr_exponent_recovered_exactly_without_noise(tmp_path: Path, alpha: float) -> None:
    truth = Truth(alpha=alpha, lr0=0.01)
    a = _lr_study(tmp_path, truth, seeds=(0, 1), n_boot=50)
    s = a.best_lr
    # Final val loss is quadratic in log lr, so the parabola finds lr* between grid points exactly.
    assert [r.lr for r in s.rows] == pytest.approx(
        [truth.best_lr(r.batch_size) for r in s.rows], rel=1e-9
    )
    assert s.alpha == pytest.approx(alpha, abs=1e-9)
    assert not s.uses_edge_points and s.used == a.batch_sizes
    assert s.closest_rule == ("linear" if alpha == 1.0 else "sqrt")
    assert s.rules_in_interval == (s.closest_rule,)


@pytest.mark.parametrize(("alpha", "rule"), [(1.0, "linear"), (0.5, "sqrt")])
def test_lr_exponent_interval_over_noisy_seeds(tmp_path: Path, alpha: float, rule: str) -> None:
    truth = Truth(alpha=alpha, lr0=0.01, lr_jitter=0.15)
    a = _lr_study(tmp_path, truth, seeds=(0, 1, 2, 3, 4), n_boot=300)
    s = a.best_lr
    low, high = s.alpha_interval
    assert abs(s.alpha - alpha) < 0.1
    assert low < alpha < high and high - low < 0.4
    assert s.rules_in_interval == (rule,)
    per_seed = np.array([r.per_seed_lr for r in s.rows])
    assert np.all(per_seed.max(axis=1) > per_seed.min(axis=1))  # the seeds really disagree


def test_edge_of_grid_is_flagged_and_left_out(tmp_path: Path) -> None:
    truth = Truth(alpha=1.0, lr0=0.01)
    grid = [0.005, 0.01, 0.02, 0.04, 0.08]  # lr* = 0.01 (B 16) .. 0.16 (B 256): off the grid's top
    a = _lr_study(tmp_path, truth, seeds=(0,), n_boot=10, batches=(16, 32, 64, 128, 256), lrs=grid)
    edge = {r.batch_size: r.at_edge for r in a.best_lr.rows}
    assert edge == {16: False, 32: False, 64: False, 128: True, 256: True}
    assert a.best_lr.used == (16, 32, 64)
    assert a.best_lr.alpha == pytest.approx(1.0, abs=1e-9)
    assert all(math.isnan(v) for v in a.best_lr.alpha_interval)  # one seed: no bootstrap
