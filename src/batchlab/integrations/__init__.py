"""Trainer integrations: the gradient-noise-scale monitor as a callback of Lightning and of the
Hugging Face ``Trainer``.

- ``batchlab.integrations.lightning.GradientNoiseScaleCallback`` (``pip install
  'batchlab[lightning]'``), with ``lr_range_test`` for a ``LightningModule``;
- ``batchlab.integrations.hf.GradientNoiseScaleCallback`` (``pip install 'batchlab[hf]'``).

Each picks the mode that costs no extra forward pass from the trainer's set-up (``per_example`` at
one micro-batch per step, ``accumulation`` with gradient accumulation, ``distributed`` under DDP),
logs ``noise_scale``, its interval and ``suggested_batch_size`` through the trainer, and keeps the
estimate in the trainer's checkpoints. Nothing here is imported by ``import batchlab``; a submodule
whose trainer is not installed raises an ``ImportError`` naming the extra to install.
"""
