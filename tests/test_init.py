"""The one import path: every public name resolves from ``batchlab``, lazily, and the submodules
it comes from stay importable; ``import batchlab`` and every ``batchlab.core`` module load no torch."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

import batchlab
import batchlab.core


@pytest.mark.parametrize("name", batchlab.__all__)
def test_every_public_name_resolves_to_its_submodule_object(name: str) -> None:
    value = getattr(batchlab, name)
    if name != "__version__":
        assert value is getattr(importlib.import_module(batchlab._LAZY[name]), name)
        assert getattr(value, "__doc__", None), f"{name} has no docstring"


def test_import_batchlab_loads_no_torch_and_unknown_names_raise() -> None:
    code = "import sys, batchlab; batchlab.advise; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        batchlab.nope  # noqa: B018


def test_every_core_module_imports_without_torch() -> None:
    names = [m.name for m in pkgutil.walk_packages(batchlab.core.__path__, "batchlab.core.")]
    assert "batchlab.core.rules" in names and "batchlab.core.plan" in names
    code = f"import sys; {'; '.join(f'import {name}' for name in names)}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_former_probes_module_gives_the_monitor_objects() -> None:
    from batchlab.engine import monitor, probes

    assert probes.GradientNoiseScale is monitor.GradientNoiseScale
    assert probes.per_example_grad_norms is monitor.per_example_grad_norms
