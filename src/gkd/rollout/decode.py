"""The sampler's own decode loop: a static KV cache, grouped-query attention without copied KV heads, and
each row's token drawn from its own seeded uniforms on the device.

HF `generate` does, per new token, work that sampling here does not need: it concatenates a growing KV
cache (every step copies the whole cache), lets SDPA repeat the KV heads of grouped-query attention
whenever there is a mask (left padding always gives one: at batch 32 and 200 positions that copy was
2.5 ms of the 3 ms a layer's attention took on 2 CPU cores), and runs its logits processors and stopping
criteria. This loop calls the same model forward (so any model with a static cache works, its own
layers, norms and rotary unchanged) with a preallocated cache and torch's SDPA grouping the query heads
itself (`enable_gqa`), and samples with a handful of batched tensor operations.

With a few rows per forward (decoding) every linear layer is a matrix times a few vectors, and how it is
written decides its speed, differently on different CPUs and row counts (benchmarks/decode_linear.py): on one
2-core AMD machine MKL's ``(W @ x.T).T`` made a decode at 4 rows twice as fast as torch's ``x @ W.T``, and
oneDNN's product made one at 1, 8 and 16 rows 1.2-1.6x as fast as either; on a 2-core Intel one ``x @ W.T`` was
about as fast as ``(W @ x.T).T``. Sampling times the forms once per model shape and row count on this machine and keeps
the fastest (``few_row_linears``); they agree to float rounding, not bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from gkd.machine import has_onednn, onednn_linear
from gkd.models.onednn import takes_products

GQA_SDPA = "gkd_sdpa_gqa"


def _sdpa_gqa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """HF's SDPA attention, except that the KV heads are never repeated: torch groups the query heads.
    Like HF's, it takes a sliding window from the mask; a learned position bias it cannot take."""
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError("gkd.rollout.decode: attention with a position bias; use HF generate")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(query.shape[2] > 1 and attention_mask is None and causal)
    # a weight-first projection (few_row_linears) leaves the query's last dimension strided, and then torch
    # leaves its fused CPU kernel for the composite one: 3x the time per decoded position (measured, AMD VM)
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
                                         is_causal=causal, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(GQA_SDPA, _sdpa_gqa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GQA_SDPA, sdpa_mask)


def supported(model) -> bool:
    """A plain decoder-only HF model on SDPA with a static cache (Llama, Mistral, Qwen2/3, ...). Others
    (multimodal models with sub-configs, eager or flash attention, remote code) keep HF `generate`."""
    cfg = getattr(model, "config", None)
    return (cfg is not None and not cfg.sub_configs and getattr(cfg, "_attn_implementation", None) == "sdpa"
            and getattr(model, "_can_compile_fullgraph", False))


@contextlib.contextmanager
def _gqa_attention(model):
    _register()
    model.config._attn_implementation = GQA_SDPA
    try:
        yield
    finally:
        model.config._attn_implementation = "sdpa"


# at most this many rows per linear layer take the measured form (decode steps; prompts' prefill and training
# forwards keep F.linear)
FEW_ROWS = 32


def _linear(self, x: torch.Tensor, rows: int) -> torch.Tensor:
    return F.linear(x, self.weight, self.bias)


def _weight_first(self, x: torch.Tensor, rows: int) -> torch.Tensor:
    # x made row-major: element-wise ops on (W @ x.T).T keep its column-major layout (an MLP's down projection
    # gets such an x), and MKL's product with a column-major x took 3-4x as long (measured, AMD VM)
    y = torch.mm(self.weight, x.reshape(rows, x.shape[-1]).contiguous().T).T
    if self.bias is not None:
        y = y + self.bias
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _onednn(self, x: torch.Tensor, rows: int) -> torch.Tensor:
    # on the plain weight: no reordered copy to keep in step with training
    y = onednn_linear(x.reshape(rows, x.shape[-1]).contiguous(), self.weight, self.bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


FORMS = {"linear": _linear, "weight_first": _weight_first, "onednn": _onednn}
_ONEDNN = has_onednn()

# (the layers' weight shapes and dtypes, rows, threads) -> the name of the fastest form on this machine
_FASTEST: dict[tuple, str] = {}


def chosen_forms() -> list:
    """The few-row forms this process has chosen, as JSON: a checkpoint keeps them, so that a resumed run samples
    with the arithmetic the run began with (the forms agree to rounding, not bit for bit; timed afresh, a resumed
    run on a busier machine could choose otherwise)."""
    return [[[[list(shape), str(dtype).removeprefix("torch.")] for shape, dtype in shapes], rows, threads, name]
            for (shapes, rows, threads), name in _FASTEST.items()]


def restore_forms(entries: list) -> None:
    """Take the forms ``chosen_forms`` gave; an entry this torch cannot take (a oneDNN form without oneDNN, a dtype
    it does not know) is left to be timed again."""
    for shapes, rows, threads, name in entries:
        dtypes = [getattr(torch, dtype, None) for _, dtype in shapes]
        if name in FORMS and (name != "onednn" or _ONEDNN) and all(isinstance(d, torch.dtype) for d in dtypes):
            _FASTEST[(tuple((tuple(shape), d) for (shape, _), d in zip(shapes, dtypes)), rows, threads)] = name


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class _FewRowForm:
    """Which form ``layers`` compute a few rows in (``FORMS``): timed once per row count (and thread count) as a
    pass over all their weights in order, as a decode step reads them (one weight timed alone stays in cache and
    misleads), the forms alternating, best of 3 each, and remembered for layers of the same shapes. Off the CPU,
    and for DTensor weights, F.linear."""

    def __init__(self, layers: list[torch.nn.Linear]):
        self.layers = layers
        self.cpu = all(m.weight.device.type == "cpu" and not isinstance(m.weight, DTensor) for m in layers)
        self.shapes = tuple((tuple(m.weight.shape), m.weight.dtype) for m in layers)
        self.known: dict[tuple[int, int], Callable] = {}

    def form(self, rows: int) -> Callable:
        threads = torch.get_num_threads()
        known = self.known.get((rows, threads))  # (asked per layer call: no hashing of the shapes here)
        if known is None:
            key = (self.shapes, rows, threads)
            if self.cpu and key not in _FASTEST:  # (only timed forms are remembered: a checkpoint keeps them)
                _FASTEST[key] = self._time(rows)
            known = self.known[(rows, threads)] = FORMS[_FASTEST[key]] if self.cpu else _linear
        return known

    @torch.no_grad()
    def _time(self, rows: int) -> str:
        seeded = torch.Generator().manual_seed(0)  # (not the global generator: a run's draws stay its own)
        xs = [torch.randn(rows, m.weight.shape[1], generator=seeded).to(m.weight.dtype) for m in self.layers]
        passes = {}
        for name in ("weight_first", "linear", "onednn") if _ONEDNN else ("weight_first", "linear"):
            run = functools.partial(self._pass, FORMS[name], xs, rows)
            try:
                run()  # warm-up
            except RuntimeError:  # (a dtype oneDNN has no product for here)
                continue
            passes[name] = run
        best = dict.fromkeys(passes, float("inf"))
        for _ in range(3):
            for name, run in passes.items():
                best[name] = min(best[name], _seconds(run))
        return min(best, key=best.get)

    def _pass(self, form, xs: list[torch.Tensor], rows: int) -> list[torch.Tensor]:
        return [form(m, x, rows) for m, x in zip(self.layers, xs)]


def _few_row_linear(self, x: torch.Tensor, form, many) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if rows > FEW_ROWS or isinstance(x, DTensor):  # many rows, or tensor parallel (DTensors): the layer's own way
        return F.linear(x, self.weight, self.bias) if many is None else many(x)
    return form(rows)(self, x, rows)


@contextlib.contextmanager
def few_row_linears(*models, form: str = "measured"):
    """Every plain ``nn.Linear`` of ``models`` computes few rows in the fastest of ``FORMS`` on this machine while
    inside (``form``: one of them always, on the CPU, for benchmarks); many rows as outside (F.linear, or
    gkd.models.onednn's products)."""
    layers = [m for model in models for m in model.modules()
              if type(m) is torch.nn.Linear and ("forward" not in vars(m) or takes_products(m))]
    measured = _FewRowForm(layers)
    choose = measured.form if form == "measured" else (lambda rows: FORMS[form] if measured.cpu else _linear)
    before = [vars(m).get("forward") for m in layers]
    for m, many in zip(layers, before):
        m.forward = functools.partial(_few_row_linear, m, form=choose, many=many)
    try:
        yield
    finally:
        for m, many in zip(layers, before):
            if many is None:
                del m.forward
            else:
                m.forward = many


BLOCK = 256


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first token whose cumulative probability exceeds u × total: an exact draw from ``probs``
    [B, V] (float32, unnormalised is fine) for u ~ U(0, 1) [B] (float64).

    Two levels, so that no float32 running sum over the whole vocabulary loses small tokens (near a
    running total of 1 a float32 cumsum steps by ~6e-8: rarer tokens could never be drawn): float64 sums
    of blocks of 256 tokens pick the block, a float64 cumsum inside it the token. Tokens of probability 0
    are never drawn. Rows that are not a distribution (NaN or inf: a diverged model) get some token in range,
    never an index error: the caller reports them."""
    rows, vocab = probs.shape
    pad = -vocab % BLOCK
    blocks = F.pad(probs, (0, pad)).view(rows, -1, BLOCK) if pad else probs.view(rows, -1, BLOCK)
    cdf = blocks.sum(-1, dtype=torch.float64).cumsum(-1)  # [B, blocks]
    total = cdf[:, -1:].contiguous()
    target = u[:, None] * total
    # side=right: the first block whose cumulative mass exceeds the target has nonzero mass; a target
    # rounded up to the total falls back to the last block with mass
    b = torch.searchsorted(cdf, target, right=True)
    b = torch.where(b < cdf.shape[1], b, torch.searchsorted(cdf, total)).clamp(max=cdf.shape[1] - 1)  # (NaN rows)
    before = torch.where(b > 0, cdf.gather(1, (b - 1).clamp(min=0)), 0.0)
    inner = blocks.gather(1, b[:, :, None].expand(-1, 1, BLOCK))[:, 0].double().cumsum(-1)  # [B, BLOCK]
    j = torch.searchsorted(inner, target - before, right=True)
    j = torch.where(j < BLOCK, j, torch.searchsorted(inner, inner[:, -1:].contiguous())).clamp(max=BLOCK - 1)
    return (b * BLOCK + j)[:, 0].clamp(max=vocab - 1)


@torch.no_grad()
def decode(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, pick, eos_ids: list[int],
           pad_id: int, synced: bool = False) -> torch.Tensor:
    """New tokens [B, n <= max_new_tokens] after the left-padded prompts ``ids`` / ``mask``; a row is
    ``pad_id`` after its EOS. ``pick(logits [B, V] float32)`` returns the next token of every row, once per step.
    With ``synced`` every rank keeps stepping until all ranks are done (sharded weights need every
    rank in each forward)."""
    from transformers import StaticCache

    rows, plen = ids.shape
    device = ids.device
    cache = StaticCache(config=model.config, max_cache_len=plen + max_new_tokens)
    attn = torch.cat([mask, mask.new_ones(rows, max_new_tokens)], 1)
    pos = (mask.long().cumsum(1) - 1).clamp(min=0)
    eos = torch.tensor(eos_ids, device=device, dtype=torch.long)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    out = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    next_pos = pos[:, -1:] + 1
    cache_pos = torch.arange(plen + max_new_tokens, device=device)
    # asking whether every row is done makes the host wait for the device: on an accelerator, ask every 8
    # steps (finished rows emit padding meanwhile)
    every = 1 if device.type == "cpu" else 8
    # inference mode skips autograd's bookkeeping of every small op (5 % of a decode on 2 CPU cores, measured); not
    # for sharded weights (synced), whose gathered copies FSDP keeps for training: made here, they could not be
    # written there
    with torch.inference_mode(not synced), _gqa_attention(model):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                       cache_position=cache_pos[:plen], logits_to_keep=1).logits[:, -1]
        n = 0
        while n < max_new_tokens:
            token = torch.where(done, pad_id, pick(logits.float()))
            out[:, n] = token
            done |= torch.isin(token, eos)
            n += 1
            if n == max_new_tokens or (n % every == 0 and _all_done(done, synced)):
                break
            logits = model(input_ids=token[:, None], attention_mask=attn[:, : plen + n], position_ids=next_pos,
                           past_key_values=cache, use_cache=True,
                           cache_position=cache_pos[plen + n - 1 : plen + n]).logits[:, -1]
            next_pos = next_pos + 1
    return out[:, :n]


def _all_done(done: torch.Tensor, synced: bool) -> bool:
    if not synced:
        return bool(done.all())
    left = (~done).any().to(torch.int32)
    torch.distributed.all_reduce(left, op=torch.distributed.ReduceOp.MAX)
    return not bool(left)
