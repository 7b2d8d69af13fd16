"""Epoch-2 off-policy steps with --teacher_cache against live teacher scoring, side by side in one run.

    .venv/bin/python benchmarks/teacher_cache.py            # SmolLM2-135M teacher, its every-2nd-layer student

Both sides train the same student on the same rows for 2 epochs, all off-policy (--lmbda 0), top-K = 20:
the same trained tokens step for step (checked). The live side scores every step with the local teacher;
the cache side scores epoch 1 into a fresh --teacher_cache folder and reads epoch 2 from it. Reported:
seconds per training step in each epoch (the two trainers in one process, stepping in turn, so both see
the same load), the epoch-2 ratio, the largest loss difference between the two runs, and the cache's
size. The rows are written prompts with another prompt as the answer: a speed test needs tokens, not good
answers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path


def prepare(work: Path, rows: int) -> tuple[Path, Path, Path]:
    from e2e_vs_trl import smollm2_pair  # the pair the other benchmarks train (benchmarks/ is on sys.path)
    from gkd.prompts import written_prompts

    teacher_dir, student_dir = smollm2_pair(work)
    data = work / "train.jsonl"
    q = written_prompts()
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q[i % len(q)]},
                                                     {"role": "assistant", "content": q[(i + 1) % len(q)]}]}) + "\n"
                            for i in range(rows)))
    return teacher_dir, student_dir, data


def trainer(teacher: Path, student: Path, data: Path, out: Path, a, cache: Path | None):
    from gkd.config import TrainConfig
    from gkd.train.trainer import Trainer

    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(model=str(student), teacher_model=str(teacher), dataset=[str(data)], output_dir=str(out),
                      lmbda=0.0, num_train_epochs=2, micro_batch_size=a.micro_batch_size,
                      global_batch_size=a.global_batch_size, max_completion_length=64, gkd_logits_topk=a.k,
                      learning_rate=1e-5, lr_scheduler_type="constant", progress_bar=False, seed=0,
                      teacher_cache=str(cache) if cache else "")
    return Trainer(cfg, log=lambda *_: None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/bench-teacher-cache")
    ap.add_argument("--rows", type=int, default=32, help="training rows (an epoch)")
    ap.add_argument("--micro_batch_size", type=int, default=4)
    ap.add_argument("--global_batch_size", type=int, default=8)
    ap.add_argument("--k", type=int, default=20)
    a = ap.parse_args()
    from side_by_side import step_in_turn

    work = Path(a.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    teacher, student, data = prepare(work, a.rows)
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    sides = {"live": trainer(teacher, student, data, work / "out-live", a, None),
             "cache": trainer(teacher, student, data, work / "out-cache", a, cache)}
    steps = sides["live"].budget.steps
    assert steps == sides["cache"].budget.steps and steps % 2 == 0
    seconds, loss, windows = step_in_turn(sides, steps)
    tokens = {name: [(w.tokens, w.seqs, w.student_seqs) for w in windows[name]] for name in sides}
    reused = sides["cache"].teacher.cache.hits  # rows read from the cache (the rest were scored)
    for t in sides.values():
        t.close()
    wall = time.perf_counter() - t0
    # equal work: the same rows, completion tokens and sequences on both sides, all off-policy
    assert tokens["live"] == tokens["cache"] and not any(sampled for _, _, sampled in tokens["live"])
    half = steps // 2
    rows = [{"teacher": name, "epoch1_s_per_step": round(statistics.mean(seconds[name][:half]), 4),
             "epoch2_s_per_step": round(statistics.mean(seconds[name][half:]), 4)} for name in sides]
    entries = list((cache / "entries").glob("*/*.json"))
    result = {
        "steps_per_epoch": half, "rows": a.rows, "global_batch_size": a.global_batch_size, "k": a.k,
        "trained_tokens_each_side": sum(n for n, _, _ in tokens["live"]), "sides": rows,
        "epoch2_speedup_cache_vs_live": round(rows[0]["epoch2_s_per_step"] / rows[1]["epoch2_s_per_step"], 3),
        "max_loss_difference": max(abs(x - y) for x, y in zip(loss["live"], loss["cache"])),
        "seconds_per_step": {name: [round(x, 3) for x in seconds[name]] for name in sides},
        "cache_rows_reused": reused, "cache_entries": len(entries), "cache_bytes": sum(e.stat().st_size for e in entries),
        "wall_s": round(wall, 1),
    }
    print(f"{'teacher':8} {'epoch-1 s/step':>15} {'epoch-2 s/step':>15}")
    for r in rows:
        print(f"{r['teacher']:8} {r['epoch1_s_per_step']:>15.3f} {r['epoch2_s_per_step']:>15.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
