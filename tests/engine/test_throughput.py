"""Throughput measurement: medians per batch size, the CPU limit, accumulation beyond it."""

from __future__ import annotations

import pytest

from batchlab.core.plan import ThroughputTable
from batchlab.engine.spec import SpecError
from batchlab.engine.tasks import get_task
from batchlab.engine.throughput import measure_throughput


@pytest.fixture(scope="module")
def task():
    return get_task("digits-mlp")


def test_table_has_one_positive_median_per_batch_size(task):
    table = measure_throughput(task, [64, 8, 32], device="cpu", repeats=3, warmup=1)
    assert table.batch_sizes == (8, 32, 64)
    assert all(s > 0 for s in table.seconds) and len(table.spread) == 3
    assert table.max_batch == task.n_train and table.max_batch_source.startswith("cpu")
    assert table.peak_memory == (None, None, None)
    assert ThroughputTable.from_dict(table.to_dict()) == table
    fit = table.step_time()
    assert fit.overhead_s >= 0 and fit.per_example_s >= 0


def test_batch_beyond_the_limit_is_timed_as_accumulation(task):
    table = measure_throughput(task, [16, 64], device="cpu", repeats=3, warmup=1, max_batch=16)
    assert table.max_batch == 16 and table.max_batch_source == "given"
    assert table.step_time().accumulation(64) == 4


def test_measurement_leaves_the_weights_alone_for_the_caller(task):
    before = [p.detach().clone() for p in task.make_model(0).parameters()]
    measure_throughput(task, [8], device="cpu", repeats=1, warmup=0)
    after = list(task.make_model(0).parameters())
    assert all((a == b).all() for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"repeats": 0}, "repeats"), ({"warmup": -1}, "warmup"), ({"max_batch": 0}, "max_batch")],
)
def test_bad_settings_name_their_field(task, kwargs, field):
    with pytest.raises(SpecError) as err:
        measure_throughput(task, [8], device="cpu", **kwargs)
    assert err.value.field == field
