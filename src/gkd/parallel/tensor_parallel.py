"""Tensor parallelism (DTensor ``parallelize_module``) with a decoder-layer plan from the model's adapter.

Each family's adapter gives the plan of one decoder layer (gkd.models.text for the Llama-shaped ones);
here the layers are split by it, and the embedding and the lm_head are split over the vocabulary.
Training never calls the lm_head: the loss takes this rank's vocabulary shard of its weight and the
tensor-parallel group (gkd.losses' vocab-parallel path), so the full vocabulary is never gathered. The
lm_head module itself returns replicated logits, for ``generate``.
"""

from __future__ import annotations

import torch

from gkd.errors import GKDError
from gkd.models.adapter import adapter_for, families, output_embeddings, unwrap


def replicated(input_layout, summed_from: int | None = None):
    """A style for norms: weights whole on every rank but held as replicated DTensors (the optimizer and
    gradient clipping take one kind of tensor); activations enter split as ``input_layout`` says and
    leave as plain tensors. Per-head norms (Qwen3's q_norm/k_norm) see only this rank's heads, Shard(2),
    so their weight gradient is a partial sum that DTensor reduces over the group. ``summed_from``: the output
    features from there on feed this rank's heads directly (DeepSeek's shared rotary key, the tail of
    kv_a_proj_with_mqa): their gradient is a partial sum, summed over the group in backward."""
    from torch.distributed.tensor import DTensor, distribute_module
    from torch.distributed.tensor.parallel import ParallelStyle

    class Replicated(ParallelStyle):
        def _apply(self, module, mesh):
            def inputs(_, args, mesh):
                return tuple(DTensor.from_local(a, mesh, [input_layout], run_check=False)
                             if isinstance(a, torch.Tensor) else a for a in args)

            def outputs(_, out, mesh):  # a router returns (logits, weights, expert ids)
                if summed_from is not None:
                    return _TailGradSummed.apply(out.to_local(), summed_from, mesh.get_group())
                return tuple(o.to_local() for o in out) if isinstance(out, tuple) else out.to_local()

            return distribute_module(module, mesh, input_fn=inputs, output_fn=outputs)

    return Replicated()


class _TailGradSummed(torch.autograd.Function):
    """Identity forward; backward sums the gradient of the features from ``start`` on over ``group``."""

    @staticmethod
    def forward(ctx, x, start, group):
        ctx.start, ctx.group = start, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        tail = grad[..., ctx.start:].contiguous()
        dist.all_reduce(tail, group=ctx.group)
        return torch.cat([grad[..., :ctx.start], tail], dim=-1), None, None


def split_norm():
    """A style for a norm over a whole column-split projection (OLMo 2's and OLMoE's q_norm / k_norm span
    every head): its weight split like the projection's columns, its input this rank's columns, and the
    forward run on DTensors, so the mean of squares is summed over the ranks (exactly the whole width's)
    and the output comes back as this rank's columns."""
    from torch.distributed.tensor import DTensor, Shard, distribute_module, distribute_tensor
    from torch.distributed.tensor.parallel import ParallelStyle

    class SplitNorm(ParallelStyle):
        def _apply(self, module, mesh):
            def weights(_name, mod, mesh):
                for name, p in list(mod.named_parameters(recurse=False)):
                    split = distribute_tensor(p.detach(), mesh, [Shard(0)])
                    mod.register_parameter(name, torch.nn.Parameter(split, requires_grad=p.requires_grad))

            def inputs(_, args, mesh):
                return (DTensor.from_local(args[0], mesh, [Shard(-1)], run_check=False), *args[1:])

            def outputs(_, out, mesh):
                return out.redistribute(mesh, [Shard(-1)]).to_local()

            return distribute_module(module, mesh, weights, input_fn=inputs, output_fn=outputs)

    return SplitNorm()


def colwise_parts(*sizes: int):
    """A style for a fused projection whose output the module slices into parts of ``sizes`` columns (Phi-3's
    qkv_proj: q, k, v; gate_up_proj: gate, up): its weight split by output column as stored (checkpoints keep
    their layout), then its output regrouped over the ranks so that each holds its share of every part (its
    heads' q, k and v; its columns of gate and of up), in order, as local-head attention and the next rowwise
    projection take them. Equal parts move with one all-to-all; others are gathered and each rank keeps its
    columns."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle

    class ColwiseParts(ParallelStyle):
        def _apply(self, module, mesh):
            ColwiseParallel(use_local_output=False)._apply(module, mesh)
            n = mesh.size()
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            order = torch.tensor([s + c for r in range(n) for s, size in zip(starts, sizes)
                                  for c in range(r * size // n, (r + 1) * size // n)])

            def regroup(_m, _args, out):
                if len(set(sizes)) == 1:  # [..., parts * m] split by column -> [..., parts, m] split on m
                    by_part = out.unflatten(-1, (len(sizes), sizes[0])).redistribute(mesh, [Shard(out.ndim)])
                    return by_part.to_local().flatten(-2)
                columns = DTensor.from_local(order.to(out.device), mesh, [Replicate()], run_check=False)
                mine = out.redistribute(mesh, [Replicate()]).index_select(-1, columns)
                return mine.redistribute(mesh, [Shard(-1)]).to_local()

            module.register_forward_hook(regroup)
            return module

    return ColwiseParts()


class _LocalHeadCounts:
    """A model config seen with this rank's head counts; everything else read from (and written to) the model's
    own, live (generation switches the attention implementation on it)."""

    def __init__(self, config, n: int):
        object.__setattr__(self, "_whole", config)
        object.__setattr__(self, "num_attention_heads", config.num_attention_heads // n)
        object.__setattr__(self, "num_key_value_heads", config.num_key_value_heads // n)

    def __getattr__(self, name):
        return getattr(self._whole, name)

    def __setattr__(self, name, value):
        setattr(self._whole, name, value)


def local_heads():
    """A style for an attention module whose forward counts heads from its config (Phi-3's slices q, k and v by
    them): it counts this rank's heads."""
    from torch.distributed.tensor.parallel import ParallelStyle

    class LocalHeads(ParallelStyle):
        def _apply(self, module, mesh):
            module.config = _LocalHeadCounts(module.config, mesh.size())
            module.num_key_value_heads //= mesh.size()
            return module

    return LocalHeads()


def replicate_module(module, mesh) -> None:
    """Every rank of ``mesh`` runs ``module`` whole (a vision tower and its projector: tensor-parallel peers hold
    the same rows and images, so they compute the same thing and the same gradients): its weights held as
    replicated DTensors like every other weight (the optimizer takes one kind of tensor), its forward run on
    their local tensors."""
    from torch.distributed.tensor import DTensor, Replicate

    owners = [(sub, name) for sub in module.modules() for name, p in sub.named_parameters(recurse=False)]
    for sub, name in owners:
        p = sub._parameters[name]
        whole = DTensor.from_local(p.detach(), mesh, [Replicate()], run_check=False)
        sub.register_parameter(name, torch.nn.Parameter(whole, requires_grad=p.requires_grad))
    _on_local_weights(module, owners)


def head_parameters():
    """A style for an attention module holding a parameter per head of its own (GPT-OSS's ``sinks`` [heads]):
    split on dim 0 with the heads (this rank's q columns), its forward run on this rank's part."""
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ParallelStyle

    class HeadParameters(ParallelStyle):
        def _apply(self, module, mesh):
            owners = [(module, name) for name, _ in module.named_parameters(recurse=False)]
            for _, name in owners:
                p = module._parameters[name]
                split = distribute_tensor(p.detach(), mesh, [Shard(0)])
                module.register_parameter(name, torch.nn.Parameter(split, requires_grad=p.requires_grad))
            _on_local_weights(module, owners)
            return module

    return HeadParameters()


def _local(_sub, _name, p):
    return _OwnGradient.apply(p.to_local())  # (to_local keeps the autograd link: gradients reach the DTensor)


def _on_local_weights(module, owners, local=_local) -> None:
    """``module``'s forward run with the (submodule, name) parameters in ``owners`` as ``local(submodule, name,
    parameter)`` gives them (by default its local tensor). The class's forward is looked up at each call (gkd's
    packed rows patch it for the duration of a forward); a forward set on the instance is kept."""
    own = module.__dict__.get("forward")

    def on_local_weights(*args, **kwargs):
        held = [(sub, name, sub._parameters[name]) for sub, name in owners]
        try:
            for sub, name, p in held:
                sub._parameters[name] = local(sub, name, p)
            return own(*args, **kwargs) if own is not None else type(module).forward(module, *args, **kwargs)
        finally:
            for sub, name, p in held:
                sub._parameters[name] = p

    module.forward = on_local_weights


class _OwnGradient(torch.autograd.Function):
    """Identity; backward hands on a gradient that is a view as a copy. A weight broadcast over a batch of one
    (InternVL's class token, ``cls_token.expand(1, ...)``) gets a view of another weight's gradient (the position
    embedding's, through the sum they feed): wrapped as the DTensor's gradient without a copy, the first
    micro-batch's gradient would then share memory with the other's, and accumulating into one added every later
    micro-batch to both."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.clone() if grad._is_view() else grad


def gated_deltanet():
    """A style for a Gated DeltaNet linear attention (Qwen3-Next's ``linear_attn``), split by key head: its fused
    in_proj_qkvz / in_proj_ba hold their columns grouped by key head (colwise in the layer's plan gives a rank its
    heads' q, k, v, z, b and a), out_proj is rowwise and the gated norm over each value head sees this rank's rows.
    Here: the per-value-head ``dt_bias`` and ``A_log`` split with their heads; the depthwise conv1d runs over the
    channels [q | k | v] of all heads, so its weight is split as stored and gathered in the forward, where this
    rank takes its heads' channels of each part (the gradient, from this rank's channels only, summed back into the
    split); and the module counts this rank's heads."""
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ParallelStyle

    class GatedDeltaNet(ParallelStyle):
        def _apply(self, module, mesh):
            n, r = mesh.size(), mesh.get_local_rank()
            k, v = module.key_dim, module.value_dim
            q = torch.arange(r * k // n, (r + 1) * k // n)
            channels = torch.cat([q, k + q, 2 * k + torch.arange(r * v // n, (r + 1) * v // n)])
            owners = [(module, "dt_bias"), (module, "A_log"), (module.conv1d, "weight")]
            for sub, name in owners:
                p = sub._parameters[name]
                split = distribute_tensor(p.detach(), mesh, [Shard(0)])
                sub.register_parameter(name, torch.nn.Parameter(split, requires_grad=p.requires_grad))

            def local(sub, name, p):
                if sub is not module.conv1d:
                    return _local(sub, name, p)
                whole = p.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])
                return whole.index_select(0, channels.to(whole.device))

            _on_local_weights(module, owners, local)
            for count in ("num_k_heads", "num_v_heads", "key_dim", "value_dim", "conv_dim"):
                setattr(module, count, getattr(module, count) // n)
            return module

    return GatedDeltaNet()


def styles(plan: dict) -> dict:
    """An adapter's plan (submodule -> style) as DTensor parallel styles."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from gkd.parallel.expert import replicated_experts

    make = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel, "replicated": lambda: replicated(Replicate()),
            "replicated_heads": lambda: replicated(Shard(2)),  # per-head norms see this rank's heads
            "replicated_rows": lambda: replicated(Shard(0)),  # ... or their rows, flattened ([tokens x heads, dim])
            "replicated_tail_summed": lambda start: replicated(Replicate(), start),
            "replicated_experts": replicated_experts, "split_norm": split_norm, "colwise_parts": colwise_parts,
            "local_heads": local_heads, "head_parameters": head_parameters,
            "gated_deltanet": gated_deltanet}
    # a style is a name, or (name, its arguments): ("colwise_parts", q, k, v)
    return {name: make[style[0]](*style[1:]) if isinstance(style, tuple) else make[style]()
            for name, style in plan.items()}


def lora_plan(layer, plan: dict, mesh) -> dict:
    """``plan`` with each LoRA-adapted linear layer (PEFT's: ``base_layer``, ``lora_A``, ``lora_B``) split as the
    layer it adapts: by output column (colwise, colwise_parts), the frozen weight and B alike with A whole (its
    gradient, from every rank's columns, summed by the split); rowwise, the weight and A by input column (A's
    output summed over the ranks) with B whole. The dropout of a rowwise layer's input sees this rank's features:
    their offset."""
    from gkd.models.dropout import TokenDropout

    out = {}
    for name, style in plan.items():
        module = layer.get_submodule(name)
        if not (hasattr(module, "base_layer") and hasattr(module, "lora_A")):
            out[name] = style
            continue
        out[f"{name}.base_layer"] = style
        kind = style[0] if isinstance(style, tuple) else style
        for adapter in module.lora_A:  # (a fused projection's B is regrouped like its weight: colwise_parts)
            a, b = ("rowwise", "replicated") if kind == "rowwise" else ("replicated", style)
            out[f"{name}.lora_A.{adapter}"], out[f"{name}.lora_B.{adapter}"] = a, b
            drop = module.lora_dropout[adapter]
            if style == "rowwise" and isinstance(drop, TokenDropout):
                drop.offset = mesh.get_local_rank() * (module.base_layer.in_features // mesh.size())
    return out


def check_plan(model, tp: int, lora: bool = False, lora_experts: bool = False) -> None:
    """A one-line error for a model tensor parallelism of size ``tp`` cannot split (``lora``: with LoRA adapters,
    on the experts too with ``lora_experts``)."""
    adapter = adapter_for(model)
    name = adapter.class_name(model)
    if lora_experts and adapter.moe:
        raise GKDError(f"--train_type lora with --tensor_model_parallel_size {tp}: LoRA on {name}'s experts is not "
                       "supported yet; pass --lora_experts false")
    if not adapter.has_tp_plan:
        planned = ", ".join(a.name for a in families() if a.has_tp_plan)
        raise GKDError(f"--tensor_model_parallel_size {tp}: no tensor-parallel plan for {name} "
                       f"(plans exist for the families {planned}; use data parallelism)")
    for what, n in adapter.tp_sizes(model).items():
        if n % tp:
            raise GKDError(f"--tensor_model_parallel_size {tp}: {name} has {what} {n}, which {tp} does not divide")


def apply_tensor_parallel(model, tp_mesh) -> None:
    """Shard ``model`` in place over ``tp_mesh``; tied embeddings stay one (vocabulary-sharded) weight."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    adapter = adapter_for(model)
    body = adapter.decoder(model)
    head = output_embeddings(model)
    staged = isinstance(body.layers, torch.nn.ModuleDict)  # a pipeline stage's share (gkd.parallel.pipeline)
    if not staged:
        check_plan(model, tp_mesh.size())
    tied = head is not None and body.embed_tokens is not None and head.weight is body.embed_tokens.weight
    for layer in (body.layers.values() if staged else body.layers):
        parallelize_module(layer, tp_mesh, styles(lora_plan(layer, adapter.tp_layer_plan(layer), tp_mesh)))
    tower, aligner = adapter.vision_tower(model), adapter.aligner(model)
    for part in (tower, aligner):
        if part is not None and not (part is aligner and tower is not None and part in set(tower.modules())):
            replicate_module(part, tp_mesh)
    if body.norm is not None:
        parallelize_module(body.norm, tp_mesh, replicated(Replicate()))
    if head is not None:
        parallelize_module(head, tp_mesh, ColwiseParallel(output_layouts=Replicate()))
    if body.embed_tokens is not None:
        parallelize_module(body.embed_tokens, tp_mesh, RowwiseParallel(input_layouts=Replicate()))
    if tied:
        body.embed_tokens.weight = head.weight
