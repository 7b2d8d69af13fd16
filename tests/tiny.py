"""Tiny random Llama models and a tokenizer, written to folders, for fast tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def write_tokenizer(folder: Path, vocab_size: int = 96) -> None:
    """A word-level tokenizer whose vocabulary is a-z words plus chat special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>"]
    words = [f"w{i}" for i in range(vocab_size - len(specials) - 4)] + ["user", "assistant", "system", "\n"]
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_start|>", "</s>"])
    fast.chat_template = (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
    )
    fast.save_pretrained(str(folder))


def write_model(folder: Path, *, layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2,
                vocab_size: int = 96, seed: int = 0, tie: bool = False) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=4, pad_token_id=0)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(str(folder))
    write_tokenizer(folder, vocab_size)
    return folder


def write_dataset(path: Path, n: int = 16, seed: int = 0, prompt_only: bool = False) -> Path:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        p = " ".join(f"w{int(i)}" for i in torch.randint(0, 60, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g))
        c = " ".join(f"w{int(i)}" for i in torch.randint(0, 60, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g))
        rows.append({"prompt": p} if prompt_only else {"messages": [{"role": "user", "content": p},
                                                                    {"role": "assistant", "content": c}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- vision-language fixtures -----------------------------------------------------------------------

VL_SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>", "<image>", "<img>", "</img>", "<IMG_CONTEXT>"]
# a chat template that renders content strings and typed parts; an image part is the family's placeholder
_VL_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }} "
    "{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}IMAGE {% elif p['type'] == 'text' %}{{ p['text'] }} {% endif %}"
    "{% endfor %}{% endif %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def _vl_tokenizer(folder: Path, vocab_size: int, image_text: str, **extra) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(vocab_size - len(VL_SPECIALS) - 4)] + ["user", "assistant", "system", "\n"]
    vocab = {t: i for i, t in enumerate(VL_SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_start|>", "</s>", *VL_SPECIALS[6:]],
                                   **extra)
    fast.chat_template = _VL_TEMPLATE.replace("IMAGE", image_text)
    fast.save_pretrained(str(folder))


def write_qwen2vl(folder: Path, *, layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2,
                  vocab_size: int = 96, seed: int = 0, max_pixels: int = 112 * 112, qwen25: bool = False) -> Path:
    """A tiny random Qwen2-VL (or Qwen2.5-VL) with its PIL image processor (patch 14, merge 2)."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    folder.mkdir(parents=True, exist_ok=True)
    half = hidden // heads // 2
    text = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [half - 2 * (half // 4), half // 4, half // 4]},
                bos_token_id=1, eos_token_id=4, pad_token_id=0)
    ids = dict(image_token_id=8, video_token_id=9, vision_start_token_id=6, vision_end_token_id=7,
               tie_word_embeddings=False)
    if qwen25:
        vision = dict(depth=2, hidden_size=16, out_hidden_size=hidden, intermediate_size=32, num_heads=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1])
        config, cls = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids), Qwen2_5_VLForConditionalGeneration
    else:
        vision = dict(depth=2, embed_dim=16, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        config, cls = Qwen2VLConfig(text_config=text, vision_config=vision, **ids), Qwen2VLForConditionalGeneration
    return _save_qwen_vl(folder, cls, config, seed=seed, vocab_size=vocab_size, patch=14, max_pixels=max_pixels)


def _save_qwen_vl(folder: Path, cls, config, *, seed: int, vocab_size: int, patch: int, max_pixels: int) -> Path:
    """A random ``cls(config)`` of the Qwen-VL line, its tokenizer and its PIL image processor in ``folder``."""
    from transformers import Qwen2VLImageProcessorPil

    torch.manual_seed(seed)
    model = cls(config)
    model.generation_config.update(pad_token_id=0, eos_token_id=4, bos_token_id=1)
    model.save_pretrained(str(folder))
    _vl_tokenizer(folder, vocab_size, "<|vision_start|> <|image_pad|> <|vision_end|>")
    Qwen2VLImageProcessorPil(patch_size=patch, temporal_patch_size=2, merge_size=2, min_pixels=(2 * patch) ** 2,
                             max_pixels=max_pixels).save_pretrained(str(folder))
    return folder


def write_qwen3vl(folder: Path, *, layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2,
                  vocab_size: int = 96, seed: int = 0, max_pixels: int = 128 * 128, moe: bool = False) -> Path:
    """A tiny random Qwen3-VL (dense, or Qwen3-VL-MoE: 4 experts, top 2) with its PIL image processor (patch
    16, merge 2). DeepStack features of vision layers 0 and 1 are added after decoder layers 0 and 1."""
    from transformers import (Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLMoeConfig,
                              Qwen3VLMoeForConditionalGeneration)

    folder.mkdir(parents=True, exist_ok=True)
    half = hidden // heads // 2
    text = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_interleaved": True,
                                 "mrope_section": [half - 2 * (half // 4), half // 4, half // 4]},
                bos_token_id=1, eos_token_id=4, pad_token_id=0)
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden, decoder_sparse_step=1)
    vision = dict(depth=2, hidden_size=16, out_hidden_size=hidden, intermediate_size=32, num_heads=2, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                  deepstack_visual_indexes=[0, 1])
    ids = dict(image_token_id=8, video_token_id=9, vision_start_token_id=6, vision_end_token_id=7,
               tie_word_embeddings=False)
    config_cls, cls = ((Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if moe
                       else (Qwen3VLConfig, Qwen3VLForConditionalGeneration))
    config = config_cls(text_config=text, vision_config=vision, **ids)
    return _save_qwen_vl(folder, cls, config, seed=seed, vocab_size=vocab_size, patch=16, max_pixels=max_pixels)


def write_llava(folder: Path, *, layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2,
                vocab_size: int = 96, seed: int = 0, image_size: int = 28) -> Path:
    """A tiny random LLaVA (CLIP vision tower, Llama text) with its processor (CLIP image processor)."""
    from transformers import (AutoTokenizer, CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    folder.mkdir(parents=True, exist_ok=True)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=14, projection_dim=16)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=4, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=10,
                         image_seq_length=(image_size // 14) ** 2, vision_feature_select_strategy="default",
                         vision_feature_layer=-2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.update(pad_token_id=0, eos_token_id=4, bos_token_id=1)
    model.save_pretrained(str(folder))
    _vl_tokenizer(folder, vocab_size, "<image>")
    size = {"height": image_size, "width": image_size}
    images = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size=size)
    LlavaProcessor(image_processor=images, tokenizer=AutoTokenizer.from_pretrained(str(folder)), patch_size=14,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=_VL_TEMPLATE.replace("IMAGE", "<image>")).save_pretrained(str(folder))
    return folder


def write_internvl(folder: Path, *, layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2,
                   vocab_size: int = 96, seed: int = 0, image_size: int = 56) -> Path:
    """A tiny random InternVL 3.5 (InternViT tower, pixel-shuffle projector, Qwen3 text with q/k norms, the
    embedding tied to the output head as in the released models) with its PIL image processor cutting images
    into up to 4 tiles of 56 x 56 (and a thumbnail): 4 <IMG_CONTEXT> tokens a tile, between <img> and </img>."""
    from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  image_size=[image_size, image_size], patch_size=[14, 14], use_qk_norm=False)
    text = dict(model_type="qwen3", vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                head_dim=hidden // heads, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1,
                eos_token_id=4, pad_token_id=0)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=VL_SPECIALS.index("<IMG_CONTEXT>"),
                            image_seq_length=(image_size // 14) ** 2 // 4, downsample_ratio=0.5,
                            tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    with torch.no_grad():  # initialised to zeros, the class token's input is 0 and its layer norm's gradient there
        embeddings = model.model.vision_tower.embeddings  # is rounding amplified by 1/sqrt(eps): trained values
        embeddings.cls_token.normal_(std=0.02)
        embeddings.position_embeddings.normal_(std=0.02)
        for name, p in model.model.vision_tower.named_parameters():  # near-uniform attention (std 0.02) leaves the
            if name.endswith(("q_proj.weight", "k_proj.weight")):  # class token, whose output is dropped, a gradient
                p.mul_(30.0)  # of float32 rounding's size; peaked attention, as in trained towers, gives it a real one
    model.generation_config.update(pad_token_id=0, eos_token_id=4, bos_token_id=1)
    model.save_pretrained(str(folder))
    _vl_tokenizer(folder, vocab_size, "<IMG_CONTEXT>", extra_special_tokens={
        "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"})
    GotOcr2ImageProcessorPil(size={"height": image_size, "width": image_size}, crop_to_patches=True, min_patches=1,
                             max_patches=4).save_pretrained(str(folder))
    return folder


def write_image(path: Path, seed: int, size: tuple[int, int] = (40, 56)) -> Path:
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.RandomState(seed).randint(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_image_dataset(path: Path, n: int = 8, seed: int = 0, prompt_only: bool = False) -> Path:
    """Rows with images: even rows in ms-swift's form (<image> tag + 'images', paths relative to the file),
    odd rows in Hugging Face's typed parts; every third row has no image."""
    g = torch.Generator().manual_seed(seed)

    def words(lo, hi):
        k = int(torch.randint(lo, hi, (1,), generator=g))
        return " ".join(f"w{int(i)}" for i in torch.randint(0, 60, (k,), generator=g))

    rows = []
    for r in range(n):
        image = f"images/{seed}-{r}.png"
        write_image(path.parent / image, seed * 1000 + r, size=(28 + 14 * (r % 3), 56))
        question, answer = words(2, 5), words(1, 5)
        if r % 3 == 2:
            user = {"role": "user", "content": question}
            row = {}
        elif r % 2 == 0:
            user = {"role": "user", "content": f"<image> {question}"}
            row = {"images": [image]}
        else:
            user = {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}
            row = {}
        row["messages"] = [user] if prompt_only else [user, {"role": "assistant", "content": answer}]
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


if __name__ == "__main__":  # python tests/tiny.py FOLDER: a tiny Qwen2-VL and LLaVA pair and an image dataset
    import sys

    root = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-vl")
    write_qwen2vl(root / "qwen2vl-student", seed=2), write_qwen2vl(root / "qwen2vl-teacher", layers=3, seed=1)
    write_llava(root / "llava-student", seed=2), write_llava(root / "llava-teacher", layers=3, seed=1)
    write_image_dataset(root / "data" / "train.jsonl", n=16)
    print(f"wrote {root}: qwen2vl-student, qwen2vl-teacher, llava-student, llava-teacher, data/train.jsonl")


# --- mixture-of-experts fixtures --------------------------------------------------------------------

def write_moe(folder: Path, family: str = "qwen3_moe", *, layers: int = 2, hidden: int = 32, heads: int = 4,
              kv_heads: int = 2, experts: int = 4, top_k: int = 2, vocab_size: int = 96, seed: int = 0,
              aux_coef: float = 0.01) -> Path:
    """A tiny random MoE decoder (Qwen3-MoE, Qwen2-MoE, Mixtral or OLMoE) with the test tokenizer."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, max_position_embeddings=256, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=4, pad_token_id=0, num_experts_per_tok=top_k,
                  router_aux_loss_coef=aux_coef)
    if family in ("qwen3_moe", "qwen2_moe"):
        extra = dict(num_experts=experts, moe_intermediate_size=hidden, intermediate_size=2 * hidden,
                     decoder_sparse_step=1, norm_topk_prob=True)
        if family == "qwen2_moe":
            extra["shared_expert_intermediate_size"] = hidden
    else:  # mixtral, olmoe
        extra = dict(num_local_experts=experts, intermediate_size=hidden)
        if family == "olmoe":
            extra["num_experts"] = experts
    name = {"qwen3_moe": "Qwen3Moe", "qwen2_moe": "Qwen2Moe", "mixtral": "Mixtral", "olmoe": "Olmoe"}[family]
    cfg = getattr(transformers, f"{name}Config")(**common, **extra)
    torch.manual_seed(seed)
    getattr(transformers, f"{name}ForCausalLM")(cfg).save_pretrained(str(folder))
    write_tokenizer(folder, vocab_size)
    return folder
