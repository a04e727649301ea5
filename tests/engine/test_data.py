"""Batch order: seeded, device-independent, full batches across epoch boundaries."""

from __future__ import annotations

import pytest
import torch

from batchlab.engine.data import BatchStream, configure_threads, epoch_permutation


def test_permutation_depends_on_seed_and_epoch():
    a = epoch_permutation(100, seed=0, epoch=0)
    assert torch.equal(a, epoch_permutation(100, seed=0, epoch=0))
    assert not torch.equal(a, epoch_permutation(100, seed=1, epoch=0))
    assert not torch.equal(a, epoch_permutation(100, seed=0, epoch=1))
    assert sorted(a.tolist()) == list(range(100))


def test_stream_covers_each_epoch_exactly_once():
    stream = BatchStream(n=10, seed=3)
    seen = torch.cat([stream.next(4) for _ in range(5)])  # 20 indices = 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10))
    assert sorted(seen[10:].tolist()) == list(range(10))
    assert stream.epoch == 1 and stream.samples == 20


def test_stream_batches_may_change_size():
    stream = BatchStream(n=7, seed=0)
    sizes = [len(stream.next(b)) for b in (3, 5, 7, 1)]
    assert sizes == [3, 5, 7, 1] and stream.samples == 16


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(5, 0).next(0)
    with pytest.raises(ValueError, match="n:"):
        BatchStream(0, 0)
    with pytest.raises(ValueError, match="threads"):
        configure_threads(0)
