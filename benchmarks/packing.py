"""Trained tokens per second with --packing against padded micro-batches, side by side in one run.

    .venv/bin/python benchmarks/packing.py            # SmolLM2-135M teacher, its every-2nd-layer student

Both sides train the same student on the same rows, off-policy (--lmbda 0, dataset completions), with the
same micro- and global batch sizes: the same trained tokens step for step (checked). Row lengths (prompt +
completion) are spread over 16-1,024 tokens, uniformly (``--lengths uniform``) or evenly on a log scale
(``--lengths loguniform``: many short rows and a long tail, as chat data has; median 128, mean 242). The two trainers live in one process and
step in turn, the first of each pair alternating, so both see the same load. Reported per side: seconds per
step (median and range), trained (completion) tokens per second, the share of padding in the forward's
token slots, and the largest loss difference between the sides (packing is exact: float noise only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import time
from pathlib import Path


def draw_length(rng: random.Random, lo: int, hi: int, spread: str) -> int:
    """A row length in [lo, hi]: uniform, or uniform in log(length)."""
    if spread == "loguniform":
        return min(hi, max(lo, round(math.exp(rng.uniform(math.log(lo), math.log(hi))))))
    return rng.randint(lo, hi)


def write_rows(path: Path, tokenizer, rows: int, lo: int, hi: int, seed: int, spread: str = "uniform") -> list[int]:
    """Messages rows whose tokenised length (chat template included) is drawn from [lo, hi] (``draw_length``);
    returns the lengths aimed at."""
    from gkd.prompts import written_prompts

    rng = random.Random(seed)
    prompts = written_prompts()
    words = " ".join(prompts).split()
    lengths, out = [], []
    for i in range(rows):
        target = draw_length(rng, lo, hi, spread)
        prompt = prompts[i % len(prompts)]
        head = len(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True))
        # about one token per word here; cut to the exact count by tokens
        answer = " ".join(words[(i + j) % len(words)] for j in range(max(1, target - head)))
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"][:max(1, target - head - 1)]
        out.append({"messages": [{"role": "user", "content": prompt},
                                 {"role": "assistant", "content": tokenizer.decode(ids)}]})
        lengths.append(target)
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return lengths


def trainer(teacher: Path, student: Path, data: Path, out: Path, a, packing: bool):
    from gkd.config import TrainConfig
    from gkd.train.trainer import Trainer

    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(model=str(student), teacher_model=str(teacher), dataset=[str(data)], output_dir=str(out),
                      lmbda=0.0, max_steps=a.steps, micro_batch_size=a.micro_batch_size,
                      global_batch_size=a.global_batch_size, max_length=128, max_completion_length=a.hi,
                      learning_rate=1e-5, lr_scheduler_type="constant", progress_bar=False, seed=0, packing=packing)
    return Trainer(cfg, log=lambda *_: None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/bench-packing")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--micro_batch_size", type=int, default=4)
    ap.add_argument("--global_batch_size", type=int, default=8)
    ap.add_argument("--lo", type=int, default=16)
    ap.add_argument("--hi", type=int, default=1024)
    ap.add_argument("--lengths", choices=("uniform", "loguniform"), default="uniform", help="how row lengths spread")
    a = ap.parse_args()
    from e2e_vs_trl import smollm2_pair  # the pair the other benchmarks train (benchmarks/ is on sys.path)
    from side_by_side import step_in_turn

    from gkd.data import batch as batches
    from gkd.models import load_tokenizer
    from gkd.train import trainer as trainer_module

    work = Path(a.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    teacher, student = smollm2_pair(work)
    data = work / "train.jsonl"
    write_rows(data, load_tokenizer(str(student)), a.steps * a.global_batch_size, a.lo, a.hi, seed=0,
               spread=a.lengths)
    slots = {}  # side -> [token slots of the forwards, real tokens]

    def counting(*args, **kw):  # what each micro-batch's forward holds
        b = batches.collate(*args, **kw)
        slot = slots.setdefault(counting.side, [0, 0])
        slot[0] += b.input_ids.numel()
        slot[1] += int(b.attention_mask.sum())
        return b

    trainer_module.collate = counting
    t0 = time.perf_counter()
    load = os.getloadavg()[0]
    sides = {"padded": trainer(teacher, student, data, work / "out-padded", a, False),
             "packed": trainer(teacher, student, data, work / "out-packed", a, True)}
    seconds, loss, windows = step_in_turn(sides, a.steps, before=lambda name: setattr(counting, "side", name))
    tokens = {name: [w.tokens for w in windows[name]] for name in sides}
    for t in sides.values():
        t.close()
    assert tokens["padded"] == tokens["packed"], tokens  # equal work: the same trained tokens every step
    rows = []
    for name in sides:
        s = seconds[name]
        rows.append({"side": name, "s_per_step_median": round(statistics.median(s), 3),
                     "s_per_step_range": [round(min(s), 3), round(max(s), 3)],
                     "trained_tokens_per_s": round(sum(tokens[name]) / sum(s), 1),
                     "padding_share": round(1 - slots[name][1] / slots[name][0], 3)})
    ratios = [p / q for p, q in zip(seconds["padded"], seconds["packed"])]
    result = {"steps": a.steps, "micro_batch_size": a.micro_batch_size, "global_batch_size": a.global_batch_size,
              "lengths": [a.lo, a.hi, a.lengths], "trained_tokens_each_side": sum(tokens["packed"]), "sides": rows,
              "speedup_packed_vs_padded_median": round(statistics.median(ratios), 3),
              "speedup_range": [round(min(ratios), 3), round(max(ratios), 3)],
              "max_loss_difference": max(abs(x - y) for x, y in zip(loss["padded"], loss["packed"])),
              "seconds_per_step": {name: [round(x, 2) for x in seconds[name]] for name in sides},
              "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2),
              "wall_s": round(time.perf_counter() - t0, 1)}
    print(f"{'side':8} {'s/step (median)':>16} {'trained tok/s':>14} {'padding':>8}")
    for r in rows:
        print(f"{r['side']:8} {r['s_per_step_median']:>16.3f} {r['trained_tokens_per_s']:>14.1f} {r['padding_share']:>8.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
