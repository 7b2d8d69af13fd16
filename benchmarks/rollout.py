"""On-policy generation: HF `generate` (gkd.rollout.HFSampler) vs vLLM in the training process
(gkd.vllm_rollout.VLLMColocateSampler), and the time of one weight sync.

    .venv/bin/python benchmarks/rollout.py                     # batch 8, 32, 128; 128 new tokens
    .venv/bin/python benchmarks/rollout.py --batch 8 32 --new_tokens 64

The student is SmolLM2-135M-Instruct pruned to every other layer (float32), the prompts the built-in
ones (repeated to fill a batch), sampling at temperature 0.9, stopping at EOS as training does. Each
backend runs in its own process (vLLM reserves threads for itself when it starts); reported: completion
tokens per second of one timed call after a warm-up call, and the median of 3 weight syncs.
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
    from gkd.prompts import eval_prompts, train_prompts

    tok = load_tokenizer(SMOLLM2)
    qs = train_prompts() + eval_prompts()
    ids = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                   tokenize=True)["input_ids"] for q in qs]
    return [ids[i % len(ids)] for i in range(n)]


def measure(backend: str, student: str, batch: int, new_tokens: int) -> dict:
    import torch

    from gkd.models import eos_ids, load_model, load_tokenizer
    from gkd.rollout import HFSampler, SamplingConfig

    tok, model = load_tokenizer(student), load_model(student).eval()
    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=0.9, batch_size=batch)
    eos = eos_ids(tok, model)
    if backend == "hf":
        sampler = HFSampler(cfg, eos, tok.pad_token_id, torch.device("cpu"))
    else:
        from gkd.vllm_rollout import VLLMColocateSampler

        sampler = VLLMColocateSampler(student, cfg, eos, dtype="float32", max_model_len=512,
                                      gpu_memory_utilization=0.3, tensor_parallel_size=1,
                                      kv_cache_memory_mb=1024, sleep_level=0, seed=0)
    batch_prompts = prompts(batch)
    sampler.generate(model, batch_prompts[: min(batch, 8)])  # warm-up
    t0 = time.perf_counter()
    out = sampler.generate(model, batch_prompts)
    seconds = time.perf_counter() - t0
    result = {"tokens": sum(map(len, out)), "seconds": seconds}
    if backend == "vllm":
        syncs = []
        for _ in range(3):
            t0 = time.perf_counter()
            sampler.sync(model)
            syncs.append(time.perf_counter() - t0)
        result["sync_s"] = statistics.median(syncs)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/bench-rollout"))
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--_one", nargs=3, metavar=("BACKEND", "STUDENT", "BATCH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._one:
        backend, student, batch = a._one
        print(json.dumps(measure(backend, student, int(batch), a.new_tokens)))
        return

    from gkd.models import SMOLLM2, prune_command

    student = a.work.absolute() / "student"
    if not (student / "config.json").is_file():
        prune_command(SMOLLM2, str(student), None, 2, "float32")
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false")
    rows = []
    for batch in a.batch:
        r = {}
        for backend in ("hf", "vllm"):
            proc = subprocess.run([sys.executable, __file__, "--new_tokens", str(a.new_tokens), "--_one", backend,
                                   str(student), str(batch)], capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.exit(f"[bench] {backend} batch {batch} failed:\n{proc.stderr[-3000:]}")
            r[backend] = json.loads(proc.stdout.strip().splitlines()[-1])
            tps = r[backend]["tokens"] / r[backend]["seconds"]
            print(f"[bench] {backend} batch {batch}: {r[backend]['tokens']} tokens in {r[backend]['seconds']:.1f} s "
                  f"= {tps:.1f} tok/s", flush=True)
        rows.append((batch, r))

    print(f"\nSmolLM2 student (15 layers, float32), {a.new_tokens} new tokens, temperature 0.9, {a.threads} threads\n")
    print("| batch | HF tok/s | vLLM tok/s | vLLM / HF | weight sync s | sync / vLLM generate |")
    print("|---|---|---|---|---|---|")
    for batch, r in rows:
        hf, vl = (r[k]["tokens"] / r[k]["seconds"] for k in ("hf", "vllm"))
        print(f"| {batch} | {hf:.1f} | {vl:.1f} | {vl / hf:.2f}× | {r['vllm']['sync_s']:.3f} | "
              f"{r['vllm']['sync_s'] / r['vllm']['seconds']:.3f} |")


if __name__ == "__main__":
    main()
