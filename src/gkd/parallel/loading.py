"""Sharded models read from disk by rank 0 alone.

Every other rank builds the model on the meta device (no memory), all ranks shard that skeleton the
same way, and rank 0 broadcasts the weights tensor by tensor, each rank keeping only its shards
(``set_model_state_dict(..., broadcast_from_rank0=True)``). A rank never holds a whole model, except
rank 0 while it reads one.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from gkd.parallel.fsdp import materialize
from gkd.parallel.mesh import Parallel


def load_sharded(load: Callable, prepare: Callable, shard: Callable, par: Parallel):
    """``prepare(load())`` sharded by ``shard`` (in place), on ``par.device``.

    ``load`` reads the model (rank 0 only); ``prepare`` turns a model into the one to shard (gradient
    checkpointing, LoRA, ...) and runs on rank 0's copy and on every rank's skeleton alike.
    """
    if par.world == 1:
        model = prepare(load()).to(par.device)
        shard(model)
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    base = load() if par.is_main else None
    spec = [None]
    if base is not None:  # the class, config and generation config, and every tensor's dtype as read
        dtypes = {n: t.dtype for n, t in [*base.named_parameters(), *base.named_buffers()]}
        spec = [(type(base), base.config, base.generation_config, dtypes)]
    dist.broadcast_object_list(spec, src=0)
    cls, config, generation_config, dtypes = spec[0]
    skeleton = meta_skeleton(cls, config, generation_config)
    _match_dtypes(skeleton, dtypes)
    skeleton = prepare(skeleton)
    full = prepare(base) if base is not None else None
    shard(skeleton)
    materialize(skeleton, par.device)
    # a pipeline stage takes its own weights from rank 0's whole model and leaves the others' (not strict)
    set_model_state_dict(skeleton, full.state_dict() if full is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                  strict=par.pp == 1))
    # buffers that are not in a state dict (rotary frequencies) came out of to_empty uninitialised: rank 0 sends
    # every one at once (the few small tensors), since pipeline stages hold different ones (Gemma's embed_scale
    # lives on the first stage only)
    from torch.distributed.tensor import DTensor

    sent = [{n: b.cpu() for n, b in full.named_buffers()} if full is not None else None]
    dist.broadcast_object_list(sent, src=0)
    for name, buf in skeleton.named_buffers():
        # a module tensor parallelism distributed holds its buffers as replicated DTensors (Gemma's embed_scale)
        (buf.to_local() if isinstance(buf, DTensor) else buf).copy_(sent[0][name])
    return skeleton


def meta_skeleton(cls, config, generation_config):
    """A model of class ``cls`` on the meta device: its structure with no memory behind it."""
    from gkd.models.adapter import use_exact_attention

    with torch.device("meta"):
        model = cls(config)
    use_exact_attention(model)
    model.generation_config = generation_config  # not rebuilt from config.json: keep the folder's
    return model


def set_buffer(model, name: str, tensor: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner), attr, tensor)


def _match_dtypes(model, dtypes: dict) -> None:
    """Each tensor of the meta ``model`` in the dtype rank 0 read it in: a bfloat16 model keeps float32
    where transformers keeps it (rotary frequencies, modules kept in float32). Parameters keep their
    identity (tied weights stay tied)."""
    for name, p in model.named_parameters():
        p.data = p.data.to(dtypes[name])
    for name, b in list(model.named_buffers()):
        set_buffer(model, name, b.to(dtypes[name]))
