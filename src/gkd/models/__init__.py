"""Models: each family's adapter (the one seam every other module uses), loading, pruning, LoRA, export."""

from gkd.models import gpt_oss, internvl, llava, moe, qwen2_vl, qwen3_next, qwen3_vl, text  # noqa: F401 - each family's module registers its adapter
from gkd.models.adapter import Adapter, adapter_for, adapter_for_config, families, text_config, unwrap
from gkd.models.load import (SMOLLM2, apply_lora, check_compatible, eos_ids, freeze_parameters, freeze_vision,
                             frozen_vision, load_image_processing, load_model, load_tokenizer, prune_command, prune_layers,
                             read_config, resolve, save_pretrained_atomic, smollm2_gguf)

__all__ = ["Adapter", "adapter_for", "adapter_for_config", "families", "text_config", "unwrap", "SMOLLM2",
           "apply_lora", "check_compatible", "freeze_parameters", "freeze_vision", "frozen_vision",
           "load_image_processing", "eos_ids", "load_model", "load_tokenizer", "prune_command", "prune_layers", "read_config", "resolve", "save_pretrained_atomic",
           "smollm2_gguf"]
