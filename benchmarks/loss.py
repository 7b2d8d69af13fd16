"""Forward + backward of the distillation loss from hidden states: naive vs fused.

    .venv/bin/python benchmarks/loss.py            # N=4096 H=576 V=49152 float32, beta 0 / 0.5 / 1

The naive path materialises the student's and the teacher's [N, V] logits and applies the divergence
with autograd (what TRL's GKDTrainer does); the fused path is gkd.losses.fused_linear_generalized_jsd.
Each configuration runs in a fresh process: one warm-up, then `--runs` timed runs; the peak is the
largest rise of the process's resident set (VmHWM, reset before every run) above what it held
before the run, so it counts logits, temporaries and gradients but not the inputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def naive_loss(h, w, th, tw, beta, temperature):
    """Divergence on fully materialised logits, autograd all the way (the baseline)."""
    s = F.log_softmax((h @ w.T) / temperature, dim=-1)
    with torch.no_grad():
        t = F.log_softmax((th @ tw.T) / temperature, dim=-1)
    if beta == 0:
        per_token = (t.exp() * (t - s)).sum(-1)
    elif beta == 1:
        per_token = (s.exp() * (s - t)).sum(-1)
    else:
        m = torch.logsumexp(torch.stack([s + torch.log(torch.tensor(1 - beta)), t + torch.log(torch.tensor(beta))]), 0)
        per_token = beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
    return per_token.mean()


def fused_loss(h, w, th, tw, beta, temperature, chunk_size):
    from gkd.losses import fused_linear_generalized_jsd

    return fused_linear_generalized_jsd(h, w, teacher_hidden=th, teacher_lm_head_weight=tw, beta=beta,
                                        temperature=temperature, chunk_size=chunk_size or None)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(path: str, beta: float, n: int, hidden: int, vocab: int, runs: int, chunk_size: int) -> dict:
    """One configuration, in this process."""
    torch.manual_seed(0)
    h = torch.randn(n, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) / hidden**0.5).requires_grad_()
    th, tw = torch.randn(n, hidden), torch.randn(vocab, hidden) / hidden**0.5
    step = (lambda: naive_loss(h, w, th, tw, beta, 0.9)) if path == "naive" else (
        lambda: fused_loss(h, w, th, tw, beta, 0.9, chunk_size))
    times, peaks, value = [], [], None
    for i in range(runs + 1):
        h.grad = w.grad = None
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set
        before = _status_kib("VmRSS")
        t0 = time.perf_counter()
        loss = step()
        loss.backward()
        elapsed = time.perf_counter() - t0
        peaks.append((_status_kib("VmHWM") - before) / 1024)
        value = float(loss.detach())
        if i:  # the first run is the warm-up
            times.append(elapsed)
    return {"path": path, "beta": beta, "median_s": statistics.median(times), "peak_mib": max(peaks), "loss": value}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--chunk-size", type=int, default=0, help="fused chunk size (0 = the library default)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--one", nargs=2, metavar=("PATH", "BETA"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure(args.one[0], float(args.one[1]), args.n, args.hidden, args.vocab, args.runs,
                                 args.chunk_size)))
        return

    print(f"N={args.n} H={args.hidden} V={args.vocab} float32, {torch.get_num_threads()} threads, "
          f"median of {args.runs} runs after a warm-up, fused chunk_size={args.chunk_size or 'default'}")
    header = f"{'beta':>5} | {'naive s':>8} {'naive MiB':>10} | {'fused s':>8} {'fused MiB':>10} | {'time ratio':>10} {'memory ratio':>12} | {'|dloss|':>8}"
    print(header)
    print("-" * len(header))
    for beta in (0.0, 0.5, 1.0):
        res = {}
        for path in ("naive", "fused"):
            cmd = [sys.executable, __file__, "--one", path, str(beta), "--n", str(args.n), "--hidden", str(args.hidden),
                   "--vocab", str(args.vocab), "--runs", str(args.runs), "--chunk-size", str(args.chunk_size),
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            res[path] = json.loads(out.strip().splitlines()[-1])
        nv, fu = res["naive"], res["fused"]
        print(f"{beta:>5} | {nv['median_s']:>8.2f} {nv['peak_mib']:>10.0f} | {fu['median_s']:>8.2f} {fu['peak_mib']:>10.0f} | "
              f"{fu['median_s'] / nv['median_s']:>10.2f} {fu['peak_mib'] / nv['peak_mib']:>12.3f} | "
              f"{abs(fu['loss'] - nv['loss']):>8.1e}", flush=True)


if __name__ == "__main__":
    main()
