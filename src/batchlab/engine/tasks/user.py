"""A user's task ``module:function``: imported with the current directory on ``sys.path``, called
with the task options as keyword arguments, and the ``Task`` it returns checked."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from batchlab.engine.spec import SpecError
from batchlab.engine.tasks.base import Task


@contextlib.contextmanager
def _cwd_on_path() -> Iterator[None]:
    """The current directory first on ``sys.path`` while a user's task is imported and built."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _load_user_task(name: str, options: dict[str, Any]) -> Task:
    """Import ``module:function``, call it with ``options`` as keyword arguments, check the Task."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise SpecError("task", f"expected 'module:function', got {name!r}")
    try:
        with _cwd_on_path():
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module_name + ".").startswith(exc.name + "."):
            raise SpecError(  # the module exists but imports something missing
                "task", f"importing {module_name!r} failed: ModuleNotFoundError: {exc}"
            ) from exc
        raise SpecError(
            "task",
            f"cannot import module {module_name!r} ({exc}); it must be importable from the current "
            f"directory {os.getcwd()} or installed",
        ) from exc
    except Exception as exc:
        raise SpecError(
            "task", f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    fn: Any = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise SpecError("task", f"module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise SpecError("task", f"{name} is a {type(fn).__name__}, not a callable returning a Task")
    _check_signature(name, fn, options)
    try:
        with _cwd_on_path():  # the task may import sibling modules lazily
            task = fn(**options)
    except SpecError:
        raise
    except Exception as exc:
        raise SpecError("task", f"{name} raised {type(exc).__name__}: {exc}") from exc
    _check_task(name, task)
    return task


def _check_signature(name: str, fn: Callable[..., Any], options: dict[str, Any]) -> None:
    """Name the option a user's task function does not accept, or the ones it requires."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(**options)
    except TypeError as exc:
        params = signature.parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        accepted = [
            p.name for p in params.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        for key in options:
            if key not in accepted and not takes_any:
                raise SpecError(
                    f"task_options.{key}",
                    f"not accepted by {name}; it takes: {', '.join(accepted) or 'no options'}",
                ) from exc
        raise SpecError("task", f"{name} cannot be called with options {options}: {exc}") from exc


def _check_task(name: str, task: Any) -> None:
    """A user's task must be a ``Task`` with finite tensors of matching lengths and callables."""
    if not isinstance(task, Task):
        raise SpecError(
            "task", f"{name} must return a batchlab.engine.tasks.Task, got {type(task).__name__}"
        )
    for split in ("train", "val"):
        x, y = getattr(task, f"x_{split}"), getattr(task, f"y_{split}")
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise SpecError("task", f"{name}: x_{split} and y_{split} must be torch tensors")
        if x.dim() == 0 or y.dim() == 0 or len(x) != len(y) or len(x) == 0:
            raise SpecError(
                "task",
                f"{name}: x_{split} and y_{split} need the same number (>= 1) of examples, "
                f"got shapes {tuple(x.shape)} and {tuple(y.shape)}",
            )
        for label, t in ((f"x_{split}", x), (f"y_{split}", y)):
            bad = int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0
            if bad:
                raise SpecError(
                    "task", f"{label} has {bad} non-finite values (NaN or inf); clean the data"
                )
    for attr in ("make_model", "loss_fn", "metric"):
        if not callable(getattr(task, attr)):
            raise SpecError("task", f"{name}: Task.{attr} must be callable")
    tokens = task.tokens_per_example
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise SpecError(
            "task", f"{name}: Task.tokens_per_example must be an integer >= 1, got {tokens!r}"
        )
