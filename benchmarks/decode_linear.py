"""The decode loop's linear layers written four ways, side by side: ``F.linear`` (``x @ W.T``, transformers'
own), ``(W @ x.T).T`` (``few_row_linears(form="weight_first")``), oneDNN's product (``form="onednn"``), and what
sampling uses: per model shape and row count the fastest of the three as timed once on this machine
(``gkd.rollout.decode.few_row_linears``).

    .venv/bin/python benchmarks/decode_linear.py                  # batch 1, 4, 8, 16, 32; 32 new tokens
    .venv/bin/python benchmarks/decode_linear.py --batch 4 --rounds 7

The student is e2e_vs_trl.py's (SmolLM2-135M-Instruct, every other layer, float32; made once in --work), the
prompts the built-in ones, greedy decoding. The ways alternate --rounds times after a warm-up of each; reported
per batch: the median ms per decoded position of each, the median of the pair-by-pair ratios of F.linear to the
measured choice and their range, the weight bytes read per position over the fastest way's time (GB/s), the
load average before the batch's runs (above the core count: not quiet), and whether every way wrote F.linear's
tokens (the forms agree to float rounding, not bit for bit: a near tie between two tokens may go either way).

How far the loop is from the memory bound: the header gives the machine's read bandwidth (summing 1 GiB), and
every batch the products alone (one pass over the Linear weights in the model's order, the measured form, best of
--rounds; their bytes over that time) beside the whole loop. ``--compiled`` then times, per batch, the weight-first
form with the model's forward eager and under ``torch.compile(fullgraph=True)`` (which fuses what lies between the
products), alternating, and how long the first compiled decode took.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/bench-e2e"), help="where the models are made once")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compiled", action="store_true",
                    help="also time the weight-first decode with the forward compiled")
    a = ap.parse_args()

    import torch

    from e2e_vs_trl import smollm2_pair
    from gkd.data.batch import left_pad
    from gkd.machine import read_gb_s
    from gkd.models import load_model
    from gkd.rollout.decode import decode, few_row_linears
    from rollout import prompts

    torch.set_num_threads(a.threads)
    _, student_dir = smollm2_pair(a.work)
    model = load_model(str(student_dir)).eval()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    ways = {"F.linear": contextlib.nullcontext,
            "weight_first": lambda: few_row_linears(model, form="weight_first"),
            "onednn": lambda: few_row_linears(model, form="onednn"),
            "measured": lambda: few_row_linears(model)}
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, {a.threads} threads, linear weights "
          f"{weight_bytes / 2**20:.0f} MiB, {a.new_tokens} new tokens, greedy; read bandwidth {read_gb_s():.1f} GB/s")
    print("| batch | load before | F.linear ms/position | (W @ x.T).T ms/position | oneDNN ms/position | "
          "measured ms/position | F.linear / measured (median, range) | GB/s | products alone ms/position (GB/s) "
          "| tokens as F.linear's |")
    print("|---" * 10 + "|")
    for batch in a.batch:
        ids, mask = left_pad(prompts(batch), 0)
        load = os.getloadavg()[0]

        def run(way):
            with torch.no_grad(), ways[way]():
                start = time.perf_counter()
                out = decode(model, ids, mask, a.new_tokens, lambda z: z.argmax(-1), [], 0)
                return (time.perf_counter() - start) / a.new_tokens * 1e3, out

        times, same, _ = alternate(run, ways, a.rounds)
        products = products_ms(model, linears, batch, a.rounds)
        ratios = [x / y for x, y in zip(times["F.linear"], times["measured"])]
        best = min(statistics.median(t) for t in times.values())
        differ = [way for way, ok in same.items() if not ok]
        print(f"| {batch} | {load:.2f} | {statistics.median(times['F.linear']):.1f} | "
              f"{statistics.median(times['weight_first']):.1f} | {statistics.median(times['onednn']):.1f} | "
              f"{statistics.median(times['measured']):.1f} | {statistics.median(ratios):.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f}) | {weight_bytes / best / 1e6:.1f} | "
              f"{products:.1f} ({weight_bytes / products / 1e6:.1f}) | "
              f"{'all' if not differ else 'not ' + ', '.join(differ)} |", flush=True)
    if a.compiled:  # (after the table: the compiled forward's kernels stay out of the other ways' runs)
        print("\n| batch | load before | first compiled decode s | eager ms/position | compiled ms/position | "
              "eager / compiled (median, range) | tokens as eager's |\n|---|---|---|---|---|---|---|")
        for batch in a.batch:
            try:
                row = compiled_ab(model, *left_pad(prompts(batch), 0), a)
            except Exception as e:  # (torch.compile needs a C++ compiler, among others)
                first = (str(e).strip().splitlines() or [""])[0][:200]
                raise SystemExit(f"decode_linear.py --compiled: torch.compile failed at batch {batch} "
                                 f"({type(e).__name__}: {first}); run without --compiled") from None
            print(f"| {batch} | {row} |", flush=True)


def alternate(run, ways, rounds: int):
    """Each of ``ways`` once (a warm-up), then all in turn ``rounds`` times: ``run(way)`` gives (ms per position,
    tokens). Returns the times per way, whether each way always wrote the first way's tokens (the forms agree to
    float rounding: a near tie may pick another token), and each warm-up's seconds."""
    import torch

    warm = {}
    for way in ways:
        start = time.perf_counter()
        run(way)
        warm[way] = time.perf_counter() - start
    times, same = {way: [] for way in ways}, dict.fromkeys(ways, True)
    for _ in range(rounds):
        outs = {}
        for way in ways:
            ms, outs[way] = run(way)
            times[way].append(ms)
            same[way] &= torch.equal(outs[way], outs[next(iter(ways))])
    return times, same, warm


def compiled_ab(model, ids, mask, a) -> str:
    """The weight-first form with the model's forward eager and compiled, alternating --rounds times after a
    warm-up each; the row of the compiled table. (One few_row_linears for all: entering it again makes new layer
    forwards, and the compiled graph would be made again each time.)"""
    import torch

    from gkd.rollout.decode import decode, few_row_linears

    torch._dynamo.reset()  # (a batch's graphs are its own: the previous batch's would only count towards the limit)
    eager = model.forward
    forwards = {"eager": eager, "compiled": torch.compile(eager, fullgraph=True)}
    load = os.getloadavg()[0]

    def run(way):
        model.forward = forwards[way]
        start = time.perf_counter()
        out = decode(model, ids, mask, a.new_tokens, lambda z: z.argmax(-1), [], 0)
        return (time.perf_counter() - start) / a.new_tokens * 1e3, out

    try:
        with torch.no_grad(), few_row_linears(model, form="weight_first"):
            times, same, warm = alternate(run, forwards, a.rounds)
    finally:
        vars(model).pop("forward", None)  # (the class's forward again)
    ratios = [x / y for x, y in zip(times["eager"], times["compiled"])]
    return (f"{load:.2f} | {warm['compiled']:.1f} | {statistics.median(times['eager']):.1f} | "
            f"{statistics.median(times['compiled']):.1f} | {statistics.median(ratios):.2f}x ({min(ratios):.2f}-"
            f"{max(ratios):.2f}) | {'yes' if same['compiled'] else 'no'}")


def products_ms(model, linears, rows: int, rounds: int) -> float:
    """Milliseconds of one pass over ``linears`` at ``rows`` rows in the measured form, best of ``rounds``: what a
    decoded position spends in its products alone."""
    import torch

    from gkd.rollout.decode import few_row_linears

    xs = [torch.randn(rows, m.in_features) for m in linears]
    best = float("inf")
    with torch.no_grad(), few_row_linears(model):
        for _ in range(rounds + 1):  # (one pass more: alone, the first would also time the forms)
            start = time.perf_counter()
            for m, x in zip(linears, xs):
                m(x)
            best = min(best, time.perf_counter() - start)
    return best * 1e3


if __name__ == "__main__":
    main()
