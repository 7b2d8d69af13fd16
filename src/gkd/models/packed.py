"""Attention over packed rows (--packing) at the cost of each sequence alone.

transformers masks a packed row (positions restarting at 0 for each sequence, no 2D mask) with a dense
[T, T] block-diagonal mask: exact, but SDPA then computes every score of the row, T² for a row of many
sequences where padding-free attention costs the sum of their squares, and takes no causal fast path (and the
mask alone grows as T²). While a packed forward runs, a model on SDPA uses the implementation here instead:
no mask is built, each sequence's queries attend to its own keys with causal SDPA (a sliding window as a
band mask), the pieces put back in place. Families whose attention SDPA cannot express (Gemma 2's score cap)
are on eager attention, where transformers' block-diagonal mask stays; GPT-OSS (eager for its sinks, and whose
body never builds that mask) attends per sequence here too, its sinks in each softmax. Token mixers that carry
state along the row (Qwen3-Next's linear attention: a causal conv1d and a recurrence) run per sequence too
(``PER_SEQUENCE``).
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F

NAME = "gkd_sdpa_packed"
# families on eager attention whose bodies build their masks without the positions (so transformers' packed
# mask never forms) and whose scores the per-sequence path computes exactly: GPT-OSS (its sinks)
EAGER_TYPES = {"gpt_oss"}


def segments(positions: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each run of positions counting up from 0."""
    starts = (positions == 0).nonzero()[:, 0].tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return list(zip(starts, [*starts[1:], len(positions)]))


_found = threading.local()  # the forward's packed positions and their spans per row, found at the first layer


def _spans(positions: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Each row's ``segments``: every layer of a forward gets the same positions, so they are read once."""
    if getattr(_found, "positions", None) is not positions:
        _found.positions, _found.spans = positions, [segments(row) for row in positions]
    return _found.spans


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    if kwargs.get("softcap") or kwargs.get("position_bias") is not None or query.shape[2] != key.shape[2]:
        raise NotImplementedError(f"gkd.models.packed: {type(module).__name__} needs a score cap, a position "
                                  "bias or a cache, which per-sequence SDPA does not take")
    window = kwargs.get("sliding_window")
    sinks = kwargs.get("s_aux")  # GPT-OSS: a logit per head in each softmax's denominator
    grouped = key.shape[1] != query.shape[1]
    rows = []
    for b, spans in enumerate(_spans(kwargs["position_ids"])):
        pieces = []
        for start, end in spans:
            q, k, v = (t[b:b + 1, :, start:end] for t in (query, key, value))
            n = end - start
            mask = None
            if window and n > window:  # keys within the window behind each query (transformers' q - k < w)
                i = torch.arange(n, device=query.device)
                mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
            if sinks is not None:
                pieces.append(_with_sinks(q, k, v, mask, sinks, dropout, scaling))
                continue
            pieces.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                         is_causal=mask is None, scale=scaling, enable_gqa=grouped))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def _with_sinks(q, k, v, mask, sinks, dropout, scaling):
    """One sequence's causal attention with a sink logit per head beside its keys (SDPA has no place for it):
    the sink takes its share of the softmax and gives no value, as transformers' eager GPT-OSS attention."""
    n, groups = q.shape[2], q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(2, 3) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    if mask is None:
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    logits = torch.cat([scores, sinks.reshape(1, -1, 1, 1).expand(1, -1, n, 1).to(scores.dtype)], dim=-1)
    probs = torch.softmax(logits - logits.amax(-1, keepdim=True), dim=-1)[..., :-1]
    return F.dropout(probs, p=dropout).to(v.dtype) @ v


# token mixers that carry state along a row (a recurrence, a causal conv1d), by model type: "module:class". Under
# packing each runs on every sequence alone, from a zero state, so that none reads the previous sequence's tokens
PER_SEQUENCE: dict[str, str] = {}


def _per_sequence(forward, spans: list[list[tuple[int, int]]]):
    def run(module, hidden_states, *args, **kwargs):
        if getattr(_found, "inside", False):  # (the original forward may call forward again through its decorators)
            return forward(module, hidden_states, *args, **kwargs)
        if args or kwargs.get("cache_params") is not None or kwargs.get("attention_mask") is not None:
            raise NotImplementedError(f"gkd.models.packed: {type(module).__name__} with a cache or a mask")
        _found.inside = True
        try:
            rows = [torch.cat([forward(module, hidden_states[b:b + 1, start:end], **kwargs) for start, end in row], 1)
                    for b, row in enumerate(spans)]
        finally:
            _found.inside = False
        return torch.cat(rows)
    return run


def stateful_mixer(model_type: str):
    """The class of the model type's stateful token mixers (``PER_SEQUENCE``), or None."""
    if model_type not in PER_SEQUENCE:
        return None
    import importlib

    where, _, name = PER_SEQUENCE[model_type].partition(":")
    return getattr(importlib.import_module(where), name)


@contextlib.contextmanager
def _sequence_mixers(model_type, positions: torch.Tensor):
    """While inside: the model type's stateful token mixers (``PER_SEQUENCE``) run per packed sequence."""
    cls = stateful_mixer(model_type)
    if cls is None:
        yield
        return
    if positions is None:  # (a pipeline stage's packed forward: its positions are not here)
        raise NotImplementedError(f"gkd.models.packed: {model_type}'s packed rows need their positions")
    forward, cls.forward = cls.forward, _per_sequence(cls.forward, [segments(row) for row in positions])
    try:
        yield
    finally:
        cls.forward = forward


def _no_mask(*args, **kwargs):
    return None  # attention keeps to each sequence by its positions: no [T, T] mask is built


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, _attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, _no_mask)


@contextlib.contextmanager
def packed_attention(config, inputs: dict):
    """While inside: the model of text config ``config`` (on SDPA) attends per sequence when ``inputs`` are
    packed rows (position ids given, no attention mask); otherwise nothing changes. (A vision tower keeps its
    own attention.)"""
    impl = config._attn_implementation
    served = impl == "sdpa" or (impl == "eager" and getattr(config, "model_type", None) in EAGER_TYPES)
    if "position_ids" not in inputs or "attention_mask" in inputs or not served:
        yield
        return
    _register()
    config._attn_implementation = NAME
    try:
        with _sequence_mixers(getattr(config, "model_type", None), inputs["position_ids"]):
            yield
    finally:
        config._attn_implementation = impl
        _found.positions = _found.spans = None  # (the next forward's positions may reuse this memory)
