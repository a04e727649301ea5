"""Shared test set-up: one torch thread (the engine's default worker layout), quiet logs."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
