"""The adaptive-batch controller against hand-computed decisions."""

from __future__ import annotations

import math

import pytest

from batchlab.core.adaptive import (
    AdaptiveSettings,
    AdaptiveState,
    decide,
    initial_state,
    lr_scale,
    micro_batches,
)
from batchlab.errors import FieldError


def run(settings: AdaptiveSettings, readings: list[float | None]) -> list[int]:
    """The batch in force after each reading."""
    state, out = initial_state(settings), []
    for value in readings:
        state = decide(settings, state, value).state
        out.append(state.batch_size)
    return out


def settings(**kw) -> AdaptiveSettings:
    """Linear rule from (64, 0.1), jumps of up to 2^10 per change unless ``kw`` says otherwise."""
    fields = {"base_batch": 64, "base_lr": 0.1, "rule": "linear", "max_doublings": 10}
    return AdaptiveSettings(**{**fields, **kw})


def test_grows_exactly_at_the_factor_after_patience_readings() -> None:
    s = settings(factor=2.0, patience=2)
    # 127.9 < 2 x 64: no evidence; 128 >= 128 twice: grow to 128 (the largest 64 x 2^k <= 128)
    assert run(s, [127.9, 127.9, 128.0]) == [64, 64, 64]
    assert run(s, [128.0, 128.0]) == [64, 128]
    # at 128 the threshold is 256
    assert run(s, [128.0, 128.0, 255.0, 255.0, 256.0, 256.0]) == [64, 128, 128, 128, 128, 256]


def test_one_doubling_per_change_by_default() -> None:
    s = AdaptiveSettings(base_batch=64, base_lr=0.1, patience=1)
    assert run(s, [5000.0, 5000.0, 5000.0]) == [128, 256, 512]
    assert run(settings(patience=1, max_doublings=2), [5000.0, 5000.0]) == [256, 1024]


def test_one_noisy_reading_does_not_flip_it() -> None:
    s = settings(patience=3)
    # a high reading between low ones restarts the streak each time
    assert run(s, [1000.0, 100.0, 1000.0, 1000.0, 50.0, 1000.0]) == [64] * 6
    # a missing or non-finite reading restarts it too
    assert run(s, [1000.0, 1000.0, None, 1000.0, math.inf, 1000.0, 1000.0]) == [64] * 7


def test_grows_by_powers_of_two_to_the_smallest_reading_of_the_streak() -> None:
    s = settings(patience=2)
    # min(5000, 600) = 600: 64 x 2^3 = 512 <= 600 < 1024
    assert run(s, [5000.0, 600.0]) == [64, 512]
    # factor 3: 200 >= 192 grows, by one doubling (64 x 2 = 128 <= 200 < 256)
    assert run(settings(factor=3.0, patience=1), [191.0, 200.0]) == [64, 128]


@pytest.mark.parametrize(
    ("bounds", "expected"),
    [
        ({"max_batch": 300}, 256),
        ({"n_train": 1000}, 512),
        ({"memory_batch": 128, "accumulate": False}, 128),
        ({"memory_batch": 128, "accumulate": True}, 4096),
        ({"max_batch": 100}, 64),
    ],
)
def test_bounds(bounds: dict, expected: int) -> None:
    s = settings(patience=1, **bounds)
    assert run(s, [5000.0])[-1] == expected
    if expected == 64:
        assert decide(s, initial_state(s), 5000.0).reason == "at the bound (100)"


def test_never_shrinks_unless_asked() -> None:
    s = settings(patience=1, base_batch=256)
    assert run(s, [10.0, 10.0]) == [256, 256]
    shrink = settings(patience=1, base_batch=256, shrink=True, min_batch=32)
    # 100 <= 256 / 2: the largest 256 / 2^k <= 100 is 64; then 10 asks for 8, the floor is 32
    assert run(shrink, [100.0, 10.0, 10.0]) == [64, 32, 32]
    # the default floor is the base batch
    assert run(settings(patience=1, shrink=True), [1.0]) == [64]


def test_use_low_compares_the_lower_end() -> None:
    s = settings(patience=1, use_low=True)
    st = initial_state(s)
    assert decide(s, st, 1000.0, low=100.0, high=2000.0).state.batch_size == 64
    assert decide(s, st, 1000.0, low=300.0, high=2000.0).state.batch_size == 256


def test_linear_rule_doubles_the_lr_per_doubling() -> None:
    s = settings(patience=1)
    st = decide(s, initial_state(s), 130.0).state
    assert st.batch_size == 128 and st.lr_scale == pytest.approx(2.0)
    st = decide(s, st, 1100.0).state
    assert st.batch_size == 1024 and st.lr_scale == pytest.approx(16.0)


def test_seesaw_rule_multiplies_by_one_over_sqrt2_per_doubling() -> None:
    s = settings(patience=1, rule="seesaw", optimizer="adam")
    for doublings in range(1, 6):
        b = 64 * 2**doublings
        assert lr_scale(s, b, 1e6) == pytest.approx(2 ** (-doublings / 2), rel=1e-12)
    st = decide(s, initial_state(s), 300.0).state  # 64 -> 256: two doublings
    assert st.lr_scale == pytest.approx(0.5)


def test_critical_rule_is_the_adascale_gain_of_the_reading() -> None:
    s = settings(patience=1, rule="critical")
    # B_noise = 600, 64 -> 512: (1 + 600/64) / (1 + 600/512)
    st = decide(s, initial_state(s), 600.0).state
    assert st.lr_scale == pytest.approx((1 + 600 / 64) / (1 + 600 / 512))


def test_auto_rule_follows_the_optimizer() -> None:
    assert settings(rule="auto").resolved_rule == "critical"
    assert settings(rule="auto", optimizer="adamw").resolved_rule == "seesaw"
    assert lr_scale(settings(rule="constant"), 1024, 5000.0) == 1.0


def test_state_round_trips() -> None:
    s = settings(patience=3)
    st = decide(s, decide(s, initial_state(s), 500.0).state, 400.0).state
    assert st.pending == (500.0, 400.0)
    assert AdaptiveState.from_dict(st.to_dict()) == st


def test_micro_batches() -> None:
    assert micro_batches(1024, 256) == (256, 4)
    assert micro_batches(96, 40) == (32, 3)
    assert micro_batches(64, 64) == (64, 1)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"factor": 1.0}, "factor"),
        ({"patience": 0}, "patience"),
        ({"rule": "cubic"}, "rule"),
        ({"optimizer": "lion"}, "optimizer"),
        ({"max_batch": 32}, "max_batch"),
        ({"min_batch": 128}, "min_batch"),
        ({"shrink": "yes"}, "shrink"),
    ],
)
def test_bad_settings_name_their_field(kw: dict, field: str) -> None:
    with pytest.raises(FieldError) as err:
        settings(**kw)
    assert err.value.field == field
