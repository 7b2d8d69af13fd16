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
                vocab_size: int = 96, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=4, pad_token_id=0)
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
