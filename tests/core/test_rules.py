"""Scaling rules: the papers' worked examples, properties (hypothesis) and bad input."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchlab.core import rules as r

batches = st.integers(1, 1 << 16)
lrs = st.floats(1e-6, 10.0)
betas = st.floats(0.5, 0.9999)
noise = st.floats(1.0, 1e6)


def close(a: float, b: float, rel: float = 1e-12) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


# ------------------------------------------------------------------------------------------------
# Worked examples from the papers


def test_goyal_imagenet_256_to_8192():
    """Goyal et al. 2017: lr 0.1 at 256 -> 3.2 at 8k, 5 warmup epochs starting from 0.1."""
    res = r.apply_rule("linear", base_batch=256, base_lr=0.1, batch_size=8192)
    assert close(res.lr, 3.2)
    assert res.warmup_epochs == 5.0
    assert close(res.lr * res.warmup_start_factor, 0.1)
    assert r.auto(256, 0.1, 8192).lr == res.lr


def test_smith_noise_temperature():
    """Smith et al. 2018: lr 0.1, N 50000, B 128, m 0.9 -> g = 390.6."""
    assert round(r.noise_temperature(0.1, 50_000, 128, 0.9), 1) == 390.6
    assert close(r.noise_temperature(0.1, 50_000, 128, 0.9), 0.1 * 50_000 / (128 * 0.1))


def test_malladi_k4():
    """Malladi et al. 2022 with k = 4: lr x 2, beta1 0.9 -> 0.6, beta2 0.999 -> 0.996, eps / 2."""
    res = r.apply_rule(
        "adam_sqrt", base_batch=64, base_lr=3e-4, batch_size=256, optimizer="adam", eps=1e-8
    )
    assert close(res.lr, 6e-4)
    assert close(res.beta1, 0.6, 1e-9)
    assert close(res.beta2, 0.996, 1e-9)
    assert close(res.eps, 0.5e-8)


@pytest.mark.parametrize("ratio", [0.25, 4.0])
def test_surge_at_quarter_and_four_times_noise_scale(ratio):
    """Li et al. 2024: lr / lr_max = 1 / (0.5 (2 + 1/2)) = 0.8 at B / B_noise = 1/4 and 4."""
    res = r.surge(1000, 1e-3, int(1000 * ratio), noise_scale=1000.0)
    assert close(res.lr / res.lr_max, 0.8)


def test_critical_ratio_is_adascale_gain():
    """McCandlish lr(B1)/lr(B0) = AdaScale gain; written out for B_noise = B0 = 100, B1 = 400."""
    res = r.critical(100, 0.1, 400, noise_scale=100.0)
    assert close(res.lr_ratio, (1 + 100 / 100) / (1 + 100 / 400))
    assert close(res.lr_ratio, r.adascale_gain(100, 400, 100.0))


# ------------------------------------------------------------------------------------------------
# Properties


def _rule(name: str, b0: int, lr0: float, b1: int, bn: float = 1000.0, beta: float = 0.9):
    opts = {"noise_scale": bn} if name in ("critical", "surge") else {}
    if name == "adam_sqrt":
        opts = {"beta1": beta, "beta2": beta}
    return r.apply_rule(name, base_batch=b0, base_lr=lr0, batch_size=b1, **opts)


@pytest.mark.parametrize("name", ["linear", "sqrt", "adam_sqrt", "critical", "surge"])
@given(b0=batches, lr0=lrs, bn=noise, beta=betas)
def test_identity_at_k1(name, b0, lr0, bn, beta):
    res = _rule(name, b0, lr0, b0, bn, beta)
    assert res.lr == lr0
    assert res.warmup_epochs == 0.0
    if name == "adam_sqrt":
        assert close(res.beta1, beta) and close(res.beta2, beta) and res.eps == 1e-8


@pytest.mark.parametrize("name", ["linear", "sqrt", "adam_sqrt", "critical"])
@given(b0=batches, lr0=lrs, b1=batches, b2=batches, bn=noise)
def test_lr_grows_with_batch(name, b0, lr0, b1, b2, bn):
    lo, hi = sorted((b1, b2))
    if name == "adam_sqrt":  # keep k (1 - beta) <= 1
        lo, hi = min(lo, b0), min(hi, b0)
    assert _rule(name, b0, lr0, lo, bn, beta=0.0).lr <= _rule(name, b0, lr0, hi, bn, 0.0).lr * (
        1 + 1e-12
    )


@given(b0=batches, k1=st.floats(0.1, 1.0), k2=st.floats(0.1, 1.0), beta=st.floats(0.0, 0.999))
def test_adam_sqrt_betas_fall_with_batch(b0, k1, k2, beta):
    lo, hi = sorted((max(1, round(b0 * k1)), max(1, round(b0 * k2))))
    small, large = (
        _rule("adam_sqrt", b0, 1e-3, lo, beta=beta),
        _rule("adam_sqrt", b0, 1e-3, hi, beta=beta),
    )
    assert large.beta1 <= small.beta1 + 1e-12 and large.eps <= small.eps


@pytest.mark.parametrize("name", ["linear", "sqrt", "adam_sqrt"])
@given(b0=st.integers(1, 4096), lr0=lrs, k1=st.integers(1, 8), k2=st.integers(1, 8))
def test_rules_compose(name, b0, lr0, k1, k2):
    """B0 -> B1 -> B2 equals B0 -> B2 (betas 0.99 keep k (1 - beta) <= 1 up to k = 64)."""
    b1, b2 = b0 * k1, b0 * k1 * k2
    step1 = _rule(name, b0, lr0, b1, beta=0.99)
    kw = {"beta1": step1.beta1, "beta2": step1.beta2, "eps": step1.eps} if step1.beta1 else {}
    step2 = r.apply_rule(name, base_batch=b1, base_lr=step1.lr, batch_size=b2, **kw)
    direct = _rule(name, b0, lr0, b2, beta=0.99)
    assert close(step2.lr, direct.lr, 1e-9)
    if name == "adam_sqrt":
        assert close(step2.beta1, direct.beta1, 1e-9) and close(step2.eps, direct.eps, 1e-9)


@given(b0=batches, lr0=lrs, b1=batches, bn=noise)
def test_critical_never_exceeds_lr_max(b0, lr0, b1, bn):
    res = r.critical(b0, lr0, b1, noise_scale=bn)
    assert res.lr < res.lr_max
    assert close(res.lr_max, lr0 * (1 + bn / b0))
    assert close(res.lr_ratio, r.adascale_gain(b0, b1, bn), 1e-9)


@given(b0=batches, lr0=lrs, b1=batches, bn=st.integers(1, 1 << 16))
def test_surge_peaks_at_noise_scale(b0, lr0, b1, bn):
    at_peak = r.surge(b0, lr0, bn, noise_scale=float(bn))
    other = r.surge(b0, lr0, b1, noise_scale=float(bn))
    assert close(at_peak.lr, at_peak.lr_max, 1e-12)
    assert other.lr <= at_peak.lr * (1 + 1e-12)
    # rises before the peak, falls after it
    nearer = r.surge(b0, lr0, round(math.sqrt(b1 * bn)) or 1, noise_scale=float(bn))
    assert nearer.lr >= other.lr * (1 - 1e-9)


@given(lr=lrs, n=st.integers(1, 10**7), b0=batches, m0=st.floats(0.0, 0.99), b1=batches)
def test_momentum_for_temperature_inverts_g(lr, n, b0, m0, b1):
    """At the same lr, B1 needs 1 - m1 = (B0 / B1)(1 - m0): impossible when that exceeds 1."""
    g = r.noise_temperature(lr, n, b0, m0)
    if b0 * (1 - m0) > b1 * (1 + 1e-9):
        with pytest.raises(ValueError, match=r"^momentum: "):
            r.momentum_for_temperature(g, lr, n, b1)
    elif b0 * (1 - m0) < b1 * (1 - 1e-9):
        m1 = r.momentum_for_temperature(g, lr, n, b1)
        assert close(1 - m1, b0 * (1 - m0) / b1, 1e-6)
        assert close(r.noise_temperature(lr, n, b1, m1), g, 1e-6)


@given(b0=batches, lr0=lrs, b1=batches, n=st.integers(1, 10**7), m=st.floats(0.0, 0.99))
def test_linear_rule_keeps_noise_temperature(b0, lr0, b1, n, m):
    res = r.linear(b0, lr0, b1)
    assert close(r.noise_temperature(res.lr, n, b1, m), r.noise_temperature(lr0, n, b0, m), 1e-9)


@given(b0=batches, b1=batches, bn=noise, s_min=st.floats(1.0, 1e6))
def test_steps_and_samples_ratios_follow_mccandlish_tradeoff(b0, b1, bn, s_min):
    """With S(B0) = S_min (1 + B_noise/B0): (S/S_min - 1)(E/E_min - 1) = 1 at B1, E_min = S_min B_noise."""
    s0 = s_min * (1 + bn / b0)
    s1 = s0 * r.steps_ratio(b0, b1, bn)
    e1 = s0 * b0 * r.samples_ratio(b0, b1, bn)
    assert close(e1, s1 * b1, 1e-9)
    assert math.isclose((s1 / s_min - 1) * (e1 / (s_min * bn) - 1), 1.0, rel_tol=1e-6)


# ------------------------------------------------------------------------------------------------
# auto, warnings, warmup


@pytest.mark.parametrize(
    ("optimizer", "noise_scale", "expected"),
    [
        ("sgd", None, "linear"),
        ("sgd", 500.0, "critical"),
        ("adam", None, "adam_sqrt"),
        ("adamw", 500.0, "surge"),
    ],
)
def test_auto_picks_by_optimizer_and_noise_scale(optimizer, noise_scale, expected):
    res = r.auto(128, 1e-3, 512, optimizer=optimizer, noise_scale=noise_scale)
    assert res.rule == expected
    assert res.reason.startswith(f"auto: {optimizer}") and expected in res.reason
    direct = _rule(expected, 128, 1e-3, 512, bn=noise_scale or 1.0)
    assert res.lr == direct.lr


def test_auto_adam_beyond_adam_sqrt_range_keeps_betas():
    res = r.auto(256, 1e-3, 8192, optimizer="adam", beta1=0.9, beta2=0.98)
    assert res.rule == "sqrt" and close(res.lr, 1e-3 * math.sqrt(32))
    assert (res.beta1, res.beta2, res.eps) == (0.9, 0.98, 1e-8)
    assert "adam_sqrt does not apply" in res.warnings[0]


def test_rule_that_does_not_fit_the_optimizer_warns():
    assert "derived for SGD" in _warning("linear", "adam")
    assert "derived for Adam" in _warning("adam_sqrt", "sgd")
    assert "Table 2a" in _warning("sqrt", "sgd")
    assert r.apply_rule("linear", base_batch=64, base_lr=0.1, batch_size=256).warnings == ()


def _warning(rule: str, optimizer: str) -> str:
    res = r.apply_rule(rule, base_batch=64, base_lr=0.1, batch_size=256, optimizer=optimizer)
    return " ".join(res.warnings)


def test_legw_stretches_warmup_by_k():
    res = r.sqrt(128, 0.1, 1024, warmup_epochs=0.5, legw=True)
    assert res.warmup_epochs == 4.0 and res.warmup_source == r.SOURCES["legw"]
    assert r.linear(1024, 0.8, 128).warmup_epochs == 0.0  # smaller lr: no warmup


def test_advise_imagenet_counts_steps_like_the_engine():
    n, epochs = 1_281_167, 90
    advice = r.advise(256, 0.1, 8192, n_train=n, epochs=epochs, momentum=0.9)
    steps = samples = 0
    while samples < epochs * n:  # the engine's loop: whole batches until the budget is covered
        samples += 8192
        steps += 1
    assert advice.total_steps == steps
    assert advice.warmup_steps == math.ceil(5 * n / 8192)
    assert close(advice.noise_temperature, advice.base_noise_temperature)
    assert advice.momentum_for_same_temperature == pytest.approx(0.9)
    assert advice.warnings == ()


def test_advise_warnings():
    def warns(b1: int, **kw) -> str:
        return " ".join(r.advise(100, 0.1, b1, n_train=10_000, epochs=10, **kw).warnings)

    assert "critical batch size" in warns(800, noise_scale=400.0)
    assert "critical batch size" not in warns(400, noise_scale=400.0)
    assert "N/10" in warns(1001) and "N/10" not in warns(1000)
    assert "larger than the training set" in warns(10_001)
    assert "broke down" in r.advise(256, 0.1, 16384, n_train=10**7, epochs=90).warnings[0]
    assert "takes 100% of the 10-epoch run" in warns(800, warmup_epochs=10)
    assert "warmup" not in warns(800, warmup_epochs=2.5)


def test_advise_noise_ratios_and_adam_fields():
    advice = r.advise(
        64, 1e-3, 256, n_train=50_000, epochs=10, optimizer="adam", noise_scale=256.0
    ).to_dict()
    assert advice["rule"] == "surge"
    assert close(advice["steps_ratio"], (1 + 256 / 256) / (1 + 256 / 64))
    assert close(advice["samples_ratio"], advice["steps_ratio"] * 4)
    assert close(advice["efficiency"], 1 / advice["samples_ratio"])
    assert (advice["beta1"], advice["base_beta1"]) == (0.9, 0.9)
    assert "noise_temperature" not in advice


# ------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"base_batch": 0}, "base_batch"),
        ({"batch_size": -4}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"base_lr": 0.0}, "base_lr"),
        ({"base_lr": math.nan}, "base_lr"),
        ({"rule": "cubic"}, "rule"),
        ({"rule": "critical"}, "noise_scale"),
        ({"rule": "critical", "noise_scale": 0.0}, "noise_scale"),
        ({"optimizer": "lamb"}, "optimizer"),
        ({"rule": "linear", "beta1": 0.9}, "beta1"),
        ({"rule": "adam_sqrt", "batch_size": 64 * 11}, "batch_size"),
        ({"rule": "adam_sqrt", "beta2": 1.0}, "beta2"),
        ({"warmup_epochs": -1.0}, "warmup_epochs"),
    ],
)
def test_bad_input_names_the_field(kwargs, field):
    args = {"rule": "auto", "base_batch": 64, "base_lr": 0.1, "batch_size": 128, **kwargs}
    with pytest.raises(ValueError, match=rf"^{field}: "):
        r.apply_rule(args.pop("rule"), **args)


@pytest.mark.parametrize("momentum", [-0.1, 1.0, 1.5])
def test_bad_momentum(momentum):
    with pytest.raises(ValueError, match=r"^momentum: must be a number in \[0, 1\)"):
        r.noise_temperature(0.1, 100, 10, momentum)
    with pytest.raises(ValueError, match=r"^momentum: "):
        r.advise(64, 0.1, 128, n_train=1000, epochs=1, momentum=momentum)


# ------------------------------------------------------------------------------------------------
# The newer rules (Marek et al. 2025, Meterez et al. 2025, Wang & Aitchison 2024, DeepSeek 2024)


@given(st.integers(1, 4096), st.integers(1, 4096), betas)
def test_marek_beta2_keeps_the_half_life_in_examples(b0, b1, beta2):
    """Marek et al. 2025 hold the half-life of beta2 fixed in tokens: beta2' = beta2 ** (B'/B)."""
    new = r.scale_beta2(b0, b1, beta2)
    assert close(new, beta2 ** (b1 / b0))
    if 0.0 < new < 1.0:  # beyond float range (0 or 1) the half-life is undefined
        assert math.isclose(r.beta2_half_life(new, b1), r.beta2_half_life(beta2, b0), rel_tol=1e-6)


def test_marek_small_batch_beta2():
    """The GPT-style beta2 = 0.95 at 512 sequences becomes ~0.9999 at batch size 1 (the paper's
    batch-1 regime), and beta2 = 0.999 at B is 0.999**2 at 2B."""
    assert round(r.scale_beta2(512, 1, 0.95), 4) == 0.9999
    assert close(r.scale_beta2(64, 128, 0.999), 0.998001)
    with pytest.raises(ValueError, match="beta2"):
        r.scale_beta2(64, 128, 1.0)


def test_seesaw_each_doubling_multiplies_lr_by_inverse_sqrt2():
    """Meterez et al. 2025: where a scheduler would halve the lr, Seesaw doubles B and multiplies
    the lr by 1/sqrt(2)."""
    for k in range(6):
        assert close(r.seesaw_lr(256, 1e-3, 256 * 2**k), 1e-3 / math.sqrt(2) ** k)


def test_seesaw_schedule_keeps_lr_over_sqrt_batch_on_the_step_decay():
    """The batch-ramp form: halving at each milestone becomes B x2 and lr x 1/sqrt(2), so lr /
    sqrt(B / B0) equals the original step decay in every phase (the paper's NSGD equivalence)."""
    from batchlab.core.schedules import increase_batch

    plan = increase_batch(
        1e-3, 256, [10, 20, 30], 0.5, epochs=40, n_train=100_000, optimizer="adam"
    )
    assert plan.batch_schedule == ((10.0, 512), (20.0, 1024), (30.0, 2048))
    assert plan.source == r.SOURCES["seesaw"]
    for phase, epoch in enumerate((5, 15, 25, 35)):
        lr = plan.lr_at(epoch * 100_000 / 256)
        b = plan.batch_size_at(epoch)
        assert close(lr, 1e-3 * 2 ** (-phase / 2), rel=1e-9)
        assert close(lr / math.sqrt(b / 256), 1e-3 * 0.5**phase, rel=1e-9)
    sgd = increase_batch(1e-3, 256, [10], 0.5, epochs=40, n_train=100_000)
    assert sgd.schedule == "constant"  # Smith et al.: SGD keeps the lr, only the batch grows


def test_wang_aitchison_timescale_and_its_scaling_consequences():
    """tau_iter = 1 / (lr lambda); tau_epoch = tau_iter B / N. Held fixed (the paper's finding):
    at fixed lr a k-times larger data set needs lambda / k; under muP (lr ~ 1/width) a k-times
    wider model needs lambda x k."""
    # Llama-style AdamW: lr 3e-4, lambda 0.1 -> tau_iter = 33,333 iterations.
    n, b = 10**12, 4 * 10**6  # 1T tokens in 4M-token batches: 250k iterations per epoch
    tau = r.adamw_timescale_epochs(3e-4, 0.1, b, n)
    assert close(tau * n / b, 1 / (3e-4 * 0.1), rel=1e-9)
    base = dict(base_lr=1e-3, base_batch=128, base_n_train=50_000)
    more_data = r.scale_weight_decay(0.1, lr=1e-3, batch_size=128, n_train=200_000, **base)
    assert close(more_data, 0.1 / 4, rel=1e-12)
    wider = r.scale_weight_decay(0.1, lr=1e-3 / 4, batch_size=128, n_train=50_000, **base)
    assert close(wider, 0.1 * 4, rel=1e-12)
    assert close(
        r.adamw_weight_decay(1e-3, 128, 50_000, r.adamw_timescale_epochs(1e-3, 0.1, 128, 50_000)),
        0.1,
    )


@pytest.mark.parametrize(
    ("model", "batch_sequences", "lr"),
    [("7B", 2304, 4.2e-4), ("67B", 4608, 3.2e-4)],
)
def test_deepseek_power_laws_reproduce_their_models(model, batch_sequences, lr):
    """DeepSeek LLM Table 2: the 7B (batch 2304 x 4096 tokens, lr 4.2e-4) and 67B (4608 x 4096,
    3.2e-4) runs sit on Eq. 1: the budget whose lr_opt is their lr has B_opt their batch (3%)."""
    a, alpha = r.DEEPSEEK_LR
    compute = (lr / a) ** (1 / alpha)
    opt = r.deepseek_compute_optimal(compute)
    assert close(opt.lr, lr, rel=1e-9)
    assert abs(opt.batch_sequences(4096) / batch_sequences - 1) < 0.03, model
    assert "fitted to DeepSeek's setting" in opt.note
    assert r.DEEPSEEK_BATCH == (0.2920, 0.3271) and r.DEEPSEEK_LR == (0.3118, -0.1250)


def test_advise_without_n_train_gives_the_lr_and_sets_adam_beta2():
    a = r.advise(64, 1e-3, 256, optimizer="adam", rule="surge", noise_scale=512.0)
    assert a.total_steps is None and a.warmup_steps is None and a.n_train is None
    assert close(a.result.beta2, 0.999**4)
    assert a.beta2_source == r.SOURCES["beta2_half_life"]
    sqrt_rule = r.advise(64, 1e-3, 256, optimizer="adam")  # adam_sqrt sets its own beta2
    assert close(sqrt_rule.result.beta2, 1 - 4 * 0.001)
    d = r.advise(64, 0.1, 256).to_dict()
    assert d["total_steps"] is None and "noise_temperature" not in d


def test_auto_says_why_it_chose_its_rule():
    for optimizer, bn, name, why in (
        ("sgd", None, "linear", "without a noise scale"),
        ("sgd", 500.0, "critical", "saturates"),
        ("adam", 500.0, "surge", "peaks at B = B_noise"),
        ("adam", None, "adam_sqrt", "SDE"),
    ):
        res = r.auto(64, 0.01, 256, optimizer=optimizer, noise_scale=bn)
        assert res.rule == name and why in res.reason
