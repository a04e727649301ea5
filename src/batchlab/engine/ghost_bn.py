"""Ghost batch norm: batch normalization over virtual ("ghost") batches of a fixed size.

Hoffer, Hubara & Soudry 2017, "Train longer, generalize better: closing the generalization gap in
large batch training of neural networks" (section 4): a large batch of ``N`` examples is split into
``N / g`` consecutive chunks of ``g`` examples and each chunk is normalized with its own mean and
variance, so the normalization noise of a large-batch run matches that of batch size ``g``.

Convention (what the tests check against ``nn.BatchNorm``): a training-mode forward pass on ``N``
examples equals applying an ordinary batch norm to chunk 0, then chunk 1, ..., in order. Outputs are
each chunk's batch-normalized values; the running statistics receive ``k = N / g`` updates, one per
chunk in chunk order (``num_batches_tracked`` grows by ``k``): with momentum ``m`` the running mean
becomes ``(1-m)^k r + sum_i m (1-m)^(k-1-i) mu_i`` and with ``momentum=None`` (cumulative average)
``(n r + sum_i mu_i) / (n + k)``, the running variance likewise with each chunk's unbiased variance.
Eval mode normalizes with the running statistics exactly as batch norm does and accepts any batch size.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from batchlab.engine.spec import SpecError


class GhostBatchNorm(_BatchNorm):
    """Drop-in for ``nn.BatchNorm1d/2d/3d`` that normalizes each chunk of ``ghost_batch_size``.

    It subclasses torch's batch-norm base, so it has the same parameters, buffers and state-dict keys
    as ``nn.BatchNorm*d`` and code that looks for batch norm (``isinstance(m, _BatchNorm)``) finds it.
    ``SyncBatchNorm.convert_sync_batchnorm`` would turn it into plain synchronized batch norm.

    Args:
        num_features: channels ``C`` of inputs shaped ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or
            ``(N, C, D, H, W)``.
        ghost_batch_size: examples per ghost batch; must divide the batch size in training mode.
        **batchnorm_kwargs: ``eps``, ``momentum``, ``affine``, ``track_running_stats``, ``device``,
            ``dtype``, ``bias`` as for ``nn.BatchNorm1d``.

    Example:
        >>> bn = GhostBatchNorm(3, ghost_batch_size=4)
        >>> bn(torch.randn(8, 3)).shape
        torch.Size([8, 3])
        >>> int(bn.num_batches_tracked)  # one running-stat update per ghost batch
        2
    """

    def __init__(
        self, num_features: int, ghost_batch_size: int, **batchnorm_kwargs: object
    ) -> None:
        if isinstance(ghost_batch_size, bool) or not isinstance(ghost_batch_size, int):
            raise SpecError(
                "ghost_batch_size", f"must be an integer >= 1, got {ghost_batch_size!r}"
            )
        if ghost_batch_size < 1:
            raise SpecError("ghost_batch_size", f"must be >= 1, got {ghost_batch_size}")
        super().__init__(num_features, **batchnorm_kwargs)  # type: ignore[arg-type]
        self.ghost_batch_size = ghost_batch_size

    def _check_input_dim(self, input: Tensor) -> None:
        if not 2 <= input.dim() <= 5:
            raise ValueError(
                f"GhostBatchNorm expects input shaped (N, C, ...) with 2 to 5 dimensions, "
                f"got {input.dim()}D input of shape {tuple(input.shape)}"
            )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch_size={self.ghost_batch_size}"

    def forward(self, input: Tensor) -> Tensor:
        """Normalize each ghost batch with its own statistics in training mode, else as batch norm."""
        self._check_input_dim(input)
        uses_batch_stats = self.training or self.running_mean is None
        n = input.shape[0]
        if not uses_batch_stats or n == self.ghost_batch_size:
            return super().forward(input)
        if n % self.ghost_batch_size:
            raise SpecError(
                "ghost_batch_size",
                f"{self.ghost_batch_size} does not divide the batch of {n} examples; use a batch "
                f"size (and micro-batch size) that is a multiple of ghost_batch_size",
            )
        return self._ghost_forward(input)

    def _ghost_forward(self, input: Tensor) -> Tensor:
        """Batch-normalize each chunk of ``ghost_batch_size`` examples, vectorized over chunks."""
        k = input.shape[0] // self.ghost_batch_size
        chunks = input.reshape(k, self.ghost_batch_size, *input.shape[1:])
        reduce_dims = (1, *range(3, chunks.dim()))
        count = self.ghost_batch_size * math.prod(input.shape[2:])
        if count < 2:
            raise SpecError(
                "ghost_batch_size",
                f"each ghost batch needs more than 1 value per channel to normalize, got {count}",
            )
        var, mean = torch.var_mean(chunks, dim=reduce_dims, correction=0, keepdim=True)
        out = (chunks - mean) * torch.rsqrt(var + self.eps)
        channel_shape = (self.num_features, *([1] * (input.dim() - 2)))
        if self.weight is not None:
            out = out * self.weight.reshape(channel_shape)
        if self.bias is not None:
            out = out + self.bias.reshape(channel_shape)
        if self.training and self.track_running_stats and self.running_mean is not None:
            unbiased = var * (count / (count - 1))
            self._update_running_stats(
                mean.reshape(k, self.num_features), unbiased.reshape(k, self.num_features)
            )
        return out.reshape(input.shape)

    @torch.no_grad()
    def _update_running_stats(self, means: Tensor, variances: Tensor) -> None:
        """Apply the ``k`` sequential batch-norm updates of the chunks (rows) in closed form."""
        k = means.shape[0]
        n_before = self.num_batches_tracked.clone()
        self.num_batches_tracked.add_(k)
        if self.momentum is None:  # cumulative average over all batches seen, as batch norm
            total = n_before + k
            self.running_mean.mul_(n_before / total).add_(means.sum(0) / total)
            self.running_var.mul_(n_before / total).add_(variances.sum(0) / total)
            return
        m = self.momentum
        weights = m * (1.0 - m) ** torch.arange(
            k - 1, -1, -1, dtype=means.dtype, device=means.device
        )
        keep = (1.0 - m) ** k
        self.running_mean.mul_(keep).add_(weights @ means)
        self.running_var.mul_(keep).add_(weights @ variances)
