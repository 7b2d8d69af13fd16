"""What a model family must say so that training, the teacher, evaluation and serving can use it.

One adapter per family (gkd.models.text, gkd.models.qwen2_vl, gkd.models.llava). Nothing outside
gkd.models asks a model's class name: code gets the family's adapter with :func:`adapter_for` and asks it
for the text decoder, the final hidden states of a batch, the lm_head weight, the units FSDP shards,
the tensor-parallel plan of a decoder layer, the vision modules and how vLLM names the weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gkd.errors import GKDError

if TYPE_CHECKING:
    from gkd.models.images import ImageProcessing


def text_config(config):
    """The text model's config (a vision-language config holds it as ``text_config``)."""
    return getattr(config, "text_config", None) or config


def unwrap(model):
    """The transformers model under a PEFT wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class Adapter:
    """A family's answers. Subclasses set ``name``, ``model_types`` and override what differs."""

    name = "causal-lm"
    model_types: tuple[str, ...] = ()  # config.model_type values this adapter serves
    auto_class = "AutoModelForCausalLM"  # the transformers auto class that loads the family
    tp_layer_plan_names: tuple[str, ...] = ()  # class names with a tensor-parallel plan (empty: none)

    # --- the text model -------------------------------------------------------------------------

    def decoder(self, model) -> torch.nn.Module:
        """The text transformer body: ``.layers``, ``.embed_tokens``, ``.norm`` (LoRA layers included)."""
        return unwrap(model).get_decoder()

    def lm_head(self, model) -> torch.Tensor:
        """The output projection's weight [V, H] (vocabulary-sharded under tensor parallelism)."""
        return unwrap(model).get_output_embeddings().weight

    def prepare(self, model, inputs: dict) -> dict:
        """The model inputs a forward or ``generate`` takes, from the padded ids, the attention mask and the
        batch's other inputs: a family adds what is aligned with positions and so made after padding."""
        return inputs

    def final_hidden(self, model, inputs: dict) -> torch.Tensor:
        """The decoder's final hidden states [B, T, H] for a batch's model inputs, from a forward through
        the model itself rather than its decoder: vision towers run, and FSDP gathers (and later reduces)
        what the model's root unit owns. One position of logits is computed and dropped: the loss applies
        the lm_head itself, in chunks, never forming [B, T, V]."""
        seen = {}
        hook = self.decoder(model).register_forward_hook(
            lambda _m, _a, out: seen.__setitem__("h", out.last_hidden_state))
        try:
            model(**self.prepare(model, inputs), logits_to_keep=1, use_cache=False)
        finally:
            hook.remove()
        return seen["h"]

    # --- how it is spread over processes --------------------------------------------------------

    def fsdp_units(self, model) -> list[torch.nn.Module]:
        """Modules FSDP shards as units of their own (gathered for their forward, freed after it): by
        default the blocks transformers itself never splits across devices (decoder layers, vision blocks)."""
        base = unwrap(model)
        blocks = set(getattr(base, "_no_split_modules", None) or ())
        return [m for m in base.modules() if type(m).__name__ in blocks]

    def tp_layer_plan(self, layer) -> dict | None:
        """The tensor-parallel plan of one decoder layer ({submodule name: ParallelStyle}), or None when
        the family has none."""
        return None

    @property
    def has_tp_plan(self) -> bool:
        return type(self).tp_layer_plan is not Adapter.tp_layer_plan

    def tp_sizes(self, model) -> dict[str, int]:
        """The sizes tensor parallelism splits, each of which the TP size must divide."""
        c = text_config(unwrap(model).config)
        return {"num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
                "intermediate_size": c.intermediate_size, "vocab_size": self.lm_head(model).shape[0]}

    # --- pipeline parallelism (gkd.parallel.pipeline) -------------------------------------------

    pipelines = False  # whether a stage of this family can run its own share of the decoder layers

    def stage_masks(self, config, hidden, attention_mask, position_ids, cache, layer_ids: list[int]) -> dict:
        """The attention mask each of a stage's layers takes ({layer index: mask}), as the family's body
        builds them for its whole stack: from the 2D padding mask (None: no padding), the positions and
        the stage's KV cache (None when training)."""
        raise NotImplementedError

    # --- vision ---------------------------------------------------------------------------------

    def vision_tower(self, model) -> torch.nn.Module | None:
        """The image encoder (None for text-only families)."""
        return None

    def aligner(self, model) -> torch.nn.Module | None:
        """The projector from image features into the text model's embedding space."""
        return None

    def image_processing(self, folder, tokenizer, config) -> "ImageProcessing | None":
        """How this family turns images into model inputs and image tokens (None: text only)."""
        return None

    def placeholder_ids(self, model) -> list[int]:
        """Token ids that stand for an image (or video) in the ids; never sampled."""
        return []

    @property
    def multimodal(self) -> bool:
        return type(self).image_processing is not Adapter.image_processing

    # --- vLLM -----------------------------------------------------------------------------------

    def vllm_weight_name(self, name: str) -> str:
        """The name vLLM's loader expects for one of our state-dict keys (transformers' own, by default)."""
        return name


_FAMILIES: list[Adapter] = []


def register(adapter: Adapter) -> Adapter:
    _FAMILIES.append(adapter)
    return adapter


def families() -> list[Adapter]:
    from gkd.models import llava, qwen2_vl, text  # noqa: F401 - each module registers its adapter

    return list(_FAMILIES)


def adapter_for_config(config) -> Adapter:
    model_type = getattr(config, "model_type", "")
    for a in families():
        if model_type in a.model_types:
            return a
    return GENERIC


def adapter_for(model) -> Adapter:
    """The adapter of a loaded model (PEFT-wrapped or not)."""
    return adapter_for_config(unwrap(model).config)


def check_text_head(model, where: str) -> None:
    """Refuse families whose logits are not ``hidden @ W.T`` (the fused loss would train on the wrong
    distribution)."""
    text = text_config(unwrap(model).config)
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        value = getattr(text, attr, None)
        if value not in (None, 1, 1.0):
            raise GKDError(f"model {where}: {type(unwrap(model)).__name__} post-processes its logits "
                           f"({attr} = {value}); the fused loss does not apply that yet")


GENERIC = Adapter()
