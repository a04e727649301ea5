"""The ``batchlab`` command line: one module per command group, each command one library call.

Every module in this package (except ``_app``) registers its commands on the shared ``app`` when
imported; they are imported here in a fixed order so ``--help`` lists them the same way every time.
"""

from __future__ import annotations

import importlib
import pkgutil

from batchlab.cli._app import app, emit_json, fail, main

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["app", "emit_json", "fail", "main"]
