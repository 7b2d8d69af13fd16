"""What a model family must say so that training, the teacher, evaluation and serving can use it.

One adapter per family (gkd.models.text, gkd.models.moe, gkd.models.qwen2_vl, gkd.models.llava). Nothing outside
gkd.models asks a model's class name: code gets the family's adapter with :func:`adapter_for` and asks it
for the text decoder, the final hidden states of a batch, the lm_head weight, the units FSDP shards,
the tensor-parallel plan of a decoder layer, the expert modules and routers, the vision modules and how vLLM names the weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gkd.errors import GKDError
from gkd.losses import LogitHead
from gkd.models.packed import packed_attention

if TYPE_CHECKING:
    from gkd.models.images import ImageProcessing


def text_config(config):
    """The text model's config (a vision-language config holds it as ``text_config``)."""
    return getattr(config, "text_config", None) or config


def layer_attention(config, i: int) -> str:
    """A layer's attention kind as these bodies choose its mask: Qwen2/Qwen3 by ``layer_types``, Mistral
    slides every layer when it has a window, Llama never."""
    types = getattr(config, "layer_types", None)
    if types:
        return types[i]
    return "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"


def unwrap(model):
    """The transformers model under a PEFT wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_embeddings(model):
    """The lm_head module (None where a pipeline stage dropped it). transformers finds it only while it finds
    the input embeddings, which a vision-language model's later pipeline stages no longer hold."""
    base = unwrap(model)
    head = base.get_output_embeddings()
    return head if head is not None else getattr(base, "lm_head", None)


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
        return output_embeddings(model).weight

    # Config attributes of the text config that post-process logits. ``head_attrs``: those
    # :meth:`head_form` applies; ``inner_attrs``: those the model applies inside its own forward (attention
    # logit softcapping), which final_hidden runs. A logit-like attribute in neither is refused on load.
    head_attrs: tuple[str, ...] = ()
    inner_attrs: tuple[str, ...] = ()
    head_note = "h·Wᵀ"  # the head in a few symbols, for `gkd models`
    # model types whose weight sync into vLLM is tested (tests/test_vllm_families.py runs over these)
    vllm_sync: tuple[str, ...] = ()
    vllm_blocker = ""  # why the others are not synced, for check_vllm's refusal

    def attention(self, config) -> str | None:
        """The attention implementation the family's forward is exact with, from its text config, where
        transformers' default (SDPA) is not; None: the default."""
        return None

    def head_form(self, config) -> dict:
        """The family's logit transform after the product, from its text config: ``LogitHead``'s
        ``scale`` / ``scale_hidden`` / ``softcap`` (none by default)."""
        return {}

    def logit_head(self, model) -> LogitHead:
        """How the model turns final hidden states into logits: the lm_head's weight and bias
        (vocabulary-sharded under tensor parallelism; read after the forward that gathers them under FSDP)
        and the family's transform. Every caller that forms logits or a loss goes through this."""
        return self.head_of(output_embeddings(model), text_config(unwrap(model).config))

    def head_of(self, lm_head: torch.nn.Module, config) -> LogitHead:
        """``logit_head`` from the lm_head module and the text config (a pipeline's last stage holds both)."""
        return LogitHead(lm_head.weight, getattr(lm_head, "bias", None), **self.head_form(config))

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
        # the model's own outputs are not used; detached before FSDP sees them, none of them can start the
        # root's backward hooks (LLaVA returns its image features: only ranks with images would run them)
        quiet = model.register_forward_hook(_detached, prepend=True)
        try:
            with packed_attention(text_config(unwrap(model).config), inputs):
                model(**self.prepare(model, inputs), logits_to_keep=1, use_cache=False)
        finally:
            hook.remove()
            quiet.remove()
        if self._untouched_vision(model, inputs):
            # sharded training sums gradients over ranks only for the weights each rank's backward reached:
            # a batch without images still sends a blank one through the trainable vision weights, times 0
            # (only the features the text model would take: every rank's backward must reach the same weights)
            return seen["h"] + 0.0 * _float_sum(self.blank_outputs(model))
        return seen["h"]

    def _untouched_vision(self, model, inputs: dict) -> bool:
        if not self.multimodal or "pixel_values" in inputs or not torch.is_grad_enabled():
            return False
        import torch.distributed as dist

        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return False
        parts = [m for m in (self.vision_tower(model), self.aligner(model)) if m is not None]
        return any(p.requires_grad for m in parts for p in m.parameters())

    def blank_outputs(self, model):
        """The vision features of a blank image that the text model would take (to reach every vision weight)."""
        return unwrap(model).model.get_image_features(**self.blank_image(model)).pooler_output

    def blank_image(self, model) -> dict:
        """The smallest image's model inputs (zeros), for the family's get_image_features."""
        raise NotImplementedError

    # --- how it is spread over processes --------------------------------------------------------

    def fsdp_units(self, model) -> list[torch.nn.Module]:
        """Modules FSDP shards as units of their own (gathered for their forward, freed after it): by
        default the blocks transformers itself never splits across devices (decoder layers, vision blocks)."""
        base = unwrap(model)
        blocks = set(getattr(base, "_no_split_modules", None) or ())
        return [m for m in base.modules() if type(m).__name__ in blocks]

    def tp_layer_plan(self, layer) -> dict | None:
        """The tensor-parallel plan of one decoder layer ({submodule name: style name, or (style name, its
        arguments)}, the names gkd.parallel.tensor_parallel.styles knows), or None when the family has none."""
        return None

    @property
    def has_tp_plan(self) -> bool:
        return type(self).tp_layer_plan is not Adapter.tp_layer_plan

    def tp_sizes(self, model) -> dict[str, int]:
        """The sizes tensor parallelism splits, each of which the TP size must divide."""
        c = text_config(unwrap(model).config)
        return {"num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
                "intermediate_size": c.intermediate_size, "vocab_size": self.lm_head(model).shape[0]}

    # --- mixture of experts -----------------------------------------------------------------------

    def experts(self, model) -> list[torch.nn.Module]:
        """The modules holding a MoE layer's expert weights as 3D tensors ([E, ...] each), called as
        ``experts(hidden [N, H], top_k_index [N, k], top_k_weights [N, k])``; empty for dense families."""
        return []

    def routers(self, model) -> list[torch.nn.Module]:
        """The routers, one per MoE layer in layer order, each returning (logits [N, E], weights [N, k],
        expert ids [N, k]) for the flattened tokens of its input."""
        return self.routers_of(self.decoder(model).layers)

    def routers_of(self, layers) -> list[torch.nn.Module]:
        """The routers of some decoder layers (a pipeline stage's), in layer order; none for dense families."""
        return []

    @property
    def moe(self) -> bool:
        return type(self).experts is not Adapter.experts

    def num_experts(self, model) -> int | None:
        """Experts per MoE layer (None for dense families)."""
        experts = self.experts(model)
        return experts[0].gate_up_proj.shape[0] if experts else None

    @staticmethod
    def class_name(model) -> str:
        """The model's class, for messages (e.g. LlamaForCausalLM)."""
        return type(unwrap(model)).__name__

    def router_aux_loss_coef(self, model) -> float:
        """The config's weight of the router load-balancing loss (0 for dense families)."""
        return 0.0

    # LoRA on the experts ("all-linear"): None lets PEFT pick them; else the expert tensors named here are
    # adapted, and PEFT's renaming of transformers-4 targets is kept off (gkd.models.load.apply_lora)
    lora_expert_parameters: tuple[str, ...] | None = None

    # --- pipeline parallelism (gkd.parallel.pipeline) -------------------------------------------

    # what keeps a stage of this family from running its own share of the decoder layers exactly, as the
    # one-line refusal of --pipeline_model_parallel_size says it; empty: the family pipelines
    pipeline_gap = "no adapter says how a stage runs its layers"
    # why a context split would not give the whole sequence's result (refused in one line); empty: it does
    context_gap = ""

    @property
    def pipelines(self) -> bool:
        return not self.pipeline_gap

    def pipeline_refusal(self, config) -> str:
        """Why a model of ``config`` cannot be split into stages ("" when it can): the family's gap, or a
        setting of this model the stages do not follow."""
        return self.pipeline_gap

    def stage_masks(self, config, hidden, attention_mask, position_ids, cache, layer_ids: list[int]) -> dict:
        """The attention mask each of a stage's layers takes ({layer index: mask}), as the family's body
        builds them for its whole stack: from the 2D padding mask (None: no padding), the positions and
        the stage's KV cache (None when training). By default as the Llama-shaped bodies do: causal, or
        sliding by ``layer_attention``."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        made, out = {}, {}
        for i in layer_ids:
            kind = layer_attention(config, i)
            if kind not in made:  # the cache sizes of this kind come from the stage's first such layer
                make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
                kw = {"layer_idx": i} if cache is not None else {}
                made[kind] = make(config=config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  past_key_values=cache, position_ids=position_ids, **kw)
            out[i] = made[kind]
        return out

    def stage_embed(self, config, embed_tokens: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """The first stage's hidden states from the token ids, as the family's body makes them before its
        first layer (an embedding that scales itself, Gemma's, needs nothing more)."""
        return embed_tokens(ids)

    def stage_rotary(self, config, rotary_emb: torch.nn.Module, hidden, position_ids, layer_ids: list[int]) -> dict:
        """The rotary embedding each of a stage's layers takes ({layer index: (cos, sin)}), as the family's
        body computes it: one for every layer by default."""
        return dict.fromkeys(layer_ids, rotary_emb(hidden, position_ids))

    def stage_positions(self, position_ids: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(the positions a stage's masks and layers take, those its rotary embedding takes) from the positions
        a stage is given: the same by default; a family with multimodal positions splits them."""
        return position_ids, position_ids

    def stage_position_ids(self, model, ids: torch.Tensor, attention_mask: torch.Tensor, inputs: dict):
        """(the positions every stage takes for a batch with its other inputs, as the family's forward makes
        them; each row's offset of the positions after them, as generate continues them [B, 1]); (None, None):
        plain text positions, counted by the attention mask."""
        return None, None

    def stage_images(self, model, ids: torch.Tensor, embeds: torch.Tensor, inputs: dict) -> tuple[torch.Tensor, dict]:
        """The first stage's embeddings with the images' features in place of their placeholder tokens, as the
        family's forward merges them (its own get_image_features runs the tower and the aligner), and what the
        first stage's layers take besides (``after_layer``; {} by default)."""
        if not self.multimodal:
            return embeds, {}
        base = unwrap(model)
        if "pixel_values" not in inputs:
            if not self._untouched_vision(model, inputs):
                return embeds, {}
            # as final_hidden: every rank's backward reaches the tower
            return embeds + 0.0 * _float_sum(self.blank_outputs(model)), {}
        images = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
        out = base.model.get_image_features(**images, return_dict=True)
        features = torch.cat(list(out.pooler_output)).to(embeds.device, embeds.dtype)
        slots = (ids == self.placeholder_ids(model)[0])[..., None].expand_as(embeds)
        if int(slots.sum()) != features.numel():
            raise GKDError(f"{int(slots[..., 0].sum())} image tokens in the ids but {features.shape[0]} image "
                           "features: the rows' images and their placeholder tokens disagree")
        return embeds.masked_scatter(slots, features), self.layer_inputs(out, slots[..., 0], embeds)

    def layer_inputs(self, image_features, image_tokens: torch.Tensor, embeds: torch.Tensor) -> dict:
        """What decoder layers take from the images beside the merged embeddings (the family's forward passes it
        to its text model; ``image_tokens`` [B, T] marks the image tokens): nothing by default."""
        return {}

    def stage_first_layers(self, config) -> int:
        """How many of the first decoder layers must sit on the first pipeline stage, which alone makes what
        they take (``layer_inputs``): none by default."""
        return 0

    def after_layer(self, i: int, hidden: torch.Tensor, given: dict) -> torch.Tensor:
        """The hidden states after decoder layer ``i`` as the family's text model passes them on, given the
        first stage's ``layer_inputs``: unchanged by default."""
        return hidden

    def vision_modules(self, model) -> list[torch.nn.Module]:
        """The vision tower and the aligner (the aligner alone where it is not inside the tower)."""
        tower, aligner = self.vision_tower(model), self.aligner(model)
        inside = tower is not None and aligner is not None and aligner in set(tower.modules())
        return [m for m in (tower, None if inside else aligner) if m is not None]

    def drop_vision(self, model) -> None:
        """Drop the vision modules from a model whose share holds no first stage (the checkpoint loads without
        them, as it does without the embedding)."""
        base = unwrap(model)
        names = {id(m): n for n, m in base.named_modules()}
        for part in self.vision_modules(model):
            owner, _, attr = names[id(part)].rpartition(".")
            setattr(base.get_submodule(owner), attr, None)

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

    # whether sequences packed in one row (their positions restarting at 0, no 2D mask) run exactly: transformers
    # confines attention to each by the positions; a family with other positions (M-RoPE) makes them per sequence
    packs = True

    # --- vLLM -----------------------------------------------------------------------------------

    def vllm_weight_name(self, name: str) -> str | None:
        """The name vLLM's loader expects for one of our state-dict keys (transformers' own, by default), or
        None for a weight vLLM's model does not have."""
        return name

    def checkpoint_tensors(self, name: str, tensor: torch.Tensor):
        """(name, tensor) pairs as the family's Hugging Face folders store one of our state-dict entries
        (what ``save_pretrained`` writes and vLLM loads); the entry itself by default, under the name vLLM
        takes, and nothing for a weight vLLM's model does not have."""
        name = self.vllm_weight_name(name)
        if name is not None:
            yield name, tensor


def _detached(_module, _args, out):
    if hasattr(out, "items"):
        for key, value in list(out.items()):
            if isinstance(value, torch.Tensor):
                out[key] = value.detach()
    return out


def _float_sum(out) -> torch.Tensor:
    """The sum of every floating tensor in a model output (a tensor, a tuple, a ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out.float().sum() if out.is_floating_point() else out.new_zeros((), dtype=torch.float32)
    values = out.values() if hasattr(out, "values") else out if isinstance(out, (tuple, list)) else ()
    return sum((_float_sum(v) for v in values), torch.zeros(()))


def vision_outside_units(adapter: Adapter, model) -> list[torch.nn.Module]:
    """The decoder layers alone: a vision tower runs only for micro-batches with images, so a rank without
    one would skip its blocks' gathers while another waits in them; left to the root unit, which every
    forward gathers, the tower costs no collective of its own. (A pipeline stage's share of the layers is a
    ModuleDict keyed by layer index.)"""
    layers = adapter.decoder(model).layers
    return list(layers.values() if isinstance(layers, torch.nn.ModuleDict) else layers)


_FAMILIES: list[Adapter] = []


def register(adapter: Adapter) -> Adapter:
    _FAMILIES.append(adapter)
    return adapter


def families() -> list[Adapter]:
    """Every registered family (gkd.models imports each family's module, which registers its adapter)."""
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


def check_vllm(model, flag: str = "--use_vllm") -> None:
    """Refuse vLLM sampling for a family whose weight sync into vLLM is not verified (`gkd models`)."""
    base = unwrap(model)
    family = getattr(base.config, "model_type", "")
    if family not in adapter_for(base).vllm_sync:
        synced = ", ".join(t for a in families() for t in a.vllm_sync)
        why = f" ({adapter_for(base).vllm_blocker})" if adapter_for(base).vllm_blocker else ""
        raise GKDError(f"{flag}: weight sync into vLLM is not verified for {family} ({type(base).__name__}){why}; "
                       f"leave {flag} off (HF generate samples) — vLLM sampling is verified for {synced}")


def check_packing(model, flag: str = "--packing") -> None:
    """Refuse packed rows for a family whose positions are not a plain count per sequence (`gkd models`)."""
    base = unwrap(model)
    if not adapter_for(base).packs:
        raise GKDError(f"{flag}: packed rows are not supported for {getattr(base.config, 'model_type', '')} "
                       f"({type(base).__name__}): its image tokens and multimodal positions are laid out per row; "
                       f"leave {flag} off")


def supported_types() -> list[str]:
    return [t for a in families() for t in a.model_types]


def _logit_like(name: str) -> bool:
    return "logit" in name or "softcap" in name


def use_exact_attention(model) -> None:
    """Switch ``model`` to the attention implementation its family needs (see ``Adapter.attention``); every
    place that builds a model calls this, so the student, the teacher, a stage and an export agree."""
    impl = adapter_for(model).attention(text_config(unwrap(model).config))
    if impl is not None and unwrap(model).config._attn_implementation != impl:
        unwrap(model).set_attn_implementation(impl)


@torch.no_grad()
def check_head(model, where: str) -> None:
    """Refuse, in one line, a model whose logits the fused loss would not reproduce: a family with no
    adapter, a logit-like config attribute its adapter does not know, or a forward whose logits differ
    from the adapter's head description on a probe (a subclass or a changed forward that transforms them).
    Training on such a model would silently distil the wrong distribution."""
    base = unwrap(model)
    config, cls = base.config, type(base).__name__
    family = getattr(config, "model_type", "") or cls
    adapter = adapter_for_config(config)
    if adapter is GENERIC:
        raise GKDError(f"model {where}: the {family} family ({cls}) is not supported: no adapter describes its "
                       f"logit head and layers (supported: {', '.join(supported_types())}; see gkd models)")
    text = text_config(config)
    for attr, value in sorted(text.to_dict().items()):
        if _logit_like(attr) and attr not in adapter.head_attrs + adapter.inner_attrs \
                and value not in (None, False, 1, 1.0):
            raise GKDError(f"model {where}: {family} ({cls}) has {attr} = {value}, a logit transform gkd's "
                           f"{family} adapter does not describe; training would distil the wrong distribution")
    if base.get_output_embeddings() is None:
        raise GKDError(f"model {where}: {family} ({cls}) has no output embeddings (lm_head) to distil through")
    if any(p.is_meta for p in base.parameters()):
        return
    head = adapter.logit_head(base)
    ids = torch.arange(1, 6, device=head.weight.device)[None] % head.weight.shape[0]
    seen, training = {}, base.training
    hook = adapter.decoder(base).register_forward_hook(lambda _m, _a, out: seen.__setitem__("h", out.last_hidden_state))
    try:
        theirs = base.eval()(**adapter.prepare(base, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}),
                             use_cache=False).logits.float()
    finally:
        hook.remove()
        base.train(training)
    ours = head.logits(seen["h"]).float()
    tol = 1e-4 if head.weight.dtype in (torch.float32, torch.float64) else 2e-2
    err = float((ours - theirs).abs().max())
    if not err <= tol * (1 + float(theirs.abs().max())):
        raise GKDError(f"model {where}: {family} ({cls}) computes logits its adapter's head description does not "
                       f"give (max difference {err:.3g} on a probe): its forward transforms them in a way gkd does "
                       "not know; training would distil the wrong distribution")


GENERIC = Adapter()
