"""Doctest collection of ``src`` skips a trainer integration whose optional extra is not installed
(importing it would raise the ImportError that names the extra)."""

import importlib.util

collect_ignore = [
    f"src/batchlab/integrations/{name}.py"
    for name, module in (("lightning", "lightning"), ("hf", "transformers"))
    if importlib.util.find_spec(module) is None
]
