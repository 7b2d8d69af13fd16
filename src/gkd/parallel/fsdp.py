"""FSDP2 (``fully_shard``) over the data-parallel mesh: replicate x shard, i.e. DDP, FSDP or HSDP.

The units are the adapter's (decoder layers, and a vision tower's blocks): each is gathered for its
forward and freed after it. The student's root unit (the embedding, final norm, lm_head and whatever no
unit holds) is not resharded after forward: the fused loss reads the gathered lm_head weight after the
forward returns and before backward, where FSDP reduce-scatters its gradient.
Gradients are summed, not averaged, over ranks: the loss is already divided by the token count of the
whole optimizer step on every rank (gkd.losses' normalizer), so the sum is the exact global gradient.
"""

from __future__ import annotations

import contextlib
import weakref

from gkd.models.adapter import adapter_for


def shard_student(model, dp_mesh, ignored: set = frozenset()) -> None:
    """``ignored``: weights sharded otherwise (experts split over every EP rank) that FSDP leaves alone."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    shard_units(adapter_for(model).fsdp_units(model), model, dp_mesh, ignored)
    # PEFT's generate calls the wrapped model's generate, not the root's forward: gather for it too
    register_fsdp_forward_method(model, "generate")


def shard_units(units, root, dp_mesh, ignored: set = frozenset()) -> None:
    """Each of ``units`` its own FSDP unit, ``root`` (a model, or a pipeline stage) the unit of the rest,
    kept gathered after its forward; gradients summed. ``ignored``: weights sharded otherwise (experts
    split over every EP rank) that FSDP leaves alone."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    ignored = set(ignored) or None
    for unit in units:
        fully_shard(unit, mesh=dp_mesh, ignored_params=ignored)
    fully_shard(root, mesh=dp_mesh, reshard_after_forward=False, ignored_params=ignored)
    for m in root.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no pre-scaled sum)


def shard_teacher(model, dp_mesh, ignored: set = frozenset(), offload: bool = False) -> None:
    """The teacher's units sharded; its embedding and lm_head stay whole on each rank (or
    vocabulary-sharded by tensor parallelism), so the loss can read the lm_head weight outside any
    forward. Each unit is its own root, which FSDP would keep gathered after forward unless told.
    ``offload``: the units' shards live in CPU memory and FSDP copies each to the device only for its
    all-gather (FSDP2's CPU offload policy)."""
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
    for unit in adapter_for(model).fsdp_units(model):
        fully_shard(unit, mesh=dp_mesh, reshard_after_forward=True, ignored_params=set(ignored) or None,
                    offload_policy=policy)
        if offload:
            _ON_CPU.add(unit)


_ON_CPU = weakref.WeakSet()  # units whose shards FSDP keeps in CPU memory


def materialize(model, device) -> None:
    """A meta-device ``model`` given (uninitialised) memory: on ``device``, except the shards of units
    offloaded to CPU, which FSDP requires to start there."""
    model.to_empty(device=device)
    for unit in model.modules():
        if unit in _ON_CPU:
            unit.to_empty(device="cpu")


def _units(model):
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def sync_gradients(model, last: bool, reduce_scatter_each: bool) -> None:
    """Before a micro-batch's backward: only the step's last one all-reduces over the replicas (HSDP/DDP);
    the others accumulate, which is exact because gradients are summed. The reduce-scatter over the shard
    ranks happens for every micro-batch unless ``reduce_scatter_each`` is off, which keeps whole
    (unsharded) gradients on every rank until the last one: fewer collectives, more memory."""
    for unit in _units(model):
        unit.set_requires_all_reduce(last, recurse=False)
        if not reduce_scatter_each:
            unit.set_requires_gradient_sync(last, recurse=False)


@contextlib.contextmanager
def gathered(model):
    """The model's FSDP units gathered once for a whole generation, instead of once per decoded token
    per layer; resharded (and freed) afterwards."""
    units = _units(model)
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for unit in units:
            unit.set_reshard_after_forward(unit is not model, recurse=False)
            unit.reshard()
