"""LoRA dropout whose masks do not depend on how a step is laid out over processes.

PEFT's LoRA dropout draws each mask from the process's RNG stream, so the same token gets another mask on
another rank, micro-batch or context-parallel split, and a run on 2 processes ends away from one process's.
Here every element's keep/drop is a hash of (seed, step, the adapted module, the sequence's row in the step's
global batch, the token's position in its sequence, the feature): the same for a token wherever it is
computed, in a recomputation under gradient checkpointing too. The step sets the tokens' identities around each
micro-batch's forward and backward (``identities``; a pipeline stage around each micro-batch's forward), and a
checkpointed layer's recomputation runs under the identities its forward saw (``checkpoint_contexts``), whenever
and on whichever thread the backward runs it; a forward with none set (evaluation in training mode) takes PEFT's
own dropout.
"""

from __future__ import annotations

import contextlib
import threading
import zlib

import torch
import torch.nn.functional as F

_context = threading.local()
POSITIONS = 1 << 24  # a row's identity is row * POSITIONS + position


@contextlib.contextmanager
def identities(ids: torch.Tensor, step: int, seed: int):
    """While inside: the tokens of the forward being run are ``ids`` ([B, T] int64, row * POSITIONS +
    position; its shape is the inputs'), at optimizer step ``step`` of a run seeded ``seed``."""
    with _setting((ids, step, seed)):
        yield


@contextlib.contextmanager
def _setting(now):
    saved = getattr(_context, "now", None)
    _context.now = now
    try:
        yield
    finally:
        _context.now = saved


def checkpoint_contexts():
    """torch.utils.checkpoint's ``context_fn``: called at a checkpointed forward, it returns (nothing for the
    forward, the identities set now for its recomputation): a pipeline schedule runs a micro-batch's backward
    after other micro-batches' forwards, and autograd may run it on another thread."""
    return contextlib.nullcontext(), _setting(getattr(_context, "now", None))


def token_identities(batch, first_row: int) -> torch.Tensor:
    """[B, T]: row * POSITIONS + position of each token of ``batch`` (gkd.data.batch.Batch), its sequences being
    rows ``first_row``, ``first_row + 1``, ... of the step's global batch (packed rows: each sequence's own)."""
    ids = torch.zeros(batch.input_ids.shape, dtype=torch.long, device=batch.input_ids.device)
    for s, (b, start, end) in enumerate(batch.sequences()):
        ids[b, start:end] = (first_row + s) * POSITIONS + torch.arange(end - start, device=ids.device)
    return ids


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 64-bit integer hash (splitmix64's finaliser), elementwise, wrapping like C's unsigned arithmetic."""
    x = x ^ ((x >> 30) & 0x3FFFFFFFF)
    x = x * -4658895280553007687  # 0xbf58476d1ce4e5b9 as a signed int64
    x = x ^ ((x >> 27) & 0x1FFFFFFFFF)
    x = x * -7723592293110705685  # 0x94d049bb133111eb
    return x ^ ((x >> 31) & 0x1FFFFFFFF)


def uniforms(ids: torch.Tensor, features: int, step: int, seed: int, key: int, offset: int = 0) -> torch.Tensor:
    """[*ids.shape, features] uniforms in [0, 1), one per (token, feature ``offset`` ...), from the hash of their
    identities."""
    salt = int(_mix(torch.tensor([((seed * 1_000_003 + step) * 1_000_003 + key) % (1 << 63)], dtype=torch.long)))
    feature = torch.arange(offset, offset + features, dtype=torch.long, device=ids.device)
    h = _mix(_mix(ids.unsqueeze(-1) ^ salt) + feature)
    return ((h >> 40) & 0xFFFFFF).to(torch.float32) / float(1 << 24)


class TokenDropout(torch.nn.Module):
    """Drops each element with probability ``p`` by its identity (see the module docstring), scaling the rest
    by 1 / (1 - p) as ``nn.Dropout`` does. ``key`` names the adapted module (its qualified name's CRC)."""

    def __init__(self, p: float, key: int):
        super().__init__()
        self.p, self.key = p, key
        self.offset = 0  # the index of its input's first feature (a tensor-parallel shard's)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        now = getattr(_context, "now", None)
        if not self.training or not self.p:
            return x
        if now is None or now[0].shape != x.shape[:-1]:
            return F.dropout(x, self.p, True)
        ids, step, seed = now
        keep = uniforms(ids, x.shape[-1], step, seed, self.key, self.offset) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, by token"


def use_token_dropout(model) -> int:
    """Replace every LoRA dropout (PEFT's ``nn.Dropout`` in ``lora_dropout``) of ``model`` by a TokenDropout
    keyed by its module's name; returns how many."""
    n = 0
    for name, module in model.named_modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for adapter, drop in list(drops.items()):
            if isinstance(drop, torch.nn.Dropout) and drop.p > 0:
                key = zlib.crc32(name.removeprefix("base_model.model.").encode())
                drops[adapter] = TokenDropout(drop.p, key)
                n += 1
    return n
