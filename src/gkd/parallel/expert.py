"""Expert parallelism: a MoE layer's experts split over ``--expert_model_parallel_size`` ranks, tokens sent
to their experts' ranks and back with all-to-all (gloo on CPU, NCCL on GPUs), dropless.

The expert-parallel ranks are data-parallel ranks (each has its own rows), as in torchtitan: the EP
group is carved out of the data-parallel shard ranks, and the experts' other dimension
(``dp_shard / ep`` ranks, "edp") is FSDP-sharded like any weight. The router, attention and dense
weights are untouched here and stay under FSDP over all data-parallel ranks.

Each experts module (the adapter's: fused 3D ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I], GPT-OSS's
transposed with a bias [E, ...] each, its gating the module's own ``_apply_gate``) keeps its tensors as
DTensors sharded on dim 0 over the EP mesh, so checkpoints (DCP) reshard to any EP size and the final export /
vLLM sync gather them like any sharded weight. Its forward becomes:

    count rows per expert -> exchange counts (all-to-all) -> send each (token, k) row to the rank holding its
    expert (all-to-all, uneven splits) -> run the local experts -> send results back (all-to-all) -> weight
    by the router's top-k weights and sum per token, as the unsharded module does.

Every row is computed (no capacity factor, nothing dropped), so the result equals the unsharded module's
up to float summation order. Backward runs the same exchanges in reverse (an autograd function), so
every EP rank must run the same forwards and backwards: the trainer already keeps ranks in lockstep
(every rank joins each micro-batch and each generation step).
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gkd.errors import GKDError
from gkd.models.adapter import adapter_for


class _AllToAll(torch.autograd.Function):
    """Rows exchanged over ``group``: ``send[i]`` rows go to rank i, ``recv[i]`` rows come from it; the
    gradient goes back the same way."""

    @staticmethod
    def forward(ctx, x, recv: list[int], send: list[int], group):
        ctx.recv, ctx.send, ctx.group = recv, send, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        back = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return back, None, None, None


def _local(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _has_bias(experts) -> bool:
    return bool(getattr(experts, "has_bias", False))


def _project(experts, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One expert's projection as transformers' experts modules store it: [out, in] (Qwen, Mixtral), or
    [in, out] where ``is_transposed`` (GPT-OSS), with the expert's bias where it has one (GPT-OSS)."""
    y = rows @ weight if getattr(experts, "is_transposed", False) else F.linear(rows, weight)
    return y if bias is None else y + bias


def _experts_forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                     ) -> torch.Tensor:
    """The experts module's forward on this rank's experts (bound to the module): with EP its rows go to
    their experts' ranks and back; without (tensor parallel, experts replicated) all experts are here."""
    group, ep = self._gkd_ep_group, self._gkd_ep
    gate_up, down = _local(self.gate_up_proj), _local(self.down_proj)  # this rank's experts
    n_local = gate_up.shape[0]
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)  # (token, k) rows grouped by expert, so by destination rank
    token = order // k
    per_expert = torch.bincount(flat, minlength=n_local * ep)
    recv = torch.empty_like(per_expert) if ep > 1 else per_expert  # recv[r, e]: rows rank r sends my expert e
    if ep > 1:
        dist.all_to_all_single(recv, per_expert, group=group)
    recv = recv.view(ep, n_local)
    send_splits, recv_splits = per_expert.view(ep, n_local).sum(1).tolist(), recv.sum(1).tolist()
    x = _AllToAll.apply(hidden[token], recv_splits, send_splits, group) if ep > 1 else hidden[token]
    # received rows come by source rank, then expert: regroup them by local expert
    expert_of = torch.arange(n_local, device=x.device).repeat(ep).repeat_interleave(recv.reshape(-1))
    by_expert = torch.argsort(expert_of, stable=True)
    biases = (_local(self.gate_up_proj_bias), _local(self.down_proj_bias)) if _has_bias(self) else None
    outs = []
    for e, rows in enumerate(x[by_expert].split(recv.sum(0).tolist())):
        h = self._apply_gate(_project(self, rows, gate_up[e], biases and biases[0][e]))
        outs.append(_project(self, h, down[e], biases and biases[1][e]))
    y = torch.cat(outs)
    if y.shape[0] == 0:  # no row for any local expert: keep the weights in the graph so every rank reduces them
        y = y + 0 * sum(_local(p).sum() for p in self.parameters(recurse=False))
    y = torch.zeros_like(y).index_copy(0, by_expert, y)  # back to the received order
    back = _AllToAll.apply(y, send_splits, recv_splits, group) if ep > 1 else y
    back = back * top_k_weights.reshape(-1)[order, None]
    return torch.zeros_like(hidden).index_add_(0, token, back.to(hidden.dtype))


def check_counts(ep: int, name: str, experts: int | None, student: bool = True, lora_experts: bool = False) -> None:
    """One-line errors for ``ep`` and a model with ``experts`` experts per layer (None: a dense model,
    which only a teacher may be: it is then sharded as without EP), and LoRA on the experts (its adapters
    are not split yet)."""
    if experts is None and student:
        raise GKDError(f"--expert_model_parallel_size {ep}: {name} has no experts (a dense model); "
                       "use data parallelism (FSDP) or --tensor_model_parallel_size")
    if experts is not None and experts % ep:
        raise GKDError(f"--expert_model_parallel_size {ep}: {'' if student else 'the teacher '}{name} has {experts} "
                       f"experts per layer, which {ep} does not divide (use a divisor of {experts})")
    if lora_experts and experts is not None:
        raise GKDError(f"--expert_model_parallel_size {ep} with LoRA on the experts is not supported yet; pass "
                       "--lora_experts false (experts and router frozen, the linear layers adapted) or train in full")


def check(model, ep: int, lora_experts: bool = False, student: bool = True) -> None:
    """One-line errors for a model ``ep`` ranks cannot split: a dense student, an expert count ``ep`` does
    not divide, LoRA on the experts (its adapters are not split yet)."""
    adapter = adapter_for(model)
    check_counts(ep, adapter.class_name(model), adapter.num_experts(model), student, lora_experts)


def check_folder(spec: str, ep: int, student: bool = True, lora_experts: bool = False) -> None:
    """``check`` from a model argument's config alone (before any process starts or any weight is read)."""
    from gkd.models import adapter_for_config, read_config, resolve

    folder, gguf = resolve(spec)
    if gguf:  # GGUF folders hold no config.json: the check runs once the model is loaded
        return
    try:
        config = read_config(folder)
    except Exception:  # noqa: BLE001 - an unreadable model is reported where it is loaded
        return
    skeleton = _meta_model(config)
    adapter = adapter_for_config(config)
    check_counts(ep, adapter.class_name(skeleton) if skeleton is not None else config.model_type,
                 adapter.num_experts(skeleton) if skeleton is not None else None, student, lora_experts)


def _meta_model(config):
    """The model of ``config`` on the meta device (its structure only), or None if it cannot be built."""
    import transformers

    from gkd.models import adapter_for_config

    try:
        with torch.device("meta"):
            return getattr(transformers, adapter_for_config(config).auto_class).from_config(config)
    except Exception:  # noqa: BLE001
        return None


def shard_experts(model, ep_mesh, edp_mesh=None, reshard_after_forward: bool | None = None) -> set:
    """Split every experts module of ``model`` over the first dimension of ``ep_mesh`` (ep, or (ep, tp):
    DTensor Shard(0), whole on each TP rank) and dispatch its tokens with all-to-all; with ``edp_mesh``
    (the data-parallel ranks beside EP) the local experts are FSDP-sharded over it too, on dim 1. Returns
    the expert parameters FSDP does not manage (to leave out of the dense FSDP units)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard

    ep, rank = ep_mesh.size(0), ep_mesh.get_local_rank(0)
    placements = [Shard(0)] + [Replicate()] * (ep_mesh.ndim - 1)
    unmanaged = set()
    for module in adapter_for(model).experts(model):
        for name, p in list(module.named_parameters(recurse=False)):
            n = p.shape[0] // ep
            local = _local(p).detach()[rank * n:(rank + 1) * n].clone()  # (TP made it a replicated DTensor)
            sharded = DTensor.from_local(local, ep_mesh, placements, run_check=False)
            module.register_parameter(name, torch.nn.Parameter(sharded, requires_grad=p.requires_grad))
        module._gkd_ep_group, module._gkd_ep = ep_mesh.get_group(0), ep
        module.forward = types.MethodType(_experts_forward, module)
        if edp_mesh is not None:
            fully_shard(module, mesh=edp_mesh, reshard_after_forward=reshard_after_forward,
                        shard_placement_fn=lambda _p: Shard(1))
        else:
            unmanaged.update(module.parameters())
    return unmanaged


def replicated_experts():
    """A tensor-parallel style for an experts module: its weights whole on every TP rank, held as replicated
    DTensors (the optimizer and gradient clipping take one kind of tensor), computed on the local tensors;
    every TP rank routes the same tokens, so each computes the same gradients."""
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor.parallel import ParallelStyle

    class ReplicatedExperts(ParallelStyle):
        def _apply(self, module, mesh):
            for name, p in list(module.named_parameters(recurse=False)):
                whole = DTensor.from_local(p.detach(), mesh, [Replicate()], run_check=False)
                module.register_parameter(name, torch.nn.Parameter(whole, requires_grad=p.requires_grad))
            module._gkd_ep_group, module._gkd_ep = None, 1
            module.forward = types.MethodType(_experts_forward, module)
            return module

    return ReplicatedExperts()


def expert_parameters(model) -> list[torch.Tensor]:
    """The experts' weights (for per-rank memory reports)."""
    return [p for m in adapter_for(model).experts(model) for p in m.parameters()]


def split_experts(model, par, reshard_after_forward: bool | None = None, student: bool = True) -> set:
    """Expert parallelism (experts over the EP ranks, FSDP over the rest); returns the expert weights the
    dense FSDP units must leave alone. A dense teacher beside a MoE student is sharded as without EP."""
    if par.ep == 1:
        return set()
    check(model, par.ep, student=student)
    return shard_experts(model, par.ep_mesh, par.edp_mesh, reshard_after_forward)
