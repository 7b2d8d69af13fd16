"""Where a training step's time goes: the off-policy and the on-policy step of benchmarks/e2e_vs_trl.py's
gkd run, cut into its parts, each against the time this machine's measured rates allow for its work.

    .venv/bin/python benchmarks/profile_step.py            # SmolLM2-135M teacher, its every-2nd-layer student

The parts are timed by wrapping the functions that do them (one trainer, in this process): generation (the
completions of the step), the teacher's scoring, the student's forward, the fused loss's forward, the backward
(student and loss together), the optimizer, and the rest (collation, Python, the step's reductions). Each part's
FLOPs are counted from the models' shapes and the tokens it processed (matmuls only: attention scores and the
linear layers; the fused loss's vocabulary products, its gradients included, which it computes in its forward),
and its limit is FLOPs / the matmul rate measured here (the faster of torch's and oneDNN's); for generation, the
prompts' forward at that rate plus, for decoding, the weights read once per generated position / the memory
bandwidth. Reported per step kind: the median of --steps steps after one warm-up, and the highest resident set
inside each part (the kernel's high-water mark, reset as each part begins) against e2e_vs_trl.py's memory floor.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path


def _high_water_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class Parts:
    """Seconds spent inside wrapped functions, per part, for the step being timed (outermost calls only), and
    the token slots each forward part ran over."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.slots: dict[str, int] = {}
        self.peak: dict[str, float] = {}  # MiB: the resident set's highest point inside each part
        self.depth = 0

    def mark(self, part: str) -> None:
        """Charge the resident set's high-water mark since the last mark to ``part``, and start a new one."""
        self.peak[part] = max(self.peak.get(part, 0.0), _high_water_mib())
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # (Linux: resets the high-water mark to the current resident set)

    def wrap(self, owner, name: str, part: str, when=lambda *a, **k: True, slots=None):
        real = getattr(owner, name)
        parts = self

        def timed(*args, **kwargs):
            if parts.depth or not when(*args, **kwargs):
                return real(*args, **kwargs)
            parts.depth += 1
            parts.mark("rest")
            t0 = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                parts.depth -= 1
                parts.seconds[part] = parts.seconds.get(part, 0.0) + time.perf_counter() - t0
                parts.mark(part)
                if slots is not None:
                    parts.slots[part] = parts.slots.get(part, 0) + slots(*args, **kwargs)

        setattr(owner, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/bench-e2e"))
    ap.add_argument("--steps", type=int, default=3, help="timed steps of each kind (after one warm-up)")
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    a = ap.parse_args()
    import torch

    from e2e_vs_trl import memory_floor, model_shape, prepare
    from rollout import roofline

    from gkd.config import TrainConfig
    from gkd.teacher.local import LocalTeacher
    from gkd.train import step as step_module
    from gkd.train.completions import Completions
    from gkd.train.stats import Window
    from gkd.train.trainer import Trainer

    teacher_dir, student_dir, data = prepare(a.work.absolute(), a.max_new_tokens)
    load = os.getloadavg()[0]
    floor = memory_floor(student_dir, teacher_dir)
    roof = roofline(torch.get_num_threads(), time.perf_counter)
    shapes = {side: {**model_shape(folder), "params": None}
              for side, folder in (("student", student_dir), ("teacher", teacher_dir))}
    parts = Parts()
    parts.wrap(Completions, "__call__", "generation")
    parts.wrap(LocalTeacher, "score", "teacher forward", slots=lambda self, batch, split=None: batch.input_ids.numel())
    parts.wrap(step_module, "_fused", "loss forward")
    parts.wrap(torch.Tensor, "backward", "backward")
    results = {}
    for lmbda in (0.0, 1.0):
        cfg = TrainConfig(model=str(student_dir), teacher_model=str(teacher_dir), dataset=[str(data)],
                          output_dir=str(a.work.absolute() / f"out-profile-{lmbda}"), overwrite_output_dir=True,
                          lmbda=lmbda, beta=0.5, temperature=0.9, max_completion_length=a.max_new_tokens,
                          micro_batch_size=a.batch_size, global_batch_size=a.batch_size, learning_rate=1e-5,
                          lr_scheduler_type="constant", seed=0, progress_bar=False, max_steps=a.steps + 1,
                          save_steps=0)
        trainer = Trainer(cfg, log=lambda *_: None)
        shapes["student"]["params"] = sum(p.numel() for p in trainer.params)
        adapter = trainer.adapter
        parts.wrap(adapter, "final_hidden", "student forward", when=lambda model, inputs: model is trainer.student,
                   slots=lambda model, inputs: inputs["input_ids"].numel())
        parts.wrap(trainer.optimizer, "step", "optimizer")
        rows = []
        for step in range(a.steps + 1):
            parts.mark("rest")
            parts.seconds, parts.slots, parts.peak = {}, {}, {}
            window, t0 = Window(), time.perf_counter()
            trainer.train_step(step, window)
            total = time.perf_counter() - t0
            parts.mark("rest")
            if step:  # the first step warms up
                rows.append({"total": total, **parts.seconds, "trained": window.tokens, "rows": window.seqs,
                             "slots": dict(parts.slots), "peak_mib": dict(parts.peak)})
        trainer.close()
        del adapter.final_hidden  # (the wrap's instance attribute: the class's method again)
        del trainer, adapter  # (the next trainer's resident set without this one's)
        gc.collect()
        results["on-policy" if lmbda else "off-policy"] = rows
    print(json.dumps({"load_before": load, "roofline": roof, "shapes": shapes, "memory_floor_mib": floor,
                      "steps": results}))
    for kind, rows in results.items():
        report(kind, rows, shapes, roof, floor["total"])


PARTS = ("generation", "teacher forward", "student forward", "loss forward", "backward", "optimizer")


def limits(r: dict, shapes: dict, roof: dict) -> dict:
    """Seconds this machine's measured rates allow each part of step ``r`` (matmul FLOPs / rate; decoding and
    the optimizer: bytes / bandwidth)."""
    rate, bandwidth = roof["matmul_gflop_s"] * 1e9, roof["bandwidth_gb_s"] * 1e9
    s, t = shapes["student"], shapes["teacher"]
    s_body, t_body = s["linear"] - s["vocab"] * s["width"], t["linear"] - t["vocab"] * t["width"]
    s_slots, t_slots = r["slots"].get("student forward", 0), r["slots"].get("teacher forward", 0)
    seq = s_slots / max(r["rows"], 1)  # padded length: attention's T
    attention = 2 * seq * seq * r["rows"]  # per layer and width unit, causal
    # the fused loss computes its gradients in its forward: the student's head forward and backward (6 N V H),
    # the teacher's head forward (2 N V H); its backward only scales them
    heads = 2 * r["trained"] * (3 * s["vocab"] * s["width"] + t["vocab"] * t["width"])
    generated = r["trained"] if r.get("generation", 0) > 0.05 * r["total"] else 0
    positions = generated / max(r["rows"], 1)
    # sampling first runs the student over the (left-padded) prompts, the head on each row's last position only
    prefill = (2 * s_body * (s_slots - generated) + 2 * s["vocab"] * s["width"] * r["rows"]) if generated else 0
    return {
        "generation": prefill / rate + max(positions * s["linear"] * 4 / bandwidth,
                                           2 * s["linear"] * generated / rate),
        "teacher forward": (2 * t_body * t_slots + 2 * t["layers"] * t["width"] * attention) / rate,
        "student forward": (2 * s_body * s_slots + 2 * s["layers"] * s["width"] * attention) / rate,
        "loss forward": heads / rate,
        "backward": (4 * s_body * s_slots + 4 * s["layers"] * s["width"] * attention) / rate,
        "optimizer": 28 * s["params"] / bandwidth,  # AdamW: read 4 float32 tensors, write 3
    }


def report(kind: str, rows: list[dict], shapes: dict, roof: dict, floor: float) -> None:
    for r in rows:
        r["rest"] = r["total"] - sum(r.get(k, 0.0) for k in PARTS)  # (per step: medians do not add up)
    med = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in ("total", *PARTS, "rest")}
    lim = {k: statistics.median(limits(r, shapes, roof)[k] for r in rows) for k in PARTS}
    lim["rest"] = 0.0
    print(f"\n{kind} step, median of {len(rows)}: {med['total']:.2f} s ({min(r['total'] for r in rows):.2f}-"
          f"{max(r['total'] for r in rows):.2f}), {statistics.median(r['trained'] for r in rows):.0f} trained tokens, "
          f"limit {sum(lim.values()):.2f} s = {sum(lim.values()) / med['total']:.0%} of the step")
    peak = {k: max(r["peak_mib"].get(k, 0.0) for r in rows) for k in (*PARTS, "rest")}
    print(f"peak resident set {max(peak.values()):.0f} MiB = {max(peak.values()) / floor:.3f}x the floor of equal work "
          f"({floor:.0f} MiB, e2e_vs_trl.py's)")
    print("| part | seconds | share of the step | limit s | at % of its limit | peak resident MiB (x floor) |")
    print("|---|---|---|---|---|---|")
    for k in (*PARTS, "rest"):
        at = f"{lim[k] / med[k]:.0%}" if lim[k] and med[k] else "—"
        top = f"{peak[k]:.0f} ({peak[k] / floor:.3f}x)" if peak[k] else "—"
        print(f"| {k} | {med[k]:.3f} | {med[k] / med['total']:.0%} | {lim[k]:.3f} | {at} | {top} |")


if __name__ == "__main__":
    main()
