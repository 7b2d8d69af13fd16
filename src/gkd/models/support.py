"""Which model families gkd supports and what works for each (`gkd models`, and the README's table).

Every "yes" is backed by a test that runs over these same rows: one `gkd train` step (full, LoRA) equal to a
naive float64 computation per family (tests/test_families.py), the same at FSDP = 2 and, where the table
says so, TP = 2, PP = 2 and EP = 2 (tests/test_families_dist.py), and vLLM's greedy completions after a weight
sync equal to HF's (tests/test_vllm_families.py). A family not in the table is refused when it is loaded, in
one line; a "no" is refused in one line when asked for. EP is None (n/a) for dense families.
"""

from __future__ import annotations

from gkd.models.adapter import families

COLUMNS = ("full", "LoRA", "FSDP", "TP", "PP", "EP", "vLLM sync")

# what the families are called, by config.model_type
TITLES = {
    "llama": "Llama 2 / 3 / 3.x (SmolLM2)", "mistral": "Mistral", "qwen2": "Qwen2 / Qwen2.5", "qwen3": "Qwen3",
    "smollm3": "SmolLM3", "granite": "Granite", "cohere": "Cohere (Command-R)", "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3 (text)", "phi3": "Phi-3", "olmo2": "OLMo 2", "qwen3_moe": "Qwen3-MoE",
    "qwen2_moe": "Qwen2-MoE", "mixtral": "Mixtral", "olmoe": "OLMoE", "qwen2_vl": "Qwen2-VL",
    "qwen2_5_vl": "Qwen2.5-VL", "llava": "LLaVA",
}


def rows() -> list[dict]:
    """One row per supported ``model_type``: its title, its logit head and a yes / no per column (EP: None,
    not applicable, for a dense family)."""
    out = []
    for adapter in families():
        for model_type in adapter.model_types:
            cells = {"full": True, "LoRA": True, "FSDP": True, "TP": adapter.has_tp_plan, "PP": adapter.pipelines,
                     "EP": True if adapter.moe else None, "vLLM sync": model_type in adapter.vllm_sync}
            out.append({"model_type": model_type, "family": TITLES.get(model_type, model_type),
                        "head": adapter.head_note, **cells})
    order = list(TITLES)
    return sorted(out, key=lambda r: order.index(r["model_type"]) if r["model_type"] in order else len(order))


def markdown() -> str:
    lines = ["| family | model_type | logit head | " + " | ".join(COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(COLUMNS)]
    for r in rows():
        cells = " | ".join("—" if r[c] is None else "yes" if r[c] else "no" for c in COLUMNS)
        lines.append(f"| {r['family']} | `{r['model_type']}` | {r['head']} | {cells} |")
    return "\n".join(lines)
