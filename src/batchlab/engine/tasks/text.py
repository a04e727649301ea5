"""Character-level language modelling on real English text: the cookie files of Debian's
``fortunes`` package (fortune-mod's collection, BSD licence), read from ``/usr/share/games/fortunes``,
or from ``data_dir`` / ``$BATCHLAB_FORTUNES_DIR``, and a small causal transformer built from plain
``nn.Embedding`` / ``nn.Linear`` / ``nn.LayerNorm`` (what the ``per_example`` noise mode reads)."""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from batchlab.engine.spec import SpecError
from batchlab.engine.tasks.base import Data, _Option

log = logging.getLogger(__name__)

FORTUNES_DIR_ENV = "BATCHLAB_FORTUNES_DIR"

DEFAULT_FORTUNES_DIR = "/usr/share/games/fortunes"

ALPHABET = "\t\n" + "".join(chr(c) for c in range(32, 127))
"""Tab, newline and printable ASCII; every other byte is one more token, ``OTHER``."""

OTHER = len(ALPHABET)

VOCAB_SIZE = len(ALPHABET) + 1

VAL_SHARE = 10
"""One fortune in ``VAL_SHARE`` (by a CRC-32 of its text) is validation, the rest training."""

SEPARATOR = b"\n%\n"
"""What ends each fortune in the token stream, as in the cookie files."""

_TOKEN_OF_BYTE = np.full(256, OTHER, dtype=np.int64)
_TOKEN_OF_BYTE[np.frombuffer(ALPHABET.encode("ascii"), dtype=np.uint8)] = np.arange(len(ALPHABET))


def fortunes_dir(data_dir: str | None = None) -> Path:
    """Directory of the cookie files: ``data_dir``, else ``$BATCHLAB_FORTUNES_DIR``, else Debian's
    ``/usr/share/games/fortunes``."""
    return Path(data_dir or os.environ.get(FORTUNES_DIR_ENV) or DEFAULT_FORTUNES_DIR).expanduser()


def cookie_files(directory: Path) -> list[Path]:
    """The cookie files in ``directory``, sorted: plain files with a ``strfile`` index ``<name>.dat``
    (the ``.u8`` links and the indexes themselves are not text to read)."""
    if not directory.is_dir():
        return []
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and not p.is_symlink() and p.with_name(p.name + ".dat").is_file()
    )


def read_fortunes(directory: Path) -> list[bytes]:
    """Every fortune of the cookie files, in file order: split at ``%`` lines, overstrikes
    (``x`` backspace) removed, surrounding blank lines stripped, empty ones dropped."""
    files = cookie_files(directory)
    if not files:
        raise SpecError(
            "task_options.data_dir",
            f"no fortune cookie files (a file with its .dat index) in {directory}; install them "
            "with `sudo apt-get install fortunes` (Debian/Ubuntu), or pass the directory holding "
            f"them as task option data_dir or in ${FORTUNES_DIR_ENV}",
        )
    fortunes = []
    for path in files:
        text = re.sub(rb".\x08", b"", path.read_bytes())
        fortunes += [f.strip(b"\n") for f in re.split(rb"^%\n", text, flags=re.M)]
    return [f for f in fortunes if f]


def is_validation(fortune: bytes) -> bool:
    """Whether a fortune belongs to the validation set: decided by its text alone, so the split is
    the same on every machine and a fortune found in two files lands on one side."""
    return zlib.crc32(fortune) % VAL_SHARE == 0


def encode(text: bytes) -> Tensor:
    """Token ids of ``text``: its position in ``ALPHABET``, ``OTHER`` for any other byte."""
    return torch.from_numpy(_TOKEN_OF_BYTE[np.frombuffer(text, dtype=np.uint8)])


def decode(tokens: Tensor) -> str:
    """The text of token ids (``OTHER`` shown as U+FFFD)."""
    return "".join(ALPHABET[t] if t < OTHER else "\ufffd" for t in tokens.tolist())


def windows(stream: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """Non-overlapping inputs of ``seq_len`` tokens and their targets, the same shifted by one."""
    n = (stream.numel() - 1) // seq_len
    return (
        stream[: n * seq_len].reshape(n, seq_len),
        stream[1 : n * seq_len + 1].reshape(n, seq_len),
    )


@functools.lru_cache(maxsize=2)
def token_streams(directory: Path) -> tuple[Tensor, Tensor]:
    """Training and validation token streams: their fortunes, each followed by ``SEPARATOR``."""
    log.info("reading fortunes from %s", directory)
    fortunes = read_fortunes(directory)
    sides: tuple[list[bytes], list[bytes]] = ([], [])
    for fortune in fortunes:
        sides[is_validation(fortune)].append(fortune + SEPARATOR)
    return encode(b"".join(sides[0])), encode(b"".join(sides[1]))


def _subset(x: Tensor, y: Tensor, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` windows drawn without replacement (in stream order), or all of them."""
    if n >= x.shape[0]:
        return x, y
    keep = torch.randperm(x.shape[0], generator=generator)[:n].sort().values
    return x[keep], y[keep]


@functools.lru_cache(maxsize=4)
def _fortunes_data(directory: Path, seq_len: int, n_train: int, n_val: int, seed: int) -> Data:
    """Training and validation windows: a seeded subset of each side's windows when asked."""
    train, val = token_streams(directory)
    generator = torch.Generator().manual_seed(seed)
    x_train, y_train = _subset(*windows(train, seq_len), n_train, generator)
    x_val, y_val = _subset(*windows(val, seq_len), n_val, generator)
    return x_train, y_train, x_val, y_val


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention under a causal mask: one ``nn.Linear`` for q, k, v, one out."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (
            t.unflatten(-1, (self.heads, -1)).transpose(-3, -2)  # (..., heads, T, head width)
            for t in self.qkv(x).chunk(3, dim=-1)
        )
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(attended.transpose(-3, -2).flatten(-2))


class Block(nn.Module):
    """Pre-norm transformer block: attention and a 4x GELU MLP, each added to the residual."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.proj = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.proj(F.gelu(self.fc(self.norm2(x))))


class CharTransformer(nn.Module):
    """GPT-style causal transformer over token ids (N, T) -> next-token logits (N, T, vocab).

    Learned token and position embeddings, pre-norm blocks, a final LayerNorm and an untied linear
    head; GPT-2's initialisation (normal 0.02, residual projections scaled by 1/sqrt(2 layers)), so
    the loss at initialisation is close to ln(vocab).
    """

    def __init__(
        self,
        vocab: int = VOCAB_SIZE,
        seq_len: int = 64,
        width: int = 64,
        layers: int = 2,
        heads: int = 4,
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                continue  # biases zero, LayerNorm weights one: as built
            std = (
                0.02 / math.sqrt(2 * layers)
                if name.endswith(("out.weight", "proj.weight"))
                else 0.02
            )
            nn.init.normal_(p, 0.0, std)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        h = self.tok(idx) + self.pos(torch.arange(idx.shape[-1], device=idx.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def token_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy over every token of every sequence: logits (N, T, V), targets (N, T)."""
    return F.cross_entropy(logits.flatten(0, -2), y.flatten())


def bits_per_char(loss: float) -> float:
    """A mean token cross-entropy in nats as bits per character."""
    return loss / math.log(2)


def _build_fortunes(o: dict[str, Any]) -> tuple[Callable[[], nn.Module], Data]:
    directory = fortunes_dir(o["data_dir"]).resolve()
    o["data_dir"] = str(directory)
    if o["width"] % o["heads"]:
        raise SpecError("task_options.heads", f"must divide width {o['width']}, got {o['heads']}")
    data = _fortunes_data(directory, o["seq_len"], o["n_train"], o["n_val"], o["data_seed"])
    model = functools.partial(
        CharTransformer, VOCAB_SIZE, o["seq_len"], o["width"], o["layers"], o["heads"]
    )
    return model, data


_FORTUNES_OPTIONS = {
    "data_dir": _Option(
        None, f"cookie-file directory (default ${FORTUNES_DIR_ENV} or {DEFAULT_FORTUNES_DIR})", str
    ),
    "seq_len": _Option(64, "characters per sequence (tokens per example)", low=2, high=1024),
    "n_train": _Option(
        8192, "training sequences used: a seeded subset of about 36,000 (more: all)", low=1
    ),
    "n_val": _Option(256, "validation sequences used: a seeded subset of about 4,100", low=1),
    "data_seed": _Option(0, "seed of the training and validation subsets"),
    "width": _Option(64, "model width (embedding size)", low=1, high=4096),
    "layers": _Option(2, "transformer blocks", low=1, high=64),
    "heads": _Option(4, "attention heads (must divide width)", low=1, high=256),
}


SOLO_REASON = (
    "the transformer trains faster one run at a time: vmap has no batching rule for "
    "scaled_dot_product_attention, and written-out attention under vmap measured 2x slower than solo"
)
