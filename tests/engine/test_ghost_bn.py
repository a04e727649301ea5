"""GhostBatchNorm against nn.BatchNorm: whole batch when ghost size = batch size, chunk by chunk else."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from batchlab.engine.ghost_bn import GhostBatchNorm
from batchlab.engine.spec import SpecError

SHAPES = [(12, 3), (12, 3, 5), (12, 3, 4, 4)]  # (N, C), (N, C, L), (N, C, H, W)


def _pair(shape: tuple[int, ...], ghost: int, **kwargs) -> tuple[GhostBatchNorm, nn.Module]:
    """A GhostBatchNorm and the matching nn.BatchNorm with the same non-trivial affine weights."""
    bn = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(shape[1], **kwargs)
    gbn = GhostBatchNorm(shape[1], ghost, **kwargs)
    if bn.weight is not None:
        with torch.no_grad():
            bn.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
            bn.bias.copy_(torch.tensor([0.1, -0.3, 2.0]))
        gbn.load_state_dict(bn.state_dict())
    return gbn, bn


def _inputs(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([1.0, 3.0, 0.2]).reshape(1, 3, *([1] * (len(shape) - 2)))
    return (torch.randn(shape, generator=gen) * scale + 2.0).requires_grad_()


def _grads(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> list[torch.Tensor]:
    weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    params = [p for p in module.parameters()]
    return list(torch.autograd.grad((out * weights).sum(), [x, *params]))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_size_equal_to_batch_is_exactly_batchnorm(shape, momentum):
    gbn, bn = _pair(shape, ghost=shape[0], momentum=momentum)
    for step in range(3):  # several steps: running statistics accumulate identically
        x = _inputs(shape, seed=step)
        out_g, out_b = gbn(x), bn(x)
        assert torch.equal(out_g, out_b)
        for g_ghost, g_bn in zip(_grads(gbn, x, out_g), _grads(bn, x, out_b), strict=True):
            assert torch.equal(g_ghost, g_bn)
    for name, buffer in bn.named_buffers():
        assert torch.equal(dict(gbn.named_buffers())[name], buffer), name
    gbn.eval(), bn.eval()
    x = _inputs(shape, seed=9)
    assert torch.equal(gbn(x), bn(x))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_batches_equal_batchnorm_applied_to_each_chunk(shape, momentum):
    # float64: in float32 the input gradient of 4-row chunks (channel mean 2, std 0.2) is only good
    # to ~1e-5 of its scale and differs between CPU kernels by up to 90% of a 1e-4 tolerance
    ghost, close = 4, {"rtol": 1e-10, "atol": 1e-10}
    gbn, bn = (module.double() for module in _pair(shape, ghost=ghost, momentum=momentum))
    for step in range(2):
        x = _inputs(shape, seed=step).detach().double().requires_grad_()
        out_g = gbn(x)
        out_b = torch.cat([bn(chunk) for chunk in x.split(ghost)])  # batch norm chunk by chunk
        torch.testing.assert_close(out_g, out_b, **close)
        for g_ghost, g_bn in zip(_grads(gbn, x, out_g), _grads(bn, x, out_b), strict=True):
            torch.testing.assert_close(g_ghost, g_bn, **close)
    torch.testing.assert_close(gbn.running_mean, bn.running_mean, **close)
    torch.testing.assert_close(gbn.running_var, bn.running_var, **close)
    assert int(gbn.num_batches_tracked) == int(bn.num_batches_tracked) == 2 * shape[0] // ghost
    # eval mode: running statistics, any batch size (7 is not a multiple of the ghost size)
    gbn.eval(), bn.eval()
    x = _inputs((7, *shape[1:]), seed=5).detach().double()
    torch.testing.assert_close(gbn(x), bn(x), **close)


def test_ghost_normalization_differs_from_whole_batch_normalization():
    """The chunking matters: with chunks of different statistics, ghost BN is not plain BN."""
    x = torch.cat([torch.randn(4, 3), torch.randn(4, 3) * 5 + 10])
    gbn, bn = _pair((8, 3), ghost=4)
    assert not torch.allclose(gbn(x), bn(x), atol=1e-2)
    assert not torch.allclose(gbn.running_mean, bn.running_mean, atol=1e-2)


@pytest.mark.parametrize("shape", SHAPES)
def test_without_running_stats_each_chunk_uses_its_own_statistics_in_eval_too(shape):
    gbn, bn = _pair(shape, ghost=6, track_running_stats=False, affine=False)
    x = _inputs(shape).detach().double()  # float64, as above
    for train in (True, False):
        gbn.train(train), bn.train(train)
        expected = torch.cat([bn(chunk) for chunk in x.split(6)])
        torch.testing.assert_close(gbn(x), expected, rtol=1e-10, atol=1e-10)
    assert gbn.running_mean is None


def test_bias_false_and_state_dict_interchangeable_with_batchnorm():
    gbn = GhostBatchNorm(3, 2, bias=False)
    assert gbn.bias is None and gbn.weight is not None
    bn = nn.BatchNorm1d(3, bias=False)
    x = torch.randn(4, 3)
    torch.testing.assert_close(gbn(x), torch.cat([bn(c) for c in x.split(2)]))
    assert set(GhostBatchNorm(5, 8).state_dict()) == set(nn.BatchNorm2d(5).state_dict())
    assert "ghost_batch_size=8" in repr(GhostBatchNorm(5, 8))


def test_vmap_over_stacked_models_in_eval_mode():
    """Eval-mode ghost batch norm is a pure function: an ensemble runs under vmap."""
    models = [nn.Sequential(nn.Linear(4, 3), GhostBatchNorm(3, 4)) for _ in range(3)]
    for i, model in enumerate(models):
        model(torch.randn(8, 4) * (i + 1))  # different running statistics per member
        model.eval()
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(5, 4)
    out = vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers)
    for i, model in enumerate(models):
        torch.testing.assert_close(out[i], model(x))


@pytest.mark.parametrize("bad", [0, -4, 2.5, "8", True])
def test_bad_ghost_batch_size_names_the_field(bad):
    with pytest.raises(SpecError, match="ghost_batch_size") as info:
        GhostBatchNorm(3, bad)
    assert isinstance(info.value, ValueError) and info.value.field == "ghost_batch_size"


def test_batch_not_divisible_by_ghost_size_is_a_clear_error():
    gbn = GhostBatchNorm(3, 4)
    with pytest.raises(ValueError, match=r"ghost_batch_size: 4 does not divide the batch of 10"):
        gbn(torch.randn(10, 3))
    with pytest.raises(ValueError, match="ghost_batch_size"):
        gbn(torch.randn(2, 3))  # smaller than one ghost batch
    gbn.eval()
    assert gbn(torch.randn(10, 3)).shape == (10, 3)  # eval mode uses running stats: any size


def test_bad_input_shapes_are_errors():
    with pytest.raises(ValueError, match="2 to 5 dimensions"):
        GhostBatchNorm(3, 2)(torch.randn(3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        GhostBatchNorm(3, 1)(torch.randn(4, 3))
