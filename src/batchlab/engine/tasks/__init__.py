"""Tasks: a seeded model factory, train/validation tensors, a loss and a metric.

Built-in tasks, all offline (``get_task(name, **options)``; ``list_tasks()`` describes them):

- ``mnist1d-mlp``, ``mnist1d-cnn``: MNIST-1D (Greydanus 2020, "Scaling down deep learning"),
  generated with ``mnist1d.data.make_dataset`` (never its download path) and the paper's MLP and CNN.
- ``fashion-mlp``, ``fashion-cnn``: Fashion-MNIST (Xiao, Rasul & Vollgraf 2017), read from the IDX
  files Debian's ``dataset-fashion-mnist`` installs, or from ``data_dir`` / ``$BATCHLAB_FASHION_DIR``.
- ``digits-mlp``: scikit-learn's bundled 8x8 digits, small and fast, for tests.
- ``teacher-mlp``: synthetic teacher-student classification with a label-noise knob, so the
  gradient noise scale can be controlled.
- ``fortunes-gpt``: character-level language modelling on the text of Debian's ``fortunes`` (read
  from ``/usr/share/games/fortunes``, or ``data_dir`` / ``$BATCHLAB_FORTUNES_DIR``) with a small
  causal transformer; an example is a sequence of ``seq_len`` characters, the loss the mean token
  cross-entropy (bits per character = loss / ln 2), the metric next-character accuracy.
- ``module:function``: a user's callable that takes the task options as keyword arguments and
  returns a ``Task``; the module is imported with the current directory on ``sys.path``.

Data sets are generated or read once per process (``functools.lru_cache`` on the options that
decide them), so a sweep that builds the same task many times pays once; the cached tensors are
shared by every ``Task`` built from them and are never modified in place. Models are built under a
forked torch RNG seeded with the run's seed: ``make_model(s)`` is deterministic and leaves the global
RNG untouched. Models without batch norm are pure functions of their inputs (no in-place ops on
inputs, no data-dependent control flow), so ``torch.func.functional_call`` + ``vmap`` can train an
ensemble of them at once.

Layout: ``base`` (the ``Task`` record, options, ``_Builtin``), ``models`` (shared model builders),
one module per data family (``mnist1d``, ``fashion``, ``digits``, ``teacher``, ``text``), ``user``
(``module:function``) and ``registry`` (the built-in table, ``get_task``); the public names are
re-exported here.
"""

from batchlab.engine.tasks.base import Task, TaskInfo, accuracy, cross_entropy, seeded_model_factory
from batchlab.engine.tasks.fashion import (
    DEFAULT_FASHION_DIR,
    FASHION_DIR_ENV,
    FASHION_FILES,
    FashionCNN,
    fashion_dir,
    read_idx,
)
from batchlab.engine.tasks.mnist1d import Mnist1dCNN, Mnist1dMLP
from batchlab.engine.tasks.models import COMMON_OPTIONS, MLP, NORMS, norm_layer
from batchlab.engine.tasks.registry import (
    builtin_tasks,
    get_task,
    list_tasks,
    refuse_unnamed_code,
    stored_task,
    task_info,
)
from batchlab.engine.tasks.text import (
    DEFAULT_FORTUNES_DIR,
    FORTUNES_DIR_ENV,
    CharTransformer,
    bits_per_char,
    fortunes_dir,
    token_cross_entropy,
)

__all__ = [
    "COMMON_OPTIONS",
    "DEFAULT_FASHION_DIR",
    "DEFAULT_FORTUNES_DIR",
    "FASHION_DIR_ENV",
    "FASHION_FILES",
    "FORTUNES_DIR_ENV",
    "MLP",
    "NORMS",
    "CharTransformer",
    "FashionCNN",
    "Mnist1dCNN",
    "Mnist1dMLP",
    "Task",
    "TaskInfo",
    "accuracy",
    "bits_per_char",
    "builtin_tasks",
    "cross_entropy",
    "fashion_dir",
    "fortunes_dir",
    "get_task",
    "list_tasks",
    "norm_layer",
    "read_idx",
    "refuse_unnamed_code",
    "seeded_model_factory",
    "stored_task",
    "task_info",
    "token_cross_entropy",
]
