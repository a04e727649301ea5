"""Torch side: tasks, data slicing, the training engine, the noise-scale monitor and measurements."""
