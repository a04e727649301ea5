"""Built-in tasks, options, user tasks and their errors, and the model contract the engine relies on."""

from __future__ import annotations

import copy
import gzip
import pickle
import random
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

import batchlab
from batchlab.engine.ghost_bn import GhostBatchNorm
from batchlab.engine.spec import RunSpec, SpecError
from batchlab.engine.tasks import (
    DEFAULT_FASHION_DIR,
    FASHION_DIR_ENV,
    FASHION_FILES,
    Task,
    accuracy,
    builtin_tasks,
    cross_entropy,
    get_task,
    list_tasks,
    read_idx,
    stored_task,
)
from batchlab.engine.tasks.text import cookie_files, fortunes_dir

REAL_FASHION = Path(DEFAULT_FASHION_DIR)
needs_real_fashion = pytest.mark.skipif(
    not all((REAL_FASHION / f"{name}.gz").exists() for name in FASHION_FILES),
    reason=f"Fashion-MNIST not installed in {DEFAULT_FASHION_DIR} (apt-get install dataset-fashion-mnist)",
)


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    blob = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(blob))
    else:
        path.write_bytes(blob)


@pytest.fixture(scope="module")
def tiny_fashion(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """A small Fashion-MNIST look-alike in IDX format: 40 train, 10 test images (train gzipped)."""
    directory = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(0)
    arrays = [
        rng.integers(0, 256, size=(40, 28, 28)),
        np.arange(40) % 10,
        rng.integers(0, 256, size=(10, 28, 28)),
        np.arange(10)[::-1] % 10,
    ]
    for name, array in zip(FASHION_FILES, arrays, strict=True):
        _write_idx(directory / name, array, compress=name.startswith("train"))
    return directory, arrays


SEQUENCE_TASKS = ("fortunes-gpt",)  # token inputs, per-token logits, no norm options
CLASSIFIERS = tuple(name for name in builtin_tasks() if name not in SEQUENCE_TASKS)


def _task(name: str, tiny_fashion) -> Task:
    """A built-in task; the fashion ones read the tiny IDX directory (fast, no real files needed),
    the fortunes one is skipped when Debian's fortunes is not installed."""
    if name in SEQUENCE_TASKS and not cookie_files(fortunes_dir()):
        pytest.skip(f"no fortune cookie files in {fortunes_dir()} (apt-get install fortunes)")
    return (
        get_task(name, data_dir=str(tiny_fashion[0]))
        if name.startswith("fashion")
        else get_task(name)
    )


# --- data --------------------------------------------------------------------------------------


def test_mnist1d_default_split_is_the_papers_4000_1000():
    task = get_task("mnist1d-mlp")
    assert (task.n_train, task.n_val, task.input_shape) == (4000, 1000, (40,))
    assert task.options == {
        "n_samples": 5000,
        "train_split": 0.8,
        "data_seed": 42,
        "norm": "none",
        "ghost_batch_size": 32,
    }


def test_mnist1d_equals_the_packages_make_dataset_and_n_samples_scales_it():
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = 600
    expected = make_dataset(args)
    task = get_task("mnist1d-cnn", n_samples=600)
    assert (task.n_train, task.n_val) == (480, 120)
    np.testing.assert_allclose(task.x_train.numpy(), expected["x"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(task.y_val.numpy(), expected["y_test"])
    big = get_task("mnist1d-mlp", n_samples=1000, train_split=0.5, data_seed=1)
    assert (big.n_train, big.n_val) == (500, 500)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_every_classifier_has_cpu_float32_inputs_and_int64_labels_in_range(name, tiny_fashion):
    task = _task(name, tiny_fashion)
    classes = task.options.get("classes", 10)
    for x, y in ((task.x_train, task.y_train), (task.x_val, task.y_val)):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.device.type == y.device.type == "cpu"
        assert x.shape[0] == y.shape[0] > 0 and y.dim() == 1
        assert int(y.min()) >= 0 and int(y.max()) < classes
        assert torch.isfinite(x).all()
    assert task.x_val.shape[1:] == task.x_train.shape[1:]
    logits = task.make_model(0)(task.x_train[:8])
    assert logits.shape == (8, classes)
    assert task.loss_fn is cross_entropy and task.metric is accuracy


def test_fashion_reads_idx_files_gzipped_or_not_and_standardizes(tiny_fashion):
    directory, arrays = tiny_fashion
    mlp, cnn = (get_task(name, data_dir=str(directory)) for name in ("fashion-mlp", "fashion-cnn"))
    pixels = arrays[0].astype(np.float64) / 255.0
    mean, std = pixels.mean(), pixels.std(ddof=1)
    np.testing.assert_allclose(
        mlp.x_train.numpy(), ((pixels - mean) / std).reshape(40, 784), atol=1e-5
    )
    np.testing.assert_allclose(
        cnn.x_val.numpy(), ((arrays[2] / 255.0 - mean) / std).reshape(10, 1, 28, 28), atol=1e-5
    )
    np.testing.assert_array_equal(cnn.y_train.numpy(), arrays[1])
    assert mlp.input_shape == (784,) and cnn.input_shape == (1, 28, 28)
    assert mlp.options["data_dir"] == str(directory.resolve())
    assert get_task("fashion-mlp", data_dir=directory).n_train == 40  # a Path works too


def test_fashion_training_subset_is_seeded(tiny_fashion):
    directory = str(tiny_fashion[0])
    a = get_task("fashion-mlp", data_dir=directory, n_train=15)
    b = get_task("fashion-cnn", data_dir=directory, n_train=15)
    c = get_task("fashion-mlp", data_dir=directory, n_train=15, data_seed=1)
    assert a.n_train == 15 and a.n_val == 10
    assert torch.equal(a.y_train, b.y_train) and not torch.equal(a.y_train, c.y_train)


@needs_real_fashion
def test_real_fashion_mnist_is_the_full_60000_10000():
    task = get_task("fashion-mlp")
    assert (task.n_train, task.n_val, task.input_shape) == (60000, 10000, (784,))
    assert torch.bincount(task.y_train).tolist() == [6000] * 10
    assert abs(float(task.x_train.mean())) < 1e-4 and abs(float(task.x_train.std()) - 1) < 1e-4


def test_fashion_data_dir_from_environment(tiny_fashion, monkeypatch):
    monkeypatch.setenv(FASHION_DIR_ENV, str(tiny_fashion[0]))
    assert get_task("fashion-cnn").n_train == 40


def test_missing_fashion_files_say_how_to_fix(tmp_path, monkeypatch):
    with pytest.raises(SpecError) as info:
        get_task("fashion-mlp", data_dir=str(tmp_path))
    assert info.value.field == "task_options.data_dir"
    message = str(info.value)
    assert str(tmp_path) in message and "apt-get install dataset-fashion-mnist" in message
    assert "data_dir" in message and FASHION_DIR_ENV in message
    monkeypatch.setenv(FASHION_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(SpecError, match="nowhere"):
        get_task("fashion-cnn")


def test_corrupt_idx_file_is_a_clear_error(tmp_path):
    for name in FASHION_FILES:
        (tmp_path / name).write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")  # says 5, holds 3
    with pytest.raises(SpecError, match="not an unsigned-byte IDX file"):
        get_task("fashion-mlp", data_dir=str(tmp_path))
    _write_idx(tmp_path / "ok", np.arange(6).reshape(2, 3), compress=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "ok"), np.arange(6).reshape(2, 3))


def test_digits_split_and_scale():
    task = get_task("digits-mlp")
    assert (task.n_train, task.n_val, task.input_shape) == (1437, 360, (64,))
    assert float(task.x_train.min()) == 0.0 and float(task.x_train.max()) == 1.0
    other = get_task("digits-mlp", data_seed=1)
    assert not torch.equal(task.y_val, other.y_val)


def test_teacher_label_noise_flips_the_expected_fraction_of_training_labels_only():
    clean = get_task("teacher-mlp", n_samples=20000, classes=5, dim=8)
    noisy = get_task("teacher-mlp", n_samples=20000, classes=5, dim=8, label_noise=0.5)
    assert torch.equal(clean.x_train, noisy.x_train) and torch.equal(clean.y_val, noisy.y_val)
    changed = (clean.y_train != noisy.y_train).float().mean().item()
    assert (
        abs(changed - 0.5 * (1 - 1 / 5)) < 0.02
    )  # a random class equals the true one 1/5 of the time
    counts = torch.bincount(clean.y_train, minlength=5).float() / clean.n_train
    assert float(counts.min()) > 0.15 and float(counts.max()) < 0.25  # classes about balanced
    assert clean.input_shape == (8,) and clean.make_model(0)(clean.x_val).shape == (4000, 5)
    other_teacher = get_task("teacher-mlp", n_samples=20000, classes=5, dim=8, teacher_seed=1)
    assert torch.equal(clean.x_train, other_teacher.x_train)
    assert not torch.equal(clean.y_train, other_teacher.y_train)


def test_data_is_cached_per_process_and_options_change_it():
    a, b = get_task("mnist1d-mlp"), get_task("mnist1d-cnn")
    assert a.x_train is b.x_train  # generated once, shared, never modified
    seed3 = get_task("teacher-mlp", data_seed=3)
    assert seed3.x_train is get_task("teacher-mlp", data_seed=3).x_train
    assert not torch.equal(seed3.x_train, get_task("teacher-mlp", data_seed=4).x_train)


# --- models ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", builtin_tasks())
def test_make_model_is_deterministic_per_seed(name, tiny_fashion):
    task = _task(name, tiny_fashion)
    first, again, other = task.make_model(3), task.make_model(3), task.make_model(4)
    for (key, p), q, r in zip(
        first.state_dict().items(),
        again.state_dict().values(),
        other.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(p, q), key
        random_init = p.dtype.is_floating_point and p.unique().numel() > 1  # not LayerNorm's ones
        if random_init and key.endswith("weight"):
            assert not torch.equal(p, r), key


def test_building_tasks_and_models_leaves_global_rngs_untouched():
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(7)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(7)
    task = get_task("mnist1d-cnn", n_samples=200, data_seed=9)  # fresh generation: mnist1d reseeds
    get_task("teacher-mlp", n_samples=300).make_model(1)
    task.make_model(0)
    assert torch.equal(torch.rand(3), expected[0])
    assert (random.random(), np.random.rand()) == expected[1:]


@pytest.mark.parametrize("name", builtin_tasks())
def test_models_are_vmap_compatible(name, tiny_fashion):
    """functional_call over stacked states gives each model's own logits, as the ensemble needs."""
    task = _task(name, tiny_fashion)
    models = [task.make_model(seed) for seed in range(3)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x, y = task.x_train[:6], task.y_train[:6]

    def member(p, b):
        logits = functional_call(base, (p, b), (x,))
        return logits, task.loss_fn(logits, y), task.metric(logits, y)

    logits, losses, metrics = vmap(member)(params, buffers)
    for i, model in enumerate(models):
        alone = model(x)
        torch.testing.assert_close(logits[i], alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(losses[i], task.loss_fn(alone, y), rtol=1e-5, atol=1e-6)
        assert metrics[i].dim() == 0 and float(metrics[i]) == float(task.metric(alone, y))


@pytest.mark.parametrize("name", CLASSIFIERS)
@pytest.mark.parametrize("norm", ["batch", "ghost"])
def test_batch_norm_models_train_under_vmap_with_stacked_buffers(name, norm, tiny_fashion):
    """Training mode under vmap: each member's logits and running statistics as when run alone."""
    extra = {"data_dir": str(tiny_fashion[0])} if name.startswith("fashion") else {}
    task = get_task(name, norm=norm, ghost_batch_size=4, **extra)
    models = [task.make_model(seed) for seed in range(2)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = task.x_train[:8]
    logits = vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers)
    for i, model in enumerate(models):
        torch.testing.assert_close(logits[i], model(x), rtol=1e-4, atol=1e-5)
        for key, value in model.named_buffers():
            torch.testing.assert_close(buffers[key][i], value, rtol=1e-5, atol=1e-6)
    assert int(buffers[next(k for k in buffers if k.endswith("num_batches_tracked"))][0]) == (
        2 if norm == "ghost" else 1
    )


@pytest.mark.parametrize("name", CLASSIFIERS)
@pytest.mark.parametrize("norm", ["batch", "ghost"])
def test_norm_options_put_batch_norm_or_ghost_batch_norm_in_the_model(name, norm, tiny_fashion):
    extra = {"data_dir": str(tiny_fashion[0])} if name.startswith("fashion") else {}
    task = get_task(name, norm=norm, ghost_batch_size=4, **extra)
    model = task.make_model(0)
    kinds = {type(m) for m in model.modules()}
    if norm == "ghost":
        assert GhostBatchNorm in kinds
        ghost = next(m for m in model.modules() if isinstance(m, GhostBatchNorm))
        assert ghost.ghost_batch_size == 4
    else:
        assert kinds & {nn.BatchNorm1d, nn.BatchNorm2d}
    assert model(task.x_train[:8]).shape[0] == 8
    model.eval()
    assert model(task.x_train[:5]).shape[0] == 5


@pytest.mark.parametrize("name", builtin_tasks())
def test_builtin_model_factories_pickle_for_worker_processes(name, tiny_fashion):
    make_model = pickle.loads(pickle.dumps(_task(name, tiny_fashion).make_model))
    assert torch.equal(
        next(make_model(1).parameters()), next(_task(name, tiny_fashion).make_model(1).parameters())
    )


def test_loss_and_metric_against_hand_computed_values():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    y = torch.tensor([0, 1])
    expected = -(torch.log_softmax(logits, dim=1)[[0, 1], [0, 1]]).mean()
    torch.testing.assert_close(cross_entropy(logits, y), expected)
    assert accuracy(logits, y).dim() == 0 and float(accuracy(logits, y)) == 0.5


def test_num_parameters_of_the_papers_models():
    assert (
        get_task("mnist1d-mlp").num_parameters() == 40 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10
    )
    assert get_task("mnist1d-cnn").num_parameters() == (5 * 25 + 25) + 2 * (25 * 25 * 3 + 25) + (
        125 * 10 + 10
    )


# --- options and errors --------------------------------------------------------------------------


def test_unknown_task_lists_the_builtins():
    with pytest.raises(SpecError) as info:
        get_task("mnist-2d")
    assert info.value.field == "task"
    assert "unknown task 'mnist-2d'" in str(info.value)
    assert all(name in str(info.value) for name in builtin_tasks())


@pytest.mark.parametrize(
    ("options", "field", "text"),
    [
        ({"n_sampels": 100}, "task_options.n_sampels", "unknown option"),
        ({"n_samples": -10}, "task_options.n_samples", "integer >= 20"),
        ({"n_samples": "many"}, "task_options.n_samples", "integer"),
        ({"n_samples": True}, "task_options.n_samples", "integer"),
        ({"n_samples": 1005}, "task_options.n_samples", "multiple of 10"),
        ({"n_samples": 20.5}, "task_options.n_samples", "integer"),
        ({"train_split": 1.5}, "task_options.train_split", r"\[0.01, 0.99\]"),
        ({"train_split": float("nan")}, "task_options.train_split", "number"),
        ({"n_samples": 20, "train_split": 0.01}, "task_options.train_split", "empty"),
        ({"norm": "layer"}, "task_options.norm", "none, batch, ghost"),
        ({"norm": 1}, "task_options.norm", "string"),
        ({"ghost_batch_size": 0}, "task_options.ghost_batch_size", ">= 1"),
    ],
)
def test_bad_options_name_the_option(options, field, text):
    with pytest.raises(SpecError, match=text) as info:
        get_task("mnist1d-mlp", **options)
    assert info.value.field == field


def test_options_of_other_tasks_are_checked_too():
    with pytest.raises(SpecError, match=r"in \[0, 1\]"):
        get_task("teacher-mlp", label_noise=1.5)
    with pytest.raises(SpecError, match=r"task_options.classes"):
        get_task("teacher-mlp", classes=1)
    with pytest.raises(SpecError, match=r"task_options.n_train"):
        get_task("fashion-mlp", n_train=60001)
    with pytest.raises(SpecError, match=r"task_options.data_dir: must be a string"):
        get_task("fashion-mlp", data_dir=3)


def test_numeric_options_may_come_as_strings_or_whole_floats():
    task = get_task("teacher-mlp", n_samples="1000", label_noise="0.1", dim=4.0)
    assert task.options["n_samples"] == 1000 and task.options["dim"] == 4
    assert task.options["label_noise"] == 0.1 and task.n_train == 800


# --- user tasks ----------------------------------------------------------------------------------

USER_MODULE = """
import torch
from torch import nn
from batchlab.engine.spec import SpecError
from batchlab.engine.tasks import Task, accuracy, cross_entropy, seeded_model_factory


def make_task(n=64, width=8):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=gen)
    y = (x[:, 0] > 0).long()
    build = lambda: nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, 2))
    return Task("toy", seeded_model_factory(build), x, y, x[:16], y[:16], cross_entropy, accuracy,
                options={"n": n, "width": width})


def needs_size(size):
    return make_task(size)


def any_options(**kwargs):
    return make_task()


def raises(n=1):
    raise RuntimeError("no data today")


def validates(n=1):
    raise SpecError("task_options.n", "must be even")


def not_a_task():
    return {"x": 1}


def mismatched():
    task = make_task()
    task.y_train = task.y_train[:3]
    return task


NOT_CALLABLE = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> str:
    """A fresh module in a temporary current directory; returns its (unique) name."""
    name = f"user_task_{abs(hash(tmp_path)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    (tmp_path / "broken_task_module.py").write_text("import no_such_package_xyz\n")
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)
    sys.modules.pop("broken_task_module", None)


def test_user_task_gets_options_as_keyword_arguments(user_module):
    task = get_task(f"{user_module}:make_task", n=100, width=4)
    assert isinstance(task, Task) and task.n_train == 100 and task.options == {"n": 100, "width": 4}
    assert task.make_model(0)[0].out_features == 4
    assert (
        str(Path.cwd()) not in sys.path
    )  # the current directory was on sys.path only for the import
    assert get_task(f"{user_module}:any_options", whatever=1).n_train == 64


@pytest.mark.parametrize(
    ("target", "options", "field", "text"),
    [
        ("no_such_module_xyz:make_task", {}, "task", "cannot import module 'no_such_module_xyz'"),
        (
            "broken_task_module:make_task",
            {},
            "task",
            "importing 'broken_task_module' failed: ModuleNotFoundError: No module named 'no_such_pa",
        ),
        ("no_such_pkg_xyz.sub:make_task", {}, "task", "cannot import module 'no_such_pkg_xyz.sub'"),
        ("{m}:missing", {}, "task", "has no attribute 'missing'"),
        ("{m}:NOT_CALLABLE", {}, "task", "not a callable"),
        ("{m}:raises", {}, "task", "raised RuntimeError: no data today"),
        ("{m}:validates", {}, "task_options.n", "must be even"),
        ("{m}:not_a_task", {}, "task", "must return a batchlab.engine.tasks.Task, got dict"),
        ("{m}:mismatched", {}, "task", "same number"),
        ("{m}:make_task", {"depth": 2}, "task_options.depth", "it takes: n, width"),
        ("{m}:needs_size", {}, "task", "cannot be called"),
        ("{m}:", {}, "task", "expected 'module:function'"),
        (":make_task", {}, "task", "expected 'module:function'"),
    ],
)
def test_user_task_errors_are_clear(user_module, target, options, field, text):
    with pytest.raises(SpecError, match=text) as info:
        get_task(target.format(m=user_module), **options)
    assert info.value.field == field


def test_stored_task_imports_user_code_only_when_the_user_names_it(user_module):
    name = f"{user_module}:make_task"
    spec = RunSpec(task=name, batch_size=8, lr=0.1, task_options={"n": 100})
    with pytest.raises(SpecError) as info:
        stored_task(spec, "abc123")
    assert info.value.field == "task"
    assert str(info.value) == (
        f"task: run abc123 uses user code {name!r} (would import module {user_module!r}); "
        f"pass --task {name} (or --trust-task-code) to run it"
    )
    with pytest.raises(SpecError, match=f"run abc123 was trained on task {name!r}, not 'x:y'"):
        stored_task(spec, "abc123", named="x:y", trust_code=True)
    assert user_module not in sys.modules  # refused before any import
    assert stored_task(spec, "abc123", named=name).n_train == 100
    sys.modules.pop(user_module)
    assert stored_task(spec, "abc123", trust_code=True).n_train == 100
    builtin = RunSpec(task="digits-mlp", batch_size=8, lr=0.1, task_options={"hidden": 3})
    assert stored_task(builtin, "b").make_model(0)[0].out_features == 3


def test_no_module_deserializes_with_pickle_or_evaluates_text():
    """Stores hold JSON and safetensors only: nothing in batchlab unpickles (``torch.load`` only with
    ``weights_only=True``) or evaluates text."""
    pattern = re.compile(
        r"\b(import|from) (c?pickle|marshal|shelve|dill)\b|torch\.load\((?![^)]*weights_only=True)"
        r"|(?<![.\w])(eval|exec)\("
    )
    src = Path(batchlab.__file__).parent
    hits = [
        f"{path.relative_to(src)}:{n}"
        for path in sorted(src.rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert hits == []


def test_user_module_that_fails_on_import(tmp_path, monkeypatch):
    (tmp_path / "explodes_on_import.py").write_text("raise ValueError('bad config')\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        SpecError, match="importing 'explodes_on_import' failed: ValueError: bad config"
    ):
        get_task("explodes_on_import:make_task")


def test_examples_my_task_module_works(monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    task = get_task("examples.my_task:make_task", n_samples=300)
    assert task.n_train + task.n_val == 300
    assert task.make_model(0)(task.x_val).shape == (task.n_val, 2)


# --- listing -------------------------------------------------------------------------------------


def test_list_tasks_describes_every_builtin(monkeypatch, tmp_path):
    monkeypatch.setenv(
        FASHION_DIR_ENV, str(tmp_path)
    )  # no files: fashion tasks listed as unavailable
    infos = {info.name: info for info in list_tasks()}
    assert tuple(infos) == builtin_tasks()
    mnist = infos["mnist1d-cnn"]
    assert (mnist.n_train, mnist.n_val, mnist.input_shape) == (4000, 1000, (40,))
    assert mnist.n_params == get_task("mnist1d-cnn").num_parameters()
    assert mnist.options["n_samples"] == 5000 and "n_samples" in mnist.option_help
    fashion = infos["fashion-cnn"]
    assert fashion.n_train is None and "apt-get install dataset-fashion-mnist" in fashion.error
    assert fashion.options["n_train"] == 60000
    assert mnist.to_dict()["input_shape"] == [40] and fashion.to_dict()["error"]
