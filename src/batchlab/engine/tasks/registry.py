"""The built-in tasks by name, and ``get_task`` / ``task_info`` / ``list_tasks`` over them and
over a user's ``module:function``."""

from __future__ import annotations

import functools
from typing import Any

from batchlab.engine.spec import RunSpec, SpecError
from batchlab.engine.tasks.base import Task, TaskInfo, _Builtin, _Option, _split_options
from batchlab.engine.tasks.digits import _build_digits
from batchlab.engine.tasks.fashion import _FASHION_OPTIONS, FashionCNN, _fashion
from batchlab.engine.tasks.mnist1d import Mnist1dCNN, Mnist1dMLP, _mnist1d
from batchlab.engine.tasks.models import _NORM_OPTIONS, MLP
from batchlab.engine.tasks.teacher import _build_teacher
from batchlab.engine.tasks.text import (
    _FORTUNES_OPTIONS,
    SOLO_REASON,
    _build_fortunes,
    token_cross_entropy,
)
from batchlab.engine.tasks.user import _load_user_task

_BUILTINS: dict[str, _Builtin] = {
    "mnist1d-mlp": _Builtin(
        "MNIST-1D, paper's MLP",
        {**_split_options(5000, 0.8, 42), **_NORM_OPTIONS},
        _mnist1d(Mnist1dMLP),
    ),
    "mnist1d-cnn": _Builtin(
        "MNIST-1D, paper's CNN",
        {**_split_options(5000, 0.8, 42), **_NORM_OPTIONS},
        _mnist1d(Mnist1dCNN),
    ),
    "fashion-mlp": _Builtin(
        "Fashion-MNIST, MLP",
        {**_FASHION_OPTIONS, **_NORM_OPTIONS},
        _fashion(functools.partial(MLP, (784, 256, 256, 10)), flat=True),
    ),
    "fashion-cnn": _Builtin(
        "Fashion-MNIST, CNN",
        {**_FASHION_OPTIONS, **_NORM_OPTIONS},
        _fashion(FashionCNN, flat=False),
    ),
    "digits-mlp": _Builtin(
        "sklearn digits, MLP",
        {
            "hidden": _Option(64, "hidden units", low=1),
            "train_split": _Option(
                0.8, "fraction of the 1,797 images used for training", float, 0.05, 0.95
            ),
            "data_seed": _Option(0, "seed of the train/validation split"),
            **_NORM_OPTIONS,
        },
        _build_digits,
    ),
    "teacher-mlp": _Builtin(
        "teacher-student, MLP",
        {
            **_split_options(10000, 0.8, 0),
            "dim": _Option(10, "input dimension", low=1),
            "classes": _Option(10, "number of classes", low=2),
            "label_noise": _Option(0.0, "fraction of training labels made random", float, 0.0, 1.0),
            "hidden": _Option(64, "hidden units of each of the student's two layers", low=1),
            "teacher_seed": _Option(0, "seed of the teacher network"),
            **_NORM_OPTIONS,
        },
        _build_teacher,
    ),
    "fortunes-gpt": _Builtin(
        "fortunes text, character-level GPT",
        _FORTUNES_OPTIONS,
        _build_fortunes,
        loss_fn=token_cross_entropy,
        metric_name="next-char accuracy",
        tokens_option="seq_len",
        train_solo=SOLO_REASON,
    ),
}


def builtin_tasks() -> tuple[str, ...]:
    """Names of the built-in tasks."""
    return tuple(_BUILTINS)


def get_task(name: str, **options: Any) -> Task:
    """The task called ``name`` (built-in or ``module:function``) built with ``options``.

    Raises ``SpecError("task", ...)`` for an unknown task or a user task that fails to load, and
    ``SpecError("task_options.<key>", ...)`` for an unknown or bad option.

    Example:
        >>> task = get_task("digits-mlp")
        >>> task.n_train, task.n_val, task.input_shape
        (1437, 360, (64,))
    """
    if not isinstance(name, str) or not name:
        raise SpecError("task", f"must be a task name, got {name!r}")
    builtin = _BUILTINS.get(name)
    if builtin is not None:
        return builtin.make(name, options)
    if ":" in name:
        return _load_user_task(name, options)
    raise SpecError(
        "task",
        f"unknown task {name!r}; built-in: {', '.join(_BUILTINS)}; or your own as 'module:function'",
    )


def stored_task(
    spec: RunSpec, run_id: str, *, named: str | None = None, trust_code: bool = False
) -> Task:
    """The task of a spec read from a store, refusing user code that only the store names.

    A store someone sends is data, never code: a built-in task is built, a ``module:function`` is
    imported only when the user named the same one (``named``, e.g. ``--task``) or opted in to
    stored task code (``trust_code``). Otherwise ``SpecError("task", ...)`` says which module it
    would import and how to allow it, before anything is imported.
    """
    name = spec.task
    if named is not None and named != name:
        raise SpecError("task", f"run {run_id} was trained on task {name!r}, not {named!r}")
    refuse_unnamed_code(name, f"run {run_id}", named=named, trust_code=trust_code)
    return get_task(name, **dict(spec.task_options))


def refuse_unnamed_code(
    name: object, where: str, *, named: str | None = None, trust_code: bool = False
) -> None:
    """Refuse a ``module:function`` task that only a file (``where``) names, before importing it.

    A store or a sweep file someone sends is data: its user code runs only when the user names the
    same task (``named``, from ``--task``) or opts in (``trust_code``, ``--trust-task-code``).
    """
    if isinstance(name, str) and ":" in name and not trust_code and named != name:
        raise SpecError(
            "task",
            f"{where} uses user code {name!r} (would import module "
            f"{name.partition(':')[0]!r}); pass --task {name} (or --trust-task-code) to run it",
        )


def task_info(name: str, **options: Any) -> TaskInfo:
    """Sizes, parameter count, input shape and options of one task (builds it)."""
    task = get_task(name, **options)
    builtin = _BUILTINS.get(name)
    return TaskInfo(
        name=name,
        description=task.description,
        n_train=task.n_train,
        n_val=task.n_val,
        n_params=task.num_parameters(),
        input_shape=task.input_shape,
        options=dict(task.options) or dict(options),
        option_help={k: o.help for k, o in builtin.options.items()} if builtin else {},
    )


def list_tasks() -> list[TaskInfo]:
    """Every built-in task with its default options; one that cannot be built here has ``error``."""
    infos = []
    for name, builtin in _BUILTINS.items():
        try:
            infos.append(task_info(name))
        except SpecError as exc:
            infos.append(
                TaskInfo(
                    name,
                    builtin.description,
                    None,
                    None,
                    None,
                    None,
                    {key: opt.default for key, opt in builtin.options.items()},
                    {key: opt.help for key, opt in builtin.options.items()},
                    error=str(exc),
                )
            )
    return infos
