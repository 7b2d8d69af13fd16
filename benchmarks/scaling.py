"""Distributed layouts side by side: 1 process, 2 processes FSDP, tensor parallel, pipeline parallel, and a
mixture-of-experts pair on 1 process and on 2 processes with expert parallelism (EP 2).

    .venv/bin/python benchmarks/scaling.py                  # off-policy steps, float32, this CPU
    .venv/bin/python benchmarks/scaling.py --lmbda 1        # on-policy (student sampling) steps
    .venv/bin/python benchmarks/scaling.py --layouts "1 process" "2 x PP"   # pipeline rows
    .venv/bin/python benchmarks/scaling.py --layouts "MoE 1 process" "MoE 2 x EP"   # the MoE rows

A random Llama-shaped pair with SmolLM2's tokenizer and widths but head counts TP=2 can split (8 query,
4 key/value heads of 72; SmolLM2's own 9/3 only split over 3): student 8 layers (~55 M parameters,
tied embeddings), teacher 16 layers. Each layout is one fresh `gkd train` (under torchrun for 2
processes) on the same global batch; the single process gets the same threads in total as the two
together. Reported per layout: median step time (steps after the first two), the peak resident set of
the largest process (ru_maxrss of the launch, which covers its workers), and the MiB of parameters and
optimizer state a rank holds (gkd's param_mib_per_rank / optimizer_mib_per_rank metrics), each also as
a ratio to the single process; and the collectives a rank calls per training step, by kind (median of
the steps after the first two, counted by benchmarks/count_collectives.py, which every layout runs
under).

The three FSDP rows are FSDP's two waste fixes off and on: "2 x FSDP (per-micro-batch sync, per-token
gather)" reduce-scatters the gradients after every micro-batch and gathers each layer again for every
token the student decodes (--reduce_scatter_every_micro_batch true --gather_for_generation false);
"2 x FSDP" is gkd's default (reduce-scatter after every micro-batch, the student gathered once per
generation); "2 x FSDP (last-micro-batch sync)" adds --reduce_scatter_every_micro_batch false (only a
step's last micro-batch reduce-scatters). The gather matters on on-policy steps only (--lmbda 1).

The MoE rows (a random Qwen3-MoE pair, same tokenizer and width, 8 experts of width 384, top-2; student
6 layers, teacher 8) add the expert parameters + AdamW state a rank holds (expert_param_mib_per_rank +
expert_optimizer_mib_per_rank) and compare with the MoE single process. Pipeline rows (a tied
embedding: the first and the last stage each hold a copy; --untied gives both models their own lm_head, compared
with a 1-process row of the same --untied run) add the schedule's bubble share, (P - 1) / (M + P - 1) for P stages and M
micro-batches per step (the idle fraction 1F1B and GPipe leave by construction; not measured). On a GPU
machine add --dtype bfloat16.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from e2e_vs_trl import run_measured  # noqa: E402 - one way to run and measure a process

COUNTER = HERE / "count_collectives.py"  # runs gkd with each training step's collectives counted


def prepare(work: Path, dtype: str, tied: bool = True) -> tuple[Path, Path, Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gkd.models import SMOLLM2, load_tokenizer
    from gkd.prompts import written_prompts

    tok = load_tokenizer(SMOLLM2)
    folders = []
    for name, layers, seed in (("teacher", 16, 1), ("student", 8, 2)):
        folder = work / (name if tied else f"{name}-untied")
        if not (folder / "config.json").is_file():
            torch.manual_seed(seed)
            cfg = LlamaConfig(vocab_size=len(tok), hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                              num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                              tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, torch_dtype=dtype)
            LlamaForCausalLM(cfg).to(getattr(torch, dtype)).save_pretrained(str(folder))
            tok.save_pretrained(str(folder))
        folders.append(folder)
    for name, layers, seed in (("moe-teacher", 8, 1), ("moe-student", 6, 2)):
        folder = work / name
        if not (folder / "config.json").is_file():
            from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

            torch.manual_seed(seed)
            cfg = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=576, intermediate_size=1536, moe_intermediate_size=384,
                                 num_experts=8, num_experts_per_tok=2, num_hidden_layers=layers, num_attention_heads=8,
                                 num_key_value_heads=4, head_dim=72, max_position_embeddings=2048,
                                 tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id, torch_dtype=dtype)
            Qwen3MoeForCausalLM(cfg).to(getattr(torch, dtype)).save_pretrained(str(folder))
            tok.save_pretrained(str(folder))
    data = work / "train.jsonl"
    prompts = written_prompts()
    rows = [{"prompt": p, "completion": " ".join(prompts[(i + 1) % len(prompts)] for _ in range(3))}
            for i, p in enumerate(prompts)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folders[0], folders[1], data


LAYOUTS = {  # name: (processes, extra flags)
    "1 process": (1, []),
    "2 x FSDP (per-micro-batch sync, per-token gather)": (2, ["--reduce_scatter_every_micro_batch", "true",
                                                              "--gather_for_generation", "false"]),
    "2 x FSDP": (2, []),  # gkd's defaults: reduce-scatter every micro-batch, one gather per generation
    "2 x FSDP (last-micro-batch sync)": (2, ["--reduce_scatter_every_micro_batch", "false"]),
    "2 x TP": (2, ["--tensor_model_parallel_size", "2"]),
    "MoE 1 process": (1, []),
    "MoE 2 x EP": (2, ["--expert_model_parallel_size", "2"]),
    "2 x PP": (2, ["--pipeline_model_parallel_size", "2"]),
    "2 x PP (GPipe)": (2, ["--pipeline_model_parallel_size", "2", "--pipeline_schedule", "gpipe"]),
}


def run(a, name: str, teacher: Path, student: Path, data: Path, out: Path) -> dict:
    nproc, flags = LAYOUTS[name]
    if name.startswith("MoE"):
        teacher, student = teacher.parent / "moe-teacher", student.parent / "moe-student"
    args = ["train", "--model", str(student), "--teacher_model", str(teacher), "--dataset", str(data),
            "--lmbda", str(a.lmbda), "--max_completion_length", str(a.max_new_tokens), "--micro_batch_size",
            str(a.micro_batch_size), "--global_batch_size", str(a.global_batch_size), "--torch_dtype", a.dtype,
            "--max_steps", str(a.steps), "--learning_rate", "1e-5", "--lr_scheduler_type", "constant",
            "--logging_steps", "1", "--save_steps", "0", "--output_dir", str(out), "--overwrite_output_dir", "true",
            "--progress_bar", "false", *flags]
    counts = out.parent / f"{out.name}.collectives"
    for old in out.parent.glob(f"{counts.name}.rank*.json"):
        old.unlink()
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc-per-node={nproc}"]
    rss = run_measured([*launch, str(COUNTER), str(counts), *args], max(1, a.threads // nproc))["peak_rss_mib"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    stages = int(flags[flags.index("--pipeline_model_parallel_size") + 1]) if "--pipeline_model_parallel_size" in flags else 1
    micro = a.global_batch_size // a.micro_batch_size // (nproc // stages)
    return {"s_per_step": statistics.median(r["step_time"] for r in rows[2:]), "peak_rss_mib": rss,
            "state_mib": last["param_mib_per_rank"] + last["optimizer_mib_per_rank"],
            "expert_mib": last.get("expert_param_mib_per_rank", 0) + last.get("expert_optimizer_mib_per_rank", 0),
            "bubble": (stages - 1) / (micro + stages - 1), "collectives": collectives_per_step(counts)}


def collectives_per_step(counts: Path) -> dict:
    """Per kind, the median count of the steps after the first two; the largest over the ranks."""
    per_rank = [json.loads(f.read_text())["steps"][2:] for f in sorted(counts.parent.glob(f"{counts.name}.rank*.json"))]
    kinds = {k for steps in per_rank for step in steps for k in step}
    return {k: max(statistics.median(step.get(k, 0) for step in steps) for steps in per_rank if steps)
            for k in sorted(kinds)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=HERE / ".work-scaling")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--lmbda", type=float, default=0.0)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--micro_batch_size", type=int, default=2)
    p.add_argument("--global_batch_size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="threads in total, split over the processes")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--untied", action="store_true", help="models with their own lm_head (not tied to the embedding)")
    p.add_argument("--layouts", nargs="*", choices=list(LAYOUTS),
                   default=["1 process", "2 x FSDP (per-micro-batch sync, per-token gather)", "2 x FSDP",
                            "2 x FSDP (last-micro-batch sync)", "2 x TP"],
                   help="the first is the reference of the ratios (MoE rows: the MoE single process)")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    teacher, student, data = prepare(a.work, a.dtype, tied=not a.untied)
    results = {}
    for name in a.layouts:
        print(f"[bench] {name} ...", flush=True)
        tag = "".join(c for c in name if c.isalnum()) + ("-untied" if a.untied else "")
        results[name] = run(a, name, teacher, student, data, a.work / tag)
    print(f"\nlmbda {a.lmbda}, {a.dtype}, {'untied' if a.untied else 'tied'} embeddings, global batch "
          f"{a.global_batch_size}, micro {a.micro_batch_size}, {a.threads} threads in total")
    kinds = sorted({k for r in results.values() for k in r["collectives"]})
    print("| layout | s/step | step vs 1 | peak RSS / rank MiB | RSS vs 1 | params + AdamW MiB / rank | state vs 1 "
          "| bubble share | experts + AdamW MiB / rank | experts vs 1 |" + "".join(f" {k} / step |" for k in kinds))
    print("|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(kinds))
    for name, r in results.items():
        one = results.get("MoE 1 process" if name.startswith("MoE") else "1 process", r)  # each family vs its own
        experts = (f"{r['expert_mib']:.0f} | {r['expert_mib'] / one['expert_mib']:.2f}" if r["expert_mib"]
                   else "- | -")
        print(f"| {name} | {r['s_per_step']:.2f} | {r['s_per_step'] / one['s_per_step']:.2f} | {r['peak_rss_mib']} | "
              f"{r['peak_rss_mib'] / one['peak_rss_mib']:.2f} | {r['state_mib']:.0f} | "
              f"{r['state_mib'] / one['state_mib']:.2f} | {r['bubble']:.2f} | {experts} |"
              + "".join(f" {r['collectives'].get(k, 0):g} |" for k in kinds))


if __name__ == "__main__":
    main()
