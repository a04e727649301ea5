"""``fortunes-gpt``: the fortunes text split by fortune, fixed-length windows, the causal transformer,
its loss at initialisation, training, the per_example noise mode on it, and missing files.

Most tests read a small synthetic cookie directory (they run without Debian's ``fortunes``); those
on the real text are skipped, saying how to install it, when it is missing."""

from __future__ import annotations

import json
import math
import random
import warnings

import pytest
import torch
from torch.func import functional_call, grad, vmap
from typer.testing import CliRunner

from batchlab.cli import app
from batchlab.engine.monitor import GradientNoiseScale, per_example_grad_norms
from batchlab.engine.spec import RunSpec, SpecError
from batchlab.engine.tasks import FORTUNES_DIR_ENV, get_task, list_tasks, token_cross_entropy
from batchlab.engine.tasks.text import (
    SEPARATOR,
    SOLO_REASON,
    VOCAB_SIZE,
    CharTransformer,
    cookie_files,
    decode,
    encode,
    fortunes_dir,
    is_validation,
    read_fortunes,
    token_streams,
)
from batchlab.engine.train import can_vectorize, train, train_ensemble

needs_fortunes = pytest.mark.skipif(
    not cookie_files(fortunes_dir()),
    reason=f"no fortune cookie files in {fortunes_dir()} (install them: apt-get install fortunes)",
)

WORDS = [
    "the",
    "a",
    "cat",
    "sat",
    "on",
    "mat",
    "dog",
    "ran",
    "far",
    "away",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
]


@pytest.fixture(scope="module")
def cookies(tmp_path_factory):
    """Two cookie files of 300 made-up fortunes (with .dat indexes), a .u8 link and a stray file."""
    directory = tmp_path_factory.mktemp("fortunes")
    rng = random.Random(0)
    for name in ("alpha", "beta"):
        fortunes = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))).capitalize() + "."
            for _ in range(150)
        ]
        text = "\n%\n".join(fortunes) + "\n%\n"
        (directory / name).write_text(text.replace("cat", "c\bcat"))  # an overstrike
        (directory / f"{name}.dat").write_bytes(b"index")
        (directory / f"{name}.u8").symlink_to(directory / name)
    (directory / "README").write_text("not a cookie file\n")
    return directory


def _fortunes_of(stream: torch.Tensor) -> list[str]:
    text = decode(stream)
    assert text.endswith(SEPARATOR.decode())
    return text.split(SEPARATOR.decode())[:-1]


def test_cookie_files_are_the_indexed_ones_and_overstrikes_go(cookies):
    assert [p.name for p in cookie_files(cookies)] == ["alpha", "beta"]
    fortunes = read_fortunes(cookies)
    assert len(fortunes) == 300 and not any(b"\b" in f for f in fortunes)
    assert sum(b"cat" in f for f in fortunes) > 0


def test_split_is_by_fortune_deterministic_disjoint_and_complete(cookies):
    train_stream, val_stream = token_streams(cookies)
    train_side, val_side = _fortunes_of(train_stream), _fortunes_of(val_stream)
    everything = [f.decode() for f in read_fortunes(cookies)]
    assert sorted(train_side + val_side) == sorted(everything)
    assert not set(train_side) & set(val_side)
    assert all(is_validation(f.encode()) for f in val_side)
    assert 10 <= len(val_side) <= 60  # about one in ten of 300
    a, b = (
        get_task("fortunes-gpt", data_dir=str(cookies)),
        get_task("fortunes-gpt", data_dir=str(cookies), n_train=10**6, n_val=10**6),
    )
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.x_val, b.x_val)  # all windows


def test_windows_are_fixed_length_and_targets_are_the_next_character(cookies):
    task = get_task("fortunes-gpt", data_dir=str(cookies), seq_len=16)
    train_stream = token_streams(cookies)[0]
    assert task.x_train.shape == (len(train_stream) // 16 - (len(train_stream) % 16 == 0), 16)
    assert task.x_train.dtype == task.y_train.dtype == torch.int64
    assert torch.equal(task.x_train.flatten(), train_stream[: task.x_train.numel()])
    assert torch.equal(task.y_train.flatten(), train_stream[1 : task.x_train.numel() + 1])
    assert task.tokens_per_example == 16 and task.input_shape == (16,)
    assert int(task.x_train.max()) < VOCAB_SIZE


def test_subsets_are_seeded(cookies):
    a = get_task("fortunes-gpt", data_dir=str(cookies), n_train=20, n_val=5)
    b = get_task("fortunes-gpt", data_dir=str(cookies), n_train=20, n_val=5)
    c = get_task("fortunes-gpt", data_dir=str(cookies), n_train=20, n_val=5, data_seed=1)
    assert (a.n_train, a.n_val) == (20, 5)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.x_val, b.x_val)
    assert not torch.equal(a.x_train, c.x_train)


def test_encode_maps_unknown_bytes_to_one_token():
    tokens = encode("é\tA~".encode())
    assert tokens.tolist()[:2] == [VOCAB_SIZE - 1, VOCAB_SIZE - 1]  # both UTF-8 bytes of é
    assert decode(tokens[2:]) == "\tA~"


def test_model_is_causal():
    model = CharTransformer(seq_len=12, width=16, layers=2, heads=2)
    x = torch.randint(0, VOCAB_SIZE, (3, 12), generator=torch.Generator().manual_seed(0))
    changed = x.clone()
    changed[:, 7] = (changed[:, 7] + 1) % VOCAB_SIZE
    before, after = model(x), model(changed)
    torch.testing.assert_close(before[:, :7], after[:, :7], rtol=0, atol=1e-6)
    assert (before[:, 7:] - after[:, 7:]).abs().amax(dim=-1).min() > 1e-4  # every later position


def test_loss_at_init_is_about_ln_vocab(cookies):
    task = get_task("fortunes-gpt", data_dir=str(cookies))
    with torch.no_grad():
        loss = task.loss_fn(task.make_model(0)(task.x_val), task.y_val).item()
    assert abs(loss - math.log(VOCAB_SIZE)) < 0.05


def test_option_errors_name_the_option(cookies):
    with pytest.raises(SpecError) as info:
        get_task("fortunes-gpt", data_dir=str(cookies), width=30, heads=4)
    assert info.value.field == "task_options.heads" and "must divide width 30" in str(info.value)
    with pytest.raises(SpecError) as info:
        get_task("fortunes-gpt", data_dir=str(cookies), seq_len=1)
    assert info.value.field == "task_options.seq_len"


def test_missing_files_are_one_error_saying_how_to_install(tmp_path, monkeypatch):
    with pytest.raises(SpecError) as info:
        get_task("fortunes-gpt", data_dir=str(tmp_path))
    assert info.value.field == "task_options.data_dir"
    assert str(tmp_path) in str(info.value) and "apt-get install fortunes" in str(info.value)
    monkeypatch.setenv(FORTUNES_DIR_ENV, str(tmp_path / "nowhere"))
    listed = {info.name: info for info in list_tasks()}["fortunes-gpt"]
    assert listed.n_train is None and "apt-get install fortunes" in listed.error


def test_per_example_norms_equal_vmap_grad_and_the_monitor_keeps_per_example():
    model = CharTransformer(seq_len=8, width=16, layers=2, heads=2).double()
    x = torch.randint(0, VOCAB_SIZE, (5, 9), generator=torch.Generator().manual_seed(1))
    inputs, targets = x[:, :-1], x[:, 1:]
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, yi):
        return token_cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    with warnings.catch_warnings():  # vmap has no batching rule for attention: slow, not wrong
        warnings.simplefilter("ignore", UserWarning)
        grads = vmap(grad(one), in_dims=(None, 0, 0))(params, inputs, targets)
    truth = torch.cat([g.flatten(1) for g in grads.values()], 1).norm(dim=1)
    got = per_example_grad_norms(model, token_cross_entropy, inputs, targets)
    torch.testing.assert_close(got, truth, rtol=1e-6, atol=0)
    monitor = GradientNoiseScale(model, "per_example", loss_fn=token_cross_entropy)
    for _ in range(3):
        model.zero_grad()
        monitor.forward_backward(inputs, targets)
    assert (monitor.mode, monitor.fallback, monitor.count) == ("per_example", None, 3)


def test_ensembles_fall_back_to_solo_runs_with_the_reason(cookies):
    task = get_task("fortunes-gpt", data_dir=str(cookies), n_train=64, n_val=8, seq_len=16)
    assert can_vectorize(task) == (False, SOLO_REASON)
    options = (("data_dir", str(cookies)), ("n_train", 64), ("n_val", 8), ("seq_len", 16))
    specs = [
        RunSpec(
            task="fortunes-gpt",
            task_options=options,
            batch_size=8,
            lr=lr,
            optimizer="adam",
            budget_unit="steps",
            budget=3,
        )
        for lr in (1e-3, 3e-3)
    ]
    together = train_ensemble(specs, task=task)
    for spec, result in zip(specs, together, strict=True):
        alone = train(spec, task=task)
        assert result.status == "ok" and result.extra["ensemble_size"] == 1
        assert result.final == alone.final and result.extra["tokens_per_example"] == 16


@needs_fortunes
def test_real_fortunes_split_by_fortune_and_a_few_steps_lower_the_validation_loss():
    train_stream, val_stream = token_streams(fortunes_dir().resolve())
    assert not set(_fortunes_of(train_stream)) & set(_fortunes_of(val_stream))
    assert 0.07 < len(val_stream) / (len(train_stream) + len(val_stream)) < 0.13
    spec = RunSpec(
        task="fortunes-gpt",
        task_options=(("n_train", 512), ("n_val", 32)),
        batch_size=16,
        lr=3e-3,
        optimizer="adam",
        budget_unit="steps",
        budget=40,
        eval_every=40,
    )
    result = train(spec)
    start, end = result.history[0]["val_loss"], result.history[-1]["val_loss"]
    assert abs(start - math.log(VOCAB_SIZE)) < 0.05 and end < start - 1.0


@needs_fortunes
def test_cli_tasks_and_noise_show_sequences_and_tokens():
    runner = CliRunner()
    listed = runner.invoke(app, ["tasks", "fortunes-gpt", "--json"])
    assert listed.exit_code == 0, listed.output
    info = json.loads(listed.stdout)["tasks"][0]
    assert info["input_shape"] == [64] and info["n_train"] == 8192 and info["error"] is None
    args = ["noise", "--task", "fortunes-gpt", "-b", "8", "--lr", "0", "--steps", "4"]
    args += [
        "--task-option",
        "n_train=64",
        "--task-option",
        "n_val=8",
        "--task-option",
        "seq_len=16",
    ]
    measured = runner.invoke(app, [*args, "--json"])
    assert measured.exit_code == 0, measured.output
    out = json.loads(measured.stdout)
    assert out["tokens_per_example"] == 16 and out["mode"] == "per_example"
    text = runner.invoke(app, args)
    assert text.exit_code == 0 and "B=8 sequences = 128 tokens" in " ".join(text.stdout.split())
