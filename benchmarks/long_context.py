"""Long sequences with context parallelism: peak activation memory per rank vs sequence length at C=1
and C=2, and the longest sequence that trains within a fixed activation budget.

    .venv/bin/python benchmarks/long_context.py [--lengths 1024 2048 4096 8192] [--budget_mib 1024]

Each (C, length) is one `torchrun` of one off-policy training step (student forward + backward, a
full-vocabulary teacher forward, the fused loss) on a random Llama (hidden 256, 4 layers, 4 heads / 2 KV
heads) and a student of 2 layers, one row whose prompt + completion fill the length. A rank's activation
peak is its resident set's high-water mark during a second step (reset with /proc/self/clear_refs just before
it) minus its resident set just before; the largest rank is reported. C=1 is one process; C=2 is two
processes, each holding half of every sequence (and, by FSDP over the cp ranks, half the weights).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def worker(args) -> None:
    """One training step under torchrun; prints this rank's activation peak (MiB) on rank 0 as JSON."""
    import torch
    import torch.distributed as dist

    from gkd.config import TrainConfig
    from gkd.train.stats import Window
    from gkd.train.trainer import Trainer

    cfg = TrainConfig(model=args.student, teacher_model=args.teacher, dataset=[args.data], output_dir=args.out,
                      max_length=args.length, max_completion_length=args.length, lmbda=0.0, micro_batch_size=1,
                      global_batch_size=1, context_parallel_size=args.cp,
                      progress_bar=False, learning_rate=1e-4, max_steps=2)
    trainer = Trainer(cfg, log=lambda *_: None)
    trainer.train_step(0, Window())  # warm-up: code loaded on first use, optimizer state created
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    trainer.train_step(1, Window())
    peak = torch.tensor([(_status_kib("VmHWM") - before) / 1024.0], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps({"cp": args.cp, "length": args.length, "peak_mib": float(peak)}), flush=True)
    trainer.close()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fixtures(root: Path, longest: int) -> tuple[str, str]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import write_tokenizer

    paths = []
    for name, layers, seed in (("teacher", 4, 1), ("student", 2, 2)):
        folder = root / name
        cfg = LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2 * longest,
                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=4, pad_token_id=0)
        torch.manual_seed(seed)
        LlamaForCausalLM(cfg).save_pretrained(str(folder))
        write_tokenizer(folder, 96)
        paths.append(str(folder))
    return paths[1], paths[0]


def _data(root: Path, length: int) -> str:
    """One row of about ``length`` tokens: a quarter prompt, the rest completion (chat markup included)."""
    words = [f"w{i % 80}" for i in range(length)]
    path = root / f"row-{length}.jsonl"
    cut = length // 4
    path.write_text(json.dumps({"prompt": " ".join(words[:cut]), "completion": " ".join(words[cut:length - 12])}) + "\n")
    return str(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--budget_mib", type=float, default=1024.0)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("student", "teacher", "data", "out"):
        p.add_argument(f"--{name}", help=argparse.SUPPRESS)
    p.add_argument("--cp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    root = Path(tempfile.mkdtemp(prefix="gkd-long-"))
    student, teacher = _fixtures(root, max(args.lengths))
    results = {}
    for length in args.lengths:
        data = _data(root, length)
        for cp in (1, 2):
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={cp}", "--nnodes=1",
                   "--master-addr=127.0.0.1", f"--master-port={_free_port()}", __file__, "--worker", "--cp", str(cp),
                   "--length", str(length), "--student", student, "--teacher", teacher, "--data", data,
                   "--out", str(root / f"out-{cp}-{length}")]
            env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // cp)))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                print(f"C={cp} length {length}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                results[cp, length] = None
                continue
            results[cp, length] = json.loads(line[0][7:])["peak_mib"]
            print(f"  C={cp} length {length}: {results[cp, length]:.0f} MiB", file=sys.stderr, flush=True)
    print("\n| tokens per sequence | C=1 peak activations / rank | C=2 peak activations / rank | C=2 / C=1 |")
    print("|---|---|---|---|")
    for length in args.lengths:
        one, two = results[1, length], results[2, length]
        ratio = f"{two / one:.2f}" if one and two else "-"
        print(f"| {length} | {one or float('nan'):.0f} MiB | {two or float('nan'):.0f} MiB | {ratio} |")
    for cp in (1, 2):
        fits = [n for n in args.lengths if results[cp, n] is not None and results[cp, n] <= args.budget_mib]
        print(f"longest sequence within {args.budget_mib:.0f} MiB of activations per rank at C={cp}: "
              f"{max(fits) if fits else 'none of ' + str(args.lengths)}")


if __name__ == "__main__":
    main()
