"""A model's weights as its Hugging Face checkpoint holds them, for engines that load checkpoints (vLLM)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from gkd.models.adapter import adapter_for


def export_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """The student's weights under Hugging Face checkpoint names, one at a time: whole tensors gathered
    from their shards when the model is sharded (every rank must iterate, in the same order; experts split
    by expert parallelism included), LoRA adapters merged (W + scale B A) into copies, the trained model
    untouched. The family's adapter gives the checkpoint's names and layout (a MoE model's fused expert
    tensors become the per-expert tensors its folders hold, which vLLM's loader reads)."""
    adapter = adapter_for(model)
    try:
        from peft import PeftModel
    except ImportError:
        PeftModel = ()
    if not isinstance(model, PeftModel):
        for key, value in model.state_dict().items():
            yield from adapter.checkpoint_tensors(key, _whole(value.detach()))
        return
    base = model.get_base_model()
    lora = {}
    for name, module in base.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            active = [a for a in module.active_adapters if a in getattr(module, "lora_A", {})]
            if active:  # a LoRA linear adapts .weight; a parameter wrapper (MoE experts) its parameter_name
                lora[f"{_unwrapped(name)}.{getattr(module, 'parameter_name', None) or 'weight'}"] = (module, active)
    for key, value in base.state_dict().items():
        if "lora_" in key:
            continue
        key = _unwrapped(key)
        value = _whole(value.detach())
        if key in lora:
            module, active = lora[key]
            with torch.no_grad():
                value = value + sum(_whole(module.get_delta_weight(a)) for a in active)
        yield from adapter.checkpoint_tensors(key, value)


def _unwrapped(name: str) -> str:
    """A weight's name without PEFT's wrapper levels (nested for several parameters of one module)."""
    return re.sub(r"(\.base_layer)+(?=\.|$)", "", name)


def _whole(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t
