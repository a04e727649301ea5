"""Torch side: tasks, data slicing, the training engine, probes and measurements."""
