"""batchlab: batch-size and learning-rate science for PyTorch.

The package is layered (see DESIGN.md): ``batchlab.core`` is pure math (numpy only), ``engine`` trains
with torch, ``sweep`` plans and stores runs, ``analysis`` and ``report`` read the store, ``reproduce``
tests the classic claims. The user-facing API is importable from here (``from batchlab import
GradientNoiseScale, advise, lr_range_test, ...``); names load lazily, so ``import batchlab`` and
``batchlab.core`` never import torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "GradientNoiseScale": "batchlab.engine.monitor",
    "per_example_grad_norms": "batchlab.engine.monitor",
    "lr_range_test": "batchlab.engine.lr_finder",
    "lr_find": "batchlab.engine.lr_finder",
    "top_hessian_eigenvalue": "batchlab.engine.sharpness",
    "keskar_sharpness": "batchlab.engine.sharpness",
    "GhostBatchNorm": "batchlab.engine.ghost_bn",
    "advise": "batchlab.core.rules",
    "apply_rule": "batchlab.core.rules",
    "Advice": "batchlab.core.rules",
    "RuleResult": "batchlab.core.rules",
    "NoiseEstimate": "batchlab.core.noise",
    "RunSpec": "batchlab.engine.spec",
    "RunResult": "batchlab.engine.spec",
    "train": "batchlab.engine.train",
    "get_task": "batchlab.engine.tasks",
    "Task": "batchlab.engine.tasks",
}


def __getattr__(name: str) -> Any:
    """Import public names on first use, keeping ``import batchlab`` light."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'batchlab' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
