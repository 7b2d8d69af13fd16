"""On-policy generation: plain HF `model.generate`, our HF-path sampler (gkd.rollout.HFSampler, its own
decode loop) and vLLM in the training process (gkd.vllm_rollout.VLLMColocateSampler), against the
machine's roofline; and the time of one vLLM weight sync.

    .venv/bin/python benchmarks/rollout.py                     # batch 4 and 32; 64 new tokens
    .venv/bin/python benchmarks/rollout.py --batch 8 32 128 --new_tokens 128

The student is SmolLM2-135M-Instruct pruned to every other layer (float32), the prompts the built-in
ones (repeated to fill a batch), sampling at temperature 0.9 (no top-k / top-p on any path), stopping at
EOS as training does. `generate` and our sampler run in one process, alternating, --rounds times after
a warm-up call each; reported: median completion tokens/s of each and the median of the pair-by-pair
ratios. vLLM runs in its own process (it reserves threads when it starts): one timed call after a
warm-up, and the median of 3 weight syncs.

Roofline, measured here on the same threads: memory read bandwidth (summing a 1 GiB float32 tensor,
best of 5) and float32 matmul throughput (2048³, best of 5). A decode step must read every weight of
the Linear layers once and do 2 FLOPs per weight per row, so batch B can reach at most
B / max(weight bytes / bandwidth, 2 · weights · B / matmul FLOP/s) tokens/s (attention and the KV cache
are left out: the bound is optimistic).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def prompts(n: int) -> list[list[int]]:
    from gkd.models import SMOLLM2, load_tokenizer
    from gkd.prompts import eval_prompts, written_prompts

    tok = load_tokenizer(SMOLLM2)
    qs = written_prompts() + eval_prompts()
    ids = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                   tokenize=True)["input_ids"] for q in qs]
    return [ids[i % len(ids)] for i in range(n)]


def clock(kind: str):
    """Wall time, or this process's CPU time: on a machine shared with other jobs a one-thread run's CPU
    time counts its own work only (with more threads it would count their spin-waits too)."""
    return time.process_time if kind == "cpu" else time.perf_counter


def roofline(threads: int, now) -> dict:
    """Bytes/s of a memory read, FLOP/s of a large float32 matmul and bytes/s of writing fresh memory on
    ``threads`` threads (best of 5). The matmul rate is the faster of torch's product and oneDNN's (both kept:
    on one AMD VM MKL's ran at half oneDNN's, and a limit from MKL's rate alone was half the machine's)."""
    import torch

    from gkd.machine import fresh_gb_s, matmul_gflop_s, onednn_gflop_s, read_gb_s

    torch.set_num_threads(threads)
    torch_rate, onednn_rate = matmul_gflop_s(now), onednn_gflop_s(now)
    return {"bandwidth_gb_s": read_gb_s(now), "matmul_gflop_s": max(torch_rate, onednn_rate),
            "torch_gflop_s": torch_rate, "onednn_gflop_s": onednn_rate, "fresh_gb_s": fresh_gb_s(now)}


def measure_hf(student: str, batch: int, new_tokens: int, rounds: int, now) -> dict:
    """Plain `generate` and HFSampler on the same prompts, alternating."""
    import torch

    from gkd.data.batch import left_pad
    from gkd.models import eos_ids, load_model, load_tokenizer
    from gkd.rollout.base import SamplingConfig
    from gkd.rollout.hf import HFSampler

    tok, model = load_tokenizer(student), load_model(student).eval()
    eos = eos_ids(tok, model)
    batch_prompts = prompts(batch)
    sampler = HFSampler(SamplingConfig(max_new_tokens=new_tokens, temperature=0.9, batch_size=batch), eos,
                        tok.pad_token_id, torch.device("cpu"))
    ids, mask = left_pad(batch_prompts, tok.pad_token_id)

    @torch.no_grad()
    def generate() -> int:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=True,
                             temperature=0.9, top_k=0, top_p=1.0, eos_token_id=eos, pad_token_id=tok.pad_token_id)
        new = out[:, ids.shape[1]:]
        ended = torch.isin(new, torch.tensor(eos))
        # tokens up to and including each row's first EOS, as the sampler returns them
        return int(torch.where(ended.any(1), ended.int().argmax(1) + 1, new.shape[1]).sum())

    seeds = iter(range(1, 10**6))

    def sample() -> int:
        return sum(map(len, sampler.generate(model, batch_prompts, seed=next(seeds))))

    generate(), sample()  # warm-up
    tps = {"generate": [], "hf": []}
    for _ in range(rounds):
        for name, f in (("generate", generate), ("hf", sample)):
            t0 = now()
            n = f()
            tps[name].append(n / (now() - t0))
    return {"generate": statistics.median(tps["generate"]), "hf": statistics.median(tps["hf"]),
            "ratio": statistics.median(h / g for h, g in zip(tps["hf"], tps["generate"])), "all": tps}


def measure_vllm(student: str, batch: int, new_tokens: int) -> dict:
    from gkd.models import eos_ids, load_model, load_tokenizer
    from gkd.rollout.base import SamplingConfig
    from gkd.rollout.vllm_engine import VLLMColocateSampler

    tok, model = load_tokenizer(student), load_model(student).eval()
    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=0.9, batch_size=batch)
    sampler = VLLMColocateSampler(student, cfg, eos_ids(tok, model), dtype="float32", max_model_len=512,
                                  gpu_memory_utilization=0.3, tensor_parallel_size=1, kv_cache_memory_mb=1024,
                                  sleep_level=0, seed=0)
    batch_prompts = prompts(batch)
    sampler.generate(model, batch_prompts[: min(batch, 8)])  # warm-up
    t0 = time.perf_counter()
    out = sampler.generate(model, batch_prompts)
    seconds = time.perf_counter() - t0
    syncs = []
    for _ in range(3):
        t0 = time.perf_counter()
        sampler.sync(model)
        syncs.append(time.perf_counter() - t0)
    return {"vllm": sum(map(len, out)) / seconds, "seconds": seconds, "sync_s": statistics.median(syncs)}


def linear_weights(student: str) -> int:
    import torch

    from gkd.models import load_model

    return sum(m.weight.numel() for m in load_model(student).modules() if isinstance(m, torch.nn.Linear))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/bench-rollout"))
    ap.add_argument("--batch", type=int, nargs="+", default=[4, 32])
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="alternating timed calls of generate and our sampler")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no_vllm", action="store_true", help="leave vLLM out")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: CPU time of the process, for a machine shared with other jobs (with --threads 1; "
                         "leaves vLLM out, whose engine runs in threads and processes of its own)")
    ap.add_argument("--_one", nargs=3, metavar=("WHAT", "STUDENT", "BATCH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.clock == "cpu" and a.threads != 1:
        ap.error("--clock cpu needs --threads 1")
    a.no_vllm |= a.clock == "cpu"
    if a._one:
        what, student, batch = a._one
        if what == "roofline":
            print(json.dumps({**roofline(a.threads, clock(a.clock)), "weights": linear_weights(student)}))
        elif what == "hf":
            print(json.dumps(measure_hf(student, int(batch), a.new_tokens, a.rounds, clock(a.clock))))
        else:
            print(json.dumps(measure_vllm(student, int(batch), a.new_tokens)))
        return

    from gkd.models import SMOLLM2, prune_command

    student = a.work.absolute() / "student"
    if not (student / "config.json").is_file():
        prune_command(SMOLLM2, str(student), None, 2, "float32")
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false")

    def child(what: str, batch: int) -> dict:
        proc = subprocess.run([sys.executable, __file__, "--new_tokens", str(a.new_tokens), "--rounds", str(a.rounds),
                               "--threads", str(a.threads), "--clock", a.clock, "--_one", what, str(student), str(batch)],
                              capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"[bench] {what} batch {batch} failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    roof = child("roofline", 1)
    weight_bytes = roof["weights"] * 4
    print(f"[bench] roofline: {roof['bandwidth_gb_s']:.1f} GB/s read, {roof['matmul_gflop_s']:.0f} GFLOP/s float32 "
          f"matmul, {weight_bytes / 1e6:.0f} MB of Linear weights per decode step", flush=True)
    rows = []
    for batch in a.batch:
        r = child("hf", batch)
        print(f"[bench] batch {batch}: generate {r['generate']:.1f} tok/s, our sampler {r['hf']:.1f} tok/s, "
              f"pair ratios {[round(h / g, 2) for h, g in zip(r['all']['hf'], r['all']['generate'])]}", flush=True)
        if not a.no_vllm:
            r.update(child("vllm", batch))
            print(f"[bench] batch {batch}: vLLM {r['vllm']:.1f} tok/s, weight sync {r['sync_s']:.3f} s", flush=True)
        step_s = max(weight_bytes / (roof["bandwidth_gb_s"] * 1e9),
                     2 * roof["weights"] * batch / (roof["matmul_gflop_s"] * 1e9))
        r["roofline"] = batch / step_s
        rows.append((batch, r))

    print(f"\nSmolLM2 student (15 layers, float32), {a.new_tokens} new tokens, temperature 0.9, {a.threads} threads, "
          f"{'CPU' if a.clock == 'cpu' else 'wall'} time; roofline from {roof['bandwidth_gb_s']:.1f} GB/s and {roof['matmul_gflop_s']:.0f} GFLOP/s measured here\n")
    print("| batch | generate tok/s | our sampler tok/s | sampler / generate | vLLM tok/s | roofline tok/s | "
          "best path | best / roofline | vLLM weight sync s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch, r in rows:
        paths = {k: r[k] for k in ("generate", "hf", "vllm") if k in r}
        best = max(paths, key=paths.get)
        vl = f"{r['vllm']:.1f}" if "vllm" in r else "-"
        sync = f"{r['sync_s']:.3f}" if "sync_s" in r else "-"
        print(f"| {batch} | {r['generate']:.1f} | {r['hf']:.1f} | {r['ratio']:.2f}× | {vl} | {r['roofline']:.0f} | "
              f"{ {'hf': 'our sampler'}.get(best, best)} | {paths[best] / r['roofline']:.0%} | {sync} |")
    hf_share = ", ".join(f"{r['hf'] / r['roofline']:.0%} at batch {b}" for b, r in rows)
    print("\nHF-path sampler / plain generate: " + ", ".join(f"{r['ratio']:.2f}× at batch {b}" for b, r in rows)
          + f"; our sampler's share of the roofline: {hf_share}")


if __name__ == "__main__":
    main()
