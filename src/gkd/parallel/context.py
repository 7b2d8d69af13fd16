"""Context parallelism: every sequence of a micro-batch split along its tokens over the cp ranks.

The padded length is cut into 2C equal chunks and rank r keeps chunks r and 2C-1-r: under a causal mask
the early chunks attend to little and the late ones to much, so each rank gets the same work. Attention
stays exact: each layer all-gathers the keys and values of the whole sequence (their gradients are summed
back to the ranks that made them) and masks by the tokens' global positions; rotary embeddings use the
global positions too. The split is plugged into transformers' attention interface as the implementation
"gkd_cp", which falls back to SDPA whenever no split is active (generation, evaluation), so every family
whose attention goes through that interface works, on gloo (CPU) and NCCL alike.

Only what the loss needs is ever whole: the teacher's top-k rows of a remote server arrive whole and are
split exactly as the tokens are.

Vision-language models: a batch with images goes through the model whole up to its language model (every
rank runs the vision tower on all of the micro-batch's images, merges their features into the embeddings and
computes the positions, M-RoPE's included, over whole sequences); a hook on the language model then keeps
this rank's tokens of the embeddings and positions, and the vision tower's own attention is never split.
Each rank's vision gradients come from its own tokens, summed over the ranks like every other weight's.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import torch
import torch.distributed as dist

from gkd.data.batch import Batch

NAME = "gkd_cp"
_active = threading.local()
_unsplit = weakref.WeakSet()  # attention modules that never split (a vision tower's, over its patches)


class _GatherSeq(torch.autograd.Function):
    """All-gather along the sequence dim (2) of [B, heads, T_local, d]; backward sums the gradient over
    the group and keeps this rank's part (gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, rank: int, size: int):
        ctx.group, ctx.rank, ctx.local = group, rank, x.shape[2]
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.narrow(2, ctx.rank * ctx.local, ctx.local), None, None, None


class _SumOverGroup(torch.autograd.Function):
    """The sum of ``x`` over the group; backward sums the gradient over the group too (each rank's loss
    depends on every rank's ``x`` through the sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ContextSplit:
    """One micro-batch's split over the cp group: which global positions this rank holds."""

    def __init__(self, batch: Batch, group, rank: int, size: int):
        self.group, self.rank, self.size = group, rank, size
        B, T = batch.input_ids.shape
        chunk = -(-T // (2 * size))  # ceil: the padded length is a multiple of 2C
        self.length = 2 * size * chunk
        device = batch.input_ids.device
        # the global positions each rank holds, in rank order (the order gathered keys arrive in)
        self.owned = torch.stack([torch.cat([torch.arange(r * chunk, (r + 1) * chunk),
                                             torch.arange((2 * size - 1 - r) * chunk, (2 * size - r) * chunk)])
                                  for r in range(size)]).to(device)
        self.mine = self.owned[rank]
        # keys arrive in rank order; their padding needs no mask: rows are right-padded (collate), so a
        # valid query never reaches its row's padding under the causal mask
        if bool((batch.attention_mask[:, 1:] > batch.attention_mask[:, :-1]).any()):
            raise ValueError("context parallelism needs right-padded rows")
        self.key_pos = self.owned.flatten()
        self.order = torch.argsort(self.key_pos)  # gathered (rank-ordered) tokens -> global order
        self.batch = batch
        # packed rows: attention stays inside each sequence ([B, T_local] and [B, T] sequence numbers)
        self.q_seq = self.k_seq = None
        if batch.position_ids is not None:
            index = batch.sequence_index()
            self.q_seq, self.k_seq = self.local(index, -1), self._padded(index, -1).index_select(1, self.key_pos)

    def local(self, t: torch.Tensor | None, pad=0) -> torch.Tensor | None:
        """This rank's positions of a [B, T, ...] tensor (padded to the split length with ``pad``)."""
        if t is None:
            return None
        return self._padded(t, pad).index_select(1, self.mine)

    def whole(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``local`` part of a [B, T, ...] tensor gathered into the whole (no gradient)."""
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        out = t.new_zeros(t.shape[0], self.length, *t.shape[2:])
        out[:, self.key_pos] = torch.cat(parts, dim=1)
        return out[:, :self.batch.input_ids.shape[1]]

    def _padded(self, t: torch.Tensor, pad) -> torch.Tensor:
        T = t.shape[1]
        if T < self.length:
            t = torch.cat([t, t.new_full((t.shape[0], self.length - T, *t.shape[2:]), pad)], dim=1)
        return t

    def model_inputs(self, teacher: bool = False) -> dict:
        """The local tokens with their positions (no 2D mask: attention masks by position and sequence). With
        images (the ``teacher``'s where its processor makes other inputs) the whole padded sequences instead,
        which the language model's hook cuts to the local tokens (``_local_tokens``)."""
        extra = self.batch.teacher_inputs if teacher and self.batch.teacher_inputs is not None else self.batch.inputs
        if extra:
            whole = {"input_ids": self._padded(self.batch.input_ids, 0), **extra}
            if self.batch.position_ids is not None:
                whole["position_ids"] = self._padded(self.batch.position_ids, 0)
            return whole
        ids = self.local(self.batch.input_ids)
        if self.batch.position_ids is not None:
            return {"input_ids": ids, "position_ids": self.local(self.batch.position_ids)}
        return {"input_ids": ids, "position_ids": self.mine.expand(ids.shape[0], -1)}

    def summed(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the context-parallel ranks, with its gradient (per-sequence sums of their tokens)."""
        return _SumOverGroup.apply(x, self.group)

    @contextlib.contextmanager
    def active(self):
        _active.split = self
        try:
            yield self
        finally:
            _active.split = None

    def attention(self, module, query, key, value, scaling, sliding_window=None, softcap=None, sinks=None):
        """Exact attention of this rank's queries against every key of the sequence."""
        key = _GatherSeq.apply(key, self.group, self.rank, self.size)
        value = _GatherSeq.apply(value, self.group, self.rank, self.size)
        plain = not sliding_window and not softcap and sinks is None
        if query.device.type == "cpu" and plain and self.q_seq is None:
            return self._by_chunks(query, key, value, scaling), None
        q_pos, k_pos = self.mine[:, None], self.key_pos[None, :]
        allowed = k_pos <= q_pos
        if sliding_window:
            allowed = allowed & (q_pos - k_pos < sliding_window)
        if self.q_seq is not None:  # [B, 1, T_local, T]: and the same sequence
            allowed = (allowed & (self.q_seq[:, :, None] == self.k_seq[:, None, :]))[:, None]
        return _masked_attention(query, key, value, allowed, scaling, softcap, sinks), None

    def _by_chunks(self, query, key, value, scaling):
        """Without a [T_local, T] mask: keys in global order, and each of this rank's two query chunks
        attends its causal prefix as a full block plus a causal diagonal block (flash kernels, merged by
        their log-sum-exps)."""
        key, value = key.index_select(2, self.order), value.index_select(2, self.order)
        # the flash kernels take one head size: values narrower than queries and keys (DeepSeek's latent
        # attention) are padded with zeros, which only add zero output columns, cut off after
        width, dv = max(query.shape[-1], value.shape[-1]), value.shape[-1]
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        query, key, value = (t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1]))
                             for t in (query, key, value))
        c = self.length // (2 * self.size)
        outs = []
        for part, j in enumerate((self.rank, 2 * self.size - 1 - self.rank)):
            q = query[:, :, part * c:(part + 1) * c]
            end = (j + 1) * c
            outs.append(_PrefixAttention.apply(q, key[:, :, :end], value[:, :, :end], scaling))
        return torch.cat(outs, dim=2)[..., :dv].transpose(1, 2).contiguous()


class _PrefixAttention(torch.autograd.Function):
    """Causal attention of the last ``Tq`` positions of a prefix of ``Tk`` keys (Tk a multiple of Tq):
    keys before the query block are all visible, the block itself is causal. Two CPU flash-attention
    calls merged by log-sum-exp; backward runs the flash backward of each with the merged output and
    log-sum-exp, which is exact for a softmax over their union (as ring attention does). Grouped keys
    and values are repeated to the query heads only transiently: what is kept for backward is the
    key-value heads' size."""

    @staticmethod
    def forward(ctx, q, k_kv, v_kv, scale):
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        ctx.groups = q.shape[1] // k_kv.shape[1]
        k, v = _repeat(k_kv, ctx.groups), _repeat(v_kv, ctx.groups)
        s = k.shape[2] - q.shape[2]
        out, lse = flash(q, k[:, :, s:], v[:, :, s:], 0.0, True, scale=scale)
        if s:
            out_p, lse_p = flash(q, k[:, :, :s], v[:, :, :s], 0.0, False, scale=scale)
            merged = torch.logaddexp(lse, lse_p)
            out = (out * (lse - merged).exp()[..., None] + out_p * (lse_p - merged).exp()[..., None]).to(q.dtype)
            lse = merged
        ctx.save_for_backward(q, k_kv, v_kv, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k_kv, v_kv, out, lse = ctx.saved_tensors
        k, v = _repeat(k_kv, ctx.groups), _repeat(v_kv, ctx.groups)
        back = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        s = k.shape[2] - q.shape[2]
        grad = grad.contiguous()
        dq, dk, dv = back(grad, q, k[:, :, s:], v[:, :, s:], out, lse, 0.0, True, scale=ctx.scale)
        if s:
            dq_p, dk_p, dv_p = back(grad, q, k[:, :, :s], v[:, :, :s], out, lse, 0.0, False, scale=ctx.scale)
            dq, dk, dv = dq + dq_p, torch.cat([dk_p, dk], dim=2), torch.cat([dv_p, dv], dim=2)
        return dq, _unrepeat(dk, ctx.groups), _unrepeat(dv, ctx.groups), None


def _repeat(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x.repeat_interleave(groups, dim=1) if groups > 1 else x


def _unrepeat(grad: torch.Tensor, groups: int) -> torch.Tensor:
    """The gradient of :func:`_repeat`: each key-value head's query-head copies summed."""
    if groups == 1:
        return grad
    B, H, T, d = grad.shape
    return grad.view(B, H // groups, groups, T, d).sum(2)


def _masked_attention(query, key, value, allowed, scaling, softcap=None, sinks=None):
    """Attention [B, T_q, heads, d] under a boolean mask (True: attended; None: causal, the queries last),
    with the scores soft-capped, ``c * tanh(s / c)``, when ``softcap`` is set (Gemma 2), and a sink logit per
    head in each softmax's denominator (``sinks``, GPT-OSS's, which gives no value), which SDPA cannot."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    Tq, Tk = query.shape[2], key.shape[2]
    if allowed is None:
        allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=query.device).tril(Tk - Tq)
    allowed = allowed[..., :Tk]
    if not softcap and sinks is None:
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling)
        return out.transpose(1, 2).contiguous()
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = query @ key.transpose(-1, -2) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    # the lowest finite score, not -inf: a query with no key (padding) stays finite, as in eager attention
    scores = scores.float().masked_fill(~allowed, torch.finfo(torch.float32).min)
    if sinks is not None:  # the sink's share of each softmax, then dropped
        sink = sinks.float().reshape(1, -1, 1, 1).expand(scores.shape[0], -1, Tq, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1].to(value.dtype)
    else:
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
    return (probs @ value).transpose(1, 2).contiguous()


@contextlib.contextmanager
def whole_sequences():
    """While inside: no split is on, so a forward of whole sequences runs as without context parallelism
    (inside a step's split: a teacher whose tokens are not the student's)."""
    saved = getattr(_active, "split", None)
    _active.split = None
    try:
        yield
    finally:
        _active.split = saved


def _local_tokens(module, args, kwargs):
    """Forward pre-hook of a vision-language model's language model: under a split, whole sequences' embeddings
    (images merged) and positions become this rank's tokens' (a text-only batch arrives already local)."""
    split = getattr(_active, "split", None)
    embeds = kwargs.get("inputs_embeds")
    if split is None or embeds is None or embeds.shape[1] != split.length:
        return None
    positions = kwargs.get("position_ids")
    local = split.mine.expand(embeds.shape[0], -1) if positions is None else \
        positions.index_select(positions.dim() - 1, split.mine)  # [B, T], or M-RoPE's [3 or 4, B, T]
    return args, {**kwargs, "inputs_embeds": embeds.index_select(1, split.mine), "position_ids": local,
                  "attention_mask": None, **local_deepstack(kwargs, split.mine)}


def local_deepstack(kwargs: dict, mine: torch.Tensor) -> dict:
    """Qwen3-VL's DeepStack inputs of this rank's tokens: the image-token mask [B, T] at them, and of each
    layer's features [N, H] (one per image token, row-major) the rows of the image tokens it holds."""
    mask, features = kwargs.get("visual_pos_masks"), kwargs.get("deepstack_visual_embeds")
    if mask is None or features is None:
        return {}
    order = torch.full(mask.shape, -1, dtype=torch.long, device=mask.device)
    order[mask] = torch.arange(int(mask.sum()), device=mask.device)
    local = mask.index_select(1, mine)
    rows = order.index_select(1, mine)[local]
    return {"visual_pos_masks": local, "deepstack_visual_embeds": [f.index_select(0, rows) for f in features]}


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    split = getattr(_active, "split", None) if module not in _unsplit else None
    sinks = kwargs.get("s_aux")  # GPT-OSS's attention sinks
    if split is None and (kwargs.get("softcap") or sinks is not None) and not dropout:
        return _masked_attention(query, key, value, attention_mask, scaling, kwargs.get("softcap"), sinks), None
    if split is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout:
        from gkd.errors import GKDError

        raise GKDError(f"--context_parallel_size: attention dropout ({dropout}) is not supported; the model's "
                       "attention_dropout must be 0 while training")
    return split.attention(module, query, key, value, scaling, kwargs.get("sliding_window"), kwargs.get("softcap"),
                           sinks)


def _on_whole_sequences(module):
    """``module``'s forward for a stateful token mixer: under a split it runs on the whole sequences (their hidden
    states gathered from every rank, in global order; gradients summed back to the ranks that hold them) and keeps
    this rank's tokens of its output. A recurrence cannot be cut at a rank's chunks without the state the chunks
    before it leave, so each rank runs the layer over every token: exact, at C times the layer's (linear-time)
    work; the other layers stay split. Rows are right-padded and the recurrence causal, so the padding mask (which
    only zeroes the padding's own inputs) is left out."""
    def run(*args, **kwargs):
        split = getattr(_active, "split", None)
        if split is None:
            return type(module).forward(module, *args, **kwargs)
        if split.q_seq is not None:
            from gkd.errors import GKDError

            raise GKDError(f"--context_parallel_size with --packing: {type(module).__name__} runs a recurrence per "
                           "packed sequence, which a context-parallel split does not give it yet; pass --packing false")
        kwargs = dict(kwargs, attention_mask=None)
        if "hidden_states" in kwargs:
            hidden = kwargs.pop("hidden_states")
        else:
            hidden, args = args[0], args[1:]
        gathered = _GatherSeq.apply(hidden.unsqueeze(1), split.group, split.rank, split.size).squeeze(1)
        whole = gathered.index_select(1, split.order)
        out = type(module).forward(module, whole, *args, **kwargs)
        return out.index_select(1, split.mine)

    return run


def _mask(*args, **kwargs):
    if getattr(_active, "split", None) is not None:
        return None  # attention masks by global position itself
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def check_context_parallel(model, cp: int) -> None:
    """A one-line error for a model whose sequences cannot be split."""
    from gkd.errors import GKDError
    from gkd.models import adapter_for, unwrap

    adapter = adapter_for(model)
    if adapter.context_gap:
        raise GKDError(f"--context_parallel_size {cp}: {adapter.class_name(model)}: {adapter.context_gap}")
    if not hasattr(unwrap(model).config, "_attn_implementation"):
        raise GKDError(f"--context_parallel_size {cp}: {adapter.class_name(model)} does not take an attention "
                       "implementation")


def use_context_parallel_attention(model) -> None:
    """Route ``model``'s attention through the context-parallel implementation (SDPA when no split is on)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from gkd.models import adapter_for

    adapter = adapter_for(model)
    if adapter.context_gap:  # (a teacher's too: the student's is refused earlier, by check_context_parallel)
        from gkd.errors import GKDError

        raise GKDError(f"--context_parallel_size: {adapter.class_name(model)}: {adapter.context_gap}")
    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, _mask)
    from gkd.models import packed
    from gkd.models.adapter import text_config, unwrap

    mixer = packed.stateful_mixer(getattr(text_config(unwrap(model).config), "model_type", ""))
    for m in model.modules():
        if mixer is not None and isinstance(m, mixer) and "forward" not in m.__dict__:
            m.forward = _on_whole_sequences(m)
    if adapter.multimodal and adapter.vision_tower(model) is not None:  # (a later pipeline stage has none)
        _unsplit.update(adapter.vision_tower(model).modules())
        adapter.decoder(model).register_forward_pre_hook(_local_tokens, with_kwargs=True)
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = NAME
