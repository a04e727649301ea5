"""Per-example gradient norms of sequence models against torch.func ground truth: a tiny causal
transformer (2 layers, width 16, vocabulary 11, 8 tokens) with tied and untied weights, with
``nn.MultiheadAttention`` and with hand-written attention through a Hugging Face style ``Conv1D``."""

from __future__ import annotations

import re

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from batchlab.core.noise import two_batch_estimate
from batchlab.engine.monitor import GradientNoiseScale, per_example_grad_norms
from batchlab.engine.spec import SpecError

VOCAB, WIDTH, SEQ, HEADS = 11, 16, 8, 2


class Conv1D(nn.Module):
    """Hugging Face GPT-2's transposed Linear (weight ``(in, out)``, ``torch.addmm``), rewritten here
    so the test needs no transformers."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(*x.shape[:-1], self.nf)


class HandAttention(nn.Module):
    """Causal self-attention as GPT-2 writes it: one packed ``Conv1D`` for q, k, v."""

    def __init__(self) -> None:
        super().__init__()
        self.c_attn, self.c_proj = Conv1D(3 * WIDTH, WIDTH), Conv1D(WIDTH, WIDTH)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, 2)
        q, k, v = (z.view(b, t, HEADS, c // HEADS).transpose(1, 2) for z in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class TorchAttention(nn.Module):
    """``nn.MultiheadAttention`` with a causal mask (packed in-projection, ``out_proj``)."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
        return self.mha(x, x, x, attn_mask=mask, need_weights=False)[0]


class Block(nn.Module):
    def __init__(self, attention: str, norm: type[nn.Module]) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = norm(WIDTH), norm(WIDTH)
        self.attn = HandAttention() if attention == "hand" else TorchAttention()
        self.mlp = nn.Sequential(
            nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """nanoGPT's shape: ``wte(idx) + wpe(pos)`` with ``pos`` of shape ``(T,)``, blocks, final norm,
    a bias-free head that may share the token embedding's weight."""

    def __init__(self, attention: str = "hand", tied: bool = True, norm: str = "layer") -> None:
        super().__init__()
        norm_cls = nn.LayerNorm if norm == "layer" else nn.RMSNorm
        self.wte, self.wpe = nn.Embedding(VOCAB, WIDTH), nn.Embedding(SEQ, WIDTH)
        self.blocks = nn.ModuleList([Block(attention, norm_cls) for _ in range(2)])
        self.ln_f = norm_cls(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        if tied:
            self.wte.weight = self.head.weight

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def lm_loss(logits: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def tiny_gpt(seed: int = 0, **kw: object) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyGPT(**kw).double()
    with torch.no_grad():  # norm weights and biases away from 1 and 0, so their gradients matter
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def tokens(batch: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Sequences with repeated tokens (index collisions inside one example) and next-token targets."""
    gen = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, VOCAB // 2, (batch, SEQ + 1), generator=gen)
    return seq[:, :-1], seq[:, 1:]


def exact_grads(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Per-example gradients by ``vmap(grad)``, flattened: (B, parameters); tied ones counted once."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return lm_loss(functional_call(model, p, (xi[None],)), yi[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g.flatten(1) for g in grads.values()], 1)


VARIANTS = [
    {"attention": "hand", "tied": True},
    {"attention": "hand", "tied": False},
    {"attention": "torch", "tied": True},
    {"attention": "torch", "tied": False},
    {"attention": "hand", "tied": True, "norm": "rms"},
]
IDS = ["hand-tied", "hand-untied", "mha-tied", "mha-untied", "hand-tied-rmsnorm"]


@pytest.mark.parametrize("kw", VARIANTS, ids=IDS)
def test_every_per_example_norm_equals_vmap_grad(kw: dict) -> None:
    model = tiny_gpt(**kw)
    x, y = tokens(6)
    got = per_example_grad_norms(model, lm_loss, x, y)
    want = torch.linalg.vector_norm(exact_grads(model, x, y), dim=1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
    assert all(p.grad is None for p in model.parameters())  # measuring leaves p.grad alone


@pytest.mark.parametrize("kw", VARIANTS[:3], ids=IDS[:3])
def test_per_example_b_simple_equals_the_exact_value(kw: dict) -> None:
    model = tiny_gpt(**kw)
    x, y = tokens(8, seed=2)
    gns = GradientNoiseScale(model, "per_example", loss_fn=lm_loss)
    for _ in range(2):  # two identical measurements: the estimate is the single-step one
        gns.forward_backward(x, y)
        model.zero_grad()
    assert gns.fallback is None and gns.mode == "per_example"
    per_example = exact_grads(model, x, y)
    mean = per_example.mean(0)
    want = two_batch_estimate(float((per_example**2).sum(1).mean()), float(mean @ mean), 1, 8)
    est = gns.estimate()
    assert (est.grad_sq, est.trace_cov) == pytest.approx(want, rel=1e-6)
    assert est.value == pytest.approx(max(want[1], 0) / want[0], rel=1e-6)


def test_recording_a_forward_the_loop_runs_equals_forward_backward() -> None:
    """A trainer's own forward and backward, recorded, gives forward_backward's measurements."""
    x, y = tokens(8, seed=2)
    estimates = []
    for own_loop in (False, True):
        model = tiny_gpt(attention="torch", tied=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        gns = GradientNoiseScale(model, "per_example", loss_fn=lm_loss)
        for step in range(3):
            xb, yb = x.roll(step, 0), y.roll(step, 0)
            opt.zero_grad()
            if own_loop:
                with gns.recording(len(xb)):
                    loss = lm_loss(model(xb), yb)
                loss.backward()
                gns.after_backward(len(xb))
                gns.before_step()
            else:
                gns.forward_backward(xb, yb)
            opt.step()
        assert gns.fallback is None
        estimates.append(gns.estimate())
    assert estimates[1] == pytest.approx(estimates[0], rel=1e-12)
    with pytest.raises(SpecError, match="batch_size: must be the recorded batch"):
        with gns.recording(8):
            loss = lm_loss(model(x), y)
        loss.backward()
        gns.after_backward(4)


def test_adam_preconditioned_per_example_matches_vmap_grad() -> None:
    model = tiny_gpt(attention="torch", tied=True)
    x, y = tokens(6)
    opt = torch.optim.Adam(model.parameters(), lr=0.0)
    lm_loss(model(x), y).backward()
    opt.step()
    model.zero_grad()
    gns = GradientNoiseScale(model, "per_example", loss_fn=lm_loss, precondition=opt)
    for _ in range(2):
        gns.forward_backward(x, y)
        model.zero_grad()
    scales = []
    for p in model.parameters():
        st, (_, beta2) = opt.state[p], opt.param_groups[0]["betas"]
        v_hat = st["exp_avg_sq"] / (1 - beta2 ** float(st["step"]))
        scales.append((1 / (v_hat.sqrt() + opt.param_groups[0]["eps"])).flatten())
    per_example = exact_grads(model, x, y) * torch.cat(scales)
    mean = per_example.mean(0)
    want = two_batch_estimate(float((per_example**2).sum(1).mean()), float(mean @ mean), 1, 6)
    est = gns.estimate()
    assert gns.mode == "per_example"
    assert (est.grad_sq, est.trace_cov) == pytest.approx(want, rel=1e-6)


class ScaledHead(nn.Module):
    """Uses the tied weight through a matmul of its transpose: an operation per_example does not see."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, WIDTH)
        self.mix = nn.Linear(WIDTH, WIDTH)

    def forward(self, idx: Tensor) -> Tensor:
        return self.mix(self.wte(idx)) @ self.wte.weight.T


class BatchlessUse(nn.Module):
    """A position embedding looked up without the batch and then multiplied, not added."""

    def __init__(self) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, WIDTH), nn.Embedding(SEQ, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(self.wte(idx) * self.wpe(torch.arange(idx.shape[1])))


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (
            ScaledHead,
            "wte.weight (Embedding) also gets gradient outside the operations per_example sees",
        ),
        (
            BatchlessUse,
            "wpe.weight (Embedding): an embedding looked up without the batch is used other than added to a "
            "batched tensor",
        ),
        (
            lambda: nn.Sequential(
                nn.Embedding(VOCAB, WIDTH), nn.GroupNorm(2, SEQ), nn.Linear(WIDTH, VOCAB)
            ),
            "1.weight (GroupNorm) gets its gradient through an operation per_example does not know",
        ),
    ],
    ids=["tied-through-matmul", "batchless-not-added", "groupnorm"],
)
def test_what_per_example_cannot_measure_falls_back_with_the_exact_reason(
    model: type[nn.Module], reason: str
) -> None:
    torch.manual_seed(0)
    net = model()
    x, y = tokens(4)
    gns = GradientNoiseScale(net, "per_example", loss_fn=lm_loss)
    gns.forward_backward(x, y)
    assert gns.mode == "split" and gns.fallback == reason
    with pytest.raises(SpecError, match=r"^model: " + re.escape(reason)):
        per_example_grad_norms(net, lm_loss, x, y)
