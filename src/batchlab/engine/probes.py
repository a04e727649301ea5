"""Former name of :mod:`batchlab.engine.monitor` (the gradient noise scale monitor), kept so that
``from batchlab.engine.probes import GradientNoiseScale`` still works."""

from batchlab.engine.monitor import GradientNoiseScale, per_example_grad_norms

__all__ = ["GradientNoiseScale", "per_example_grad_norms"]
