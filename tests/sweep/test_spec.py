"""Sweep files: parsing, defaults from RunSpec, rule-centred grids, stable plans and ids, bad keys."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
from pathlib import Path

import pytest

from batchlab.engine.spec import RunSpec, SpecError
from batchlab.sweep.spec import (
    BatchBudget,
    LRGrid,
    SweepSpec,
    Target,
    check,
    eval_spacing,
    load_sweep,
    plan,
)

ROOT = Path(__file__).resolve().parents[2]

MINIMAL = """
study = "demo"
task = "digits-mlp"
batch_sizes = [32, 128, 512]
lr = [0.01, 0.03, 0.1, 0.3]
seeds = [0, 1]
optimizer = {name = "sgd", momentum = 0.9}
budget = {epochs = 5}
target = {metric = "val_metric", value = 0.5}
"""


def write(tmp_path: Path, text: str, name: str = "sweep.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_plan_is_the_grid_of_runspecs_built_by_hand(tmp_path):
    sweep = load_sweep(write(tmp_path, MINIMAL))
    expected = [
        RunSpec(
            task="digits-mlp",
            batch_size=b,
            lr=lr,
            seed=s,
            momentum=0.9,
            budget_unit="epochs",
            budget=5.0,
        )
        for b, lr, s in itertools.product([32, 128, 512], [0.01, 0.03, 0.1, 0.3], [0, 1])
    ]
    runs = plan(sweep)
    assert runs == expected
    assert [r.run_id for r in runs] == [r.run_id for r in expected]
    assert len({r.run_id for r in runs}) == 24
    assert sweep.target == Target("val_metric", 0.5) and sweep.target.higher_is_better


def test_ids_are_stable_across_loads_spellings_and_the_saved_config(tmp_path):
    first = [r.run_id for r in plan(load_sweep(write(tmp_path, MINIMAL)))]
    again = [r.run_id for r in plan(load_sweep(write(tmp_path, MINIMAL, "other.toml")))]
    # integers where RunSpec has floats (lr = 1 vs 1.0, epochs = 5 vs 5.0) are the same run
    ints = MINIMAL.replace("epochs = 5}", "epochs = 5.0}")
    spelled = [r.run_id for r in plan(load_sweep(write(tmp_path, ints, "ints.toml")))]
    sweep = load_sweep(write(tmp_path, MINIMAL))
    saved = SweepSpec.from_dict(sweep.to_dict())
    assert first == again == spelled == [r.run_id for r in plan(saved)]
    one = [r.run_id for r in plan(dataclasses.replace(sweep, lr=(1,)))]
    assert one == [r.run_id for r in plan(dataclasses.replace(sweep, lr=(1.0,)))]


def test_study_defaults_to_the_file_name_and_run_fields_to_runspec_defaults(tmp_path):
    path = write(tmp_path, 'task = "digits-mlp"\nbatch_sizes = [64]\nlr = [0.1]\n', "mine.toml")
    sweep = load_sweep(path)
    assert sweep.study == "mine"
    (run,) = plan(sweep)
    assert run == RunSpec(task="digits-mlp", batch_size=64, lr=0.1)
    config = sweep.to_dict()
    assert config["optimizer"]["name"] == RunSpec.optimizer
    assert config["budget"] == {RunSpec.budget_unit: RunSpec.budget}
    assert config["seeds"] == [RunSpec.seed]


def test_tables_map_to_runspec_fields(tmp_path):
    text = """
task = {name = "digits-mlp", options = {}}
batch_sizes = [64]
lr = [0.001]
optimizer = {name = "adamw", beta1 = 0.8, beta2 = 0.99, eps = 1e-6, weight_decay = 0.01}
schedule = {name = "multistep", milestones = [0.5, 0.9], gamma = 0.2, warmup_epochs = 1, warmup = "exponential"}
budget = {samples = 6400}
eval_every = 5
noise_scale = true
"""
    sweep = load_sweep(write(tmp_path, text))
    assert hash(sweep) == hash(load_sweep(write(tmp_path, text)))  # frozen all the way down
    (run,) = plan(sweep)
    assert run == RunSpec(
        task="digits-mlp",
        batch_size=64,
        lr=0.001,
        optimizer="adamw",
        beta1=0.8,
        beta2=0.99,
        eps=1e-6,
        weight_decay=0.01,
        schedule="multistep",
        schedule_options={"milestones": (0.5, 0.9), "gamma": 0.2},
        warmup_epochs=1.0,
        warmup="exponential",
        budget_unit="samples",
        budget=6400.0,
        eval_every=5,
        noise_scale=True,
    )


@pytest.mark.parametrize(
    ("rule", "batch_size", "centre"),
    [("linear", 512, 0.2), ("linear", 32, 0.0125), ("sqrt", 512, 0.1), ("sqrt", 32, 0.025)],
)
def test_rule_centred_grid_is_geometric_around_the_rule(rule, batch_size, centre):
    grid = LRGrid(rule=rule, base_batch=128, base_lr=0.05, span=(0.125, 8), points=7)
    values = grid.values(batch_size, "sgd")
    assert values[3] == pytest.approx(centre, rel=1e-12)
    assert values[0] == pytest.approx(centre / 8) and values[-1] == pytest.approx(centre * 8)
    ratios = [b / a for a, b in itertools.pairwise(values)]
    assert ratios == pytest.approx([2.0] * 6, rel=1e-5)


def test_rule_centred_grid_follows_the_batch_size_in_a_sweep(tmp_path):
    text = """
task = "digits-mlp"
batch_sizes = [32, 512]
lr = {rule = "linear", base_batch = 128, base_lr = 0.05, span = [0.5, 2], points = 3}
"""
    sweep = load_sweep(write(tmp_path, text))
    assert [(r.batch_size, r.lr) for r in plan(sweep)] == [
        (32, 0.00625),
        (32, 0.0125),
        (32, 0.025),
        (512, 0.1),
        (512, 0.2),
        (512, 0.4),
    ]
    assert SweepSpec.from_dict(sweep.to_dict()).lr == sweep.lr


def test_check_returns_the_task_and_accepts_the_largest_batch(tmp_path):
    sweep = load_sweep(write(tmp_path, MINIMAL.replace("[32, 128, 512]", "[1437]")))
    assert check(sweep).n_train == 1437


def test_python_construction_is_validated_with_the_file_keys():
    base = {"study": "s", "task": "digits-mlp", "batch_sizes": (8,), "lr": (0.1,)}
    SweepSpec(**base)
    cases = [
        ({"batch_sizes": ()}, "batch_sizes"),
        ({"batch_sizes": (8, 8)}, "batch_sizes"),
        ({"lr": (-0.1,)}, "lr"),
        ({"lr": (math.inf,)}, "lr"),
        ({"seeds": (-1,)}, "seeds"),
        ({"study": " "}, "study"),
        ({"fixed": (("momentum", 1.5),)}, "optimizer.momentum"),
        ({"fixed": (("batch_size", 4),)}, "batch_sizes"),
        ({"fixed": (("colour", 4),)}, "colour"),
    ]
    for change, key in cases:
        with pytest.raises(SpecError) as err:
            SweepSpec(**(base | change))
        assert err.value.field == key, change


def test_adaptive_batch_in_a_sweep_file(tmp_path):
    text = MINIMAL + 'adaptive_batch = {rule = "constant", max_batch = 1024}\n'
    sweep = load_sweep(write(tmp_path, text))
    runs = plan(sweep)
    assert all(r.adaptive_batch and r.noise_scale for r in runs)
    assert dict(runs[0].adaptive_options) == {"rule": "constant", "max_batch": 1024}
    saved = SweepSpec.from_dict(sweep.to_dict())
    assert [r.run_id for r in plan(saved)] == [r.run_id for r in runs]
    plain = load_sweep(write(tmp_path, MINIMAL + "adaptive_batch = true\n", "on.toml"))
    assert plain.to_dict()["adaptive_batch"] is True
    for line, key in [
        ("adaptive_batch = {factor = 1}", "adaptive_batch.factor"),
        ("adaptive_batch = {grow = 2}", "adaptive_batch.grow"),
        ("adaptive_batch = 3", "adaptive_batch"),
        ("adaptive_batch = {max_batch = 256}", "adaptive_batch.max_batch"),  # below 512
        ("adaptive_batch = true\nnoise_scale = false", "adaptive_batch"),
    ]:
        with pytest.raises(SpecError) as err:
            load_sweep(write(tmp_path, MINIMAL + line + "\n", "bad.toml"))
        assert err.value.field == key, line


PER_BATCH = """
task = "digits-mlp"
batch_sizes = [8, 32, 128, 512]
lr = [0.1]
budget = {samples = 8192, min_evals = 10}

[per_batch.8]
budget = {steps = 300}
eval_every = 7

[per_batch.128]
eval_every = 4

[per_batch.512]
budget = {samples = 32768}
"""


def test_per_batch_budgets_and_spacing_reach_the_runs(tmp_path):
    sweep = load_sweep(write(tmp_path, PER_BATCH))
    got = [(r.batch_size, r.budget_unit, r.budget, r.eval_every) for r in plan(sweep)]
    assert got == [
        (8, "steps", 300.0, 7),  # its own budget and spacing
        (32, "samples", 8192.0, 25),  # the sweep's: 8192 / 32 = 256 steps, // 10 evaluations
        (128, "samples", 8192.0, 4),  # the sweep's budget, its own spacing
        (512, "samples", 32768.0, 6),  # its own budget (64 steps), the sweep's rule
    ]
    saved = SweepSpec.from_dict(sweep.to_dict())
    assert saved.per_batch == sweep.per_batch and saved.min_evals == sweep.min_evals == 10
    assert [r.run_id for r in plan(saved)] == [r.run_id for r in plan(sweep)]


@pytest.mark.parametrize(
    ("unit", "budget", "batch_size", "min_evals", "every"),
    [("steps", 100, 64, 20, 5), ("steps", 99, 64, 20, 4), ("samples", 1000, 64, 20, 1)],
)
def test_min_evals_gives_at_least_that_many_evaluations(unit, budget, batch_size, min_evals, every):
    assert eval_spacing(unit, budget, batch_size, min_evals) == every
    steps = budget if unit == "steps" else math.ceil(budget / batch_size)
    assert steps // every >= min(min_evals, steps)


# The ids of the runs these files planned before [per_batch] existed: a store resumes by them.
STORED_IDS = {
    "examples/sweep_minimal.toml": (24, "438fd337b00a67d6", "1a0609950398e7c6"),
    "examples/sweep_rule.toml": (20, "395e45f4b8dab414", "2717f280dc7d641c"),
    "docs/report_sweep.toml": (98, "af696e306c5db7df", "5dfc242f789e9f25"),
}


@pytest.mark.parametrize("name", sorted(STORED_IDS))
def test_files_without_per_batch_keep_their_stored_run_ids(name):
    ids = [r.run_id for r in plan(load_sweep(ROOT / name))]
    digest = hashlib.sha256("".join(ids).encode()).hexdigest()[:16]
    assert (len(ids), ids[0], digest) == STORED_IDS[name]


def test_per_batch_in_python_is_validated_with_the_file_keys():
    base = {"study": "s", "task": "digits-mlp", "batch_sizes": (8, 16), "lr": (0.1,)}
    cases = [
        ((BatchBudget(4, "steps", 10),), "per_batch.4"),
        ((BatchBudget(8, "steps", 10), BatchBudget(8, eval_every=2)), "per_batch.8"),
        ((BatchBudget(8, "epochs", 1.0, min_evals=3),), "per_batch.8.budget.min_evals"),
    ]
    for per_batch, key in cases:
        with pytest.raises(SpecError) as err:
            SweepSpec(**base, per_batch=per_batch)
        assert err.value.field == key, per_batch
    with pytest.raises(SpecError) as err:
        BatchBudget(8, "steps")
    assert err.value.field == "per_batch.8.budget"
