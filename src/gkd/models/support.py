"""Which model families gkd supports and what works for each (`gkd models`, docs/models.md's table).

Two sources, kept equal by tests/test_table.py: what gkd's adapters implement (``implemented``: the layouts a
run accepts; everything else is refused in one line when asked for), and what the tests proved
(``proofs.json``: for each family and column, the test cases that passed on it, written by
``pytest --write-proofs`` from the tests marked ``@pytest.mark.proves``). A cell is "yes" only with a proof, and
names it; an implemented cell without one reads "unproved" (and fails the table's test). EP is None (n/a) for
dense families.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from gkd.models.adapter import families

COLUMNS = ("full", "LoRA", "FSDP", "TP", "PP", "EP", "packing", "vLLM sync")
PROOFS = Path(__file__).with_name("proofs.json")

# what the families are called, by config.model_type
TITLES = {
    "llama": "Llama 2 / 3 / 3.x (SmolLM2)", "mistral": "Mistral", "qwen2": "Qwen2 / Qwen2.5", "qwen3": "Qwen3",
    "smollm3": "SmolLM3", "granite": "Granite", "cohere": "Cohere (Command-R)", "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3 (text)", "phi3": "Phi-3", "olmo2": "OLMo 2", "qwen3_moe": "Qwen3-MoE",
    "qwen2_moe": "Qwen2-MoE", "mixtral": "Mixtral", "olmoe": "OLMoE", "gpt_oss": "GPT-OSS", "qwen2_vl": "Qwen2-VL",
    "qwen2_5_vl": "Qwen2.5-VL", "llava": "LLaVA", "internvl": "InternVL", "qwen3_vl": "Qwen3-VL", "qwen3_vl_moe": "Qwen3-VL-MoE",
}
TITLES.update({"glm4_moe": "GLM-4.5 (GLM-4 MoE)", "deepseek_v3": "DeepSeek-V3"})
TITLES["qwen3_next"] = "Qwen3-Next"


def implemented() -> list[dict]:
    """One row per supported ``model_type``: its title, its logit head and, per column, whether gkd runs it
    (True), refuses it (False) or it does not apply (None: EP of a dense family)."""
    out = []
    for adapter in families():
        for model_type in adapter.model_types:
            cells = {"full": True, "LoRA": True, "FSDP": True, "TP": adapter.has_tp_plan, "PP": adapter.pipelines,
                     "EP": True if adapter.moe else None, "packing": adapter.packs,
                     "vLLM sync": model_type in adapter.vllm_sync}
            # a refusal whose cause is outside gkd, named in the table
            causes = {"vLLM sync": adapter.vllm_blocker} if not cells["vLLM sync"] and adapter.vllm_blocker else {}
            out.append({"model_type": model_type, "family": TITLES.get(model_type, model_type),
                        "head": adapter.head_note, **cells, "causes": causes})
    order = list(TITLES)
    return sorted(out, key=lambda r: order.index(r["model_type"]) if r["model_type"] in order else len(order))


def where(column: str) -> list[str]:
    """The families gkd runs ``column`` for (what the proving tests run over)."""
    return [r["model_type"] for r in implemented() if r[column]]


def proofs() -> dict[str, dict[str, list[str]]]:
    """{model_type: {column: [test ids that proved it]}}, as the last ``pytest --write-proofs`` wrote them."""
    return json.loads(PROOFS.read_text()) if PROOFS.is_file() else {}


def rows() -> list[dict]:
    """The table: ``implemented()``'s rows with each cell True only where a test proved it ("unproved" where gkd
    runs it without a proof), and the proving test ids under "proofs"."""
    proved = proofs()
    out = []
    for r in implemented():
        mine = proved.get(r["model_type"], {})
        cells = {c: r[c] if not r[c] else (True if mine.get(c) else "unproved") for c in COLUMNS}
        out.append({**r, **cells, "proofs": {c: mine[c] for c in COLUMNS if mine.get(c)}})
    return out


def _pattern(test_id: str, model_type: str) -> str:
    """A test id with the family's parameter written as <model_type>, so that one legend entry serves a column."""
    return re.sub(rf"\[{re.escape(model_type)}\]$", "[<model_type>]", test_id)


def markdown() -> str:
    """The table with each "yes" naming its proofs by number, and the numbered test ids below it."""
    table, legend, outside = rows(), {}, {}
    for r in table:
        for c in COLUMNS:
            for test_id in r["proofs"].get(c, []):
                legend.setdefault(_pattern(test_id, r["model_type"]), len(legend) + 1)
            if c in r["causes"]:
                outside.setdefault(r["causes"][c], "abcdefghijklmnopqrstuvwxyz"[len(outside)])

    def cell(r, c):
        if r[c] is None:
            return "—"
        if r[c] is True:
            refs = sorted(legend[_pattern(t, r["model_type"])] for t in r["proofs"][c])
            return "yes " + ",".join(f"[{n}]" for n in refs)
        if r[c] is False and c in r["causes"]:
            return f"no [{outside[r['causes'][c]]}]"
        return "no" if r[c] is False else r[c]

    lines = ["| family | model_type | logit head | " + " | ".join(COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(COLUMNS)]
    lines += [f"| {r['family']} | `{r['model_type']}` | {r['head']} | " + " | ".join(cell(r, c) for c in COLUMNS)
              + " |" for r in table]
    lines += ["", "Each \"yes\" is proved by the numbered test cases (passing at this version):"]
    lines += [f"[{n}] {test}" for test, n in legend.items()]
    if outside:
        lines += ["", "Each \"no [letter]\" is refused for a cause outside gkd:"]
        lines += [f"[{letter}] {cause}" for cause, letter in outside.items()]
    return "\n".join(lines)
