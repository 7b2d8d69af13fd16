"""Asynchronous rollouts: s/step on-policy (--lmbda 1) with --async_generation 1 against 0, one vLLM server.

    .venv/bin/python benchmarks/async_rollout.py                                   # 6 steps, 64 new tokens
    .venv/bin/python benchmarks/async_rollout.py --steps 3 --max_completion_length 8   # a smoke run
    .venv/bin/python benchmarks/async_rollout.py --server_cpus 1 --trainer_cpus 0      # cores of their own

Same teacher (SmolLM2-135M-Instruct, a plain HF folder) and student (every other layer of it) as
benchmarks/e2e_vs_trl.py; the rows are gkd.prompts' written prompts (prompt only: every step is on-policy).
The script starts one `vllm serve` of the student (the CPU build: float32, eager, no chunked prefill; weights
through a shared folder) and trains the same run twice in this process against it, N = 0 then N = 1: the
same rows, steps, seeds, batch and --max_completion_length. Samples stop at EOS, and N = 1 samples from
other (one update older) weights, so the generated tokens can differ a little: the table shows them per
step beside the trained tokens (prompt + completion, as student and teacher forward them), for the
reader to judge the work equal.

For N = 0 each step is timed in parts: generation (waiting on the server's answers), the weight sync, and
training (the rest). N = 1 overlaps generation with training, so a step should take about
max(generation, training) + sync; the table prints that bound + 15 % beside N = 1's s/step. For N = 1,
"generation" is the time the trainer still waited for samples. Step 1 is left out as warm-up (it has no
request ahead); figures are medians over the other steps, of the last of --repeats pairs of runs (the
first pair warms this process up: kernels, allocator). Where the server and the trainer share cores there
is little to overlap: --server_cpus / --trainer_cpus (taskset's syntax: 1, 2-3, 0,2) pin the server (its
OpenMP threads too) and this process (every thread, torch's intra-op count set to match) to disjoint core
sets, the same for N = 0 and N = 1.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def prompt_rows(work: Path) -> Path:
    """gkd.prompts' written prompts as prompt-only chat rows (on-policy steps need nothing else)."""
    from gkd.prompts import written_prompts

    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n"
                            for q in written_prompts()))
    return data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_ids(text: str) -> set[int]:
    """CPU ids written as taskset -c takes them ("1", "2-3", "0,2-3")."""
    ids = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        ids.update(range(int(lo), int(hi or lo) + 1))
    return ids


def pin_cpus(server: str, trainer: str) -> tuple[set[int], set[int]]:
    """Check the two core sets (allowed here, disjoint) and pin every thread of this process to the
    trainer's; the server is pinned as it starts (start_server)."""
    allowed = os.sched_getaffinity(0)
    sets = {flag: cpu_ids(text) for flag, text in (("--server_cpus", server), ("--trainer_cpus", trainer))}
    for flag, ids in sets.items():
        if not ids <= allowed:
            raise SystemExit(f"{flag}: CPUs {sorted(ids - allowed)} are not among this process's {sorted(allowed)}")
    if sets["--server_cpus"] & sets["--trainer_cpus"]:
        raise SystemExit("--server_cpus and --trainer_cpus overlap: give each its own cores")
    mine = sets["--trainer_cpus"]
    if mine:
        import torch

        for tid in os.listdir("/proc/self/task"):  # threads started so far; later ones inherit
            os.sched_setaffinity(int(tid), mine)
        torch.set_num_threads(len(mine))
    return sets["--server_cpus"], mine


def start_server(student: Path, port: int, log: Path, cpus: set[int] = frozenset()) -> subprocess.Popen:
    """`vllm serve` of the student with gkd's weight-sync extension (on ``cpus`` if given), healthy before
    this returns."""
    from gkd.errors import GKDError
    from gkd.httpclient import ServerClient

    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(student), "--host",
           "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
           "--kv-cache-memory-bytes", "512M",
           "--worker-extension-cls", "gkd.rollout.vllm_worker.WeightSync", "--no-enable-chunked-prefill",
           "--max-num-batched-tokens", "8192", "--distributed-executor-backend", "uni"]
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    pin = None
    if cpus:  # vLLM binds its OpenMP threads itself: to these cores, not to a whole NUMA node
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, sorted(cpus)))
        pin = lambda: os.sched_setaffinity(0, cpus)  # noqa: E731 - in the child, before exec
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, preexec_fn=pin)
    client = ServerClient(f"http://127.0.0.1:{port}", None, 5, what="vLLM server")
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            client.wait_healthy(5)
            return proc
        except GKDError:
            continue
    proc.kill()
    raise SystemExit(f"the vLLM server did not start: see {log}")


class Clock:
    """Seconds spent in named calls of one step (wrapped methods add to it)."""

    def __init__(self):
        self.spent: dict[str, float] = {}

    def wrap(self, owner, name: str, label: str) -> None:
        call = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.spent[label] = self.spent.get(label, 0.0) + time.perf_counter() - t0

        setattr(owner, name, timed)


def run(a, teacher: Path, student: Path, data: Path, port: int, n: int, out: Path) -> list[dict]:
    """One training run with --async_generation n; per step: wall, generation wait, sync and training seconds."""
    from gkd.config import TrainConfig
    from gkd.train.stats import Window
    from gkd.train.trainer import Trainer

    cfg = TrainConfig(model=str(student), teacher_model=str(teacher), dataset=[str(data)], output_dir=str(out),
                      overwrite_output_dir=True, lmbda=1.0, beta=0.5, temperature=0.9,
                      max_completion_length=a.max_completion_length, micro_batch_size=a.batch,
                      global_batch_size=a.batch, max_steps=a.steps, learning_rate=1e-5, progress_bar=False,
                      use_vllm=True, vllm_mode="server", vllm_server_port=port, async_generation=n)
    trainer = Trainer(cfg, log=lambda *_: None)
    clock = Clock()
    # N = 0 samples in this thread (generate); N = 1 waits in take for the request made during the last step
    clock.wrap(trainer.rollout, "generate" if n == 0 else "take", "generation")
    clock.wrap(trainer.rollout, "sync", "sync")
    steps = []
    try:
        for step in range(a.steps):
            clock.spent.clear()
            window = Window()
            t0 = time.perf_counter()
            trainer.train_step(step, window)
            wall = time.perf_counter() - t0
            gen, sync = clock.spent.get("generation", 0.0), clock.spent.get("sync", 0.0)
            # generate syncs inside itself (N = 0): training is what neither took
            own_gen = gen - sync if n == 0 else gen
            steps.append({"wall": wall, "generation": own_gen, "sync": sync, "training": wall - own_gen - sync,
                          "generated": window.tokens, "trained": window.tokens + sum(
                              len(r.prompt_ids) for r in trainer.data.rows(step))})
    finally:
        trainer.close()
    return steps


def median(steps: list[dict], key: str) -> float:
    return statistics.median(s[key] for s in steps[1:])


def table(a, runs: dict[int, list[dict]], pins: tuple[set[int], set[int]]) -> None:
    sync0 = runs[0]
    bound = max(median(sync0, "generation"), median(sync0, "training")) + median(sync0, "sync")
    print(f"\nasync_rollout.py, {time.strftime('%Y-%m-%d')}: {a.steps} steps of {a.batch} rows, "
          f"{a.max_completion_length} new tokens at most, medians of steps 2..{a.steps}; server on CPUs "
          f"{sorted(pins[0]) or 'any'}, trainer on {sorted(pins[1]) or 'any'}")
    print("| --async_generation | s/step | generation s | sync s | training s | generated tokens/step "
          "| trained tokens/step |")
    print("|---|---|---|---|---|---|---|")
    for n, steps in runs.items():
        cells = [f"{median(steps, k):.3f}" for k in ("wall", "generation", "sync", "training")]
        cells += [f"{median(steps, k):.0f}" for k in ("generated", "trained")]
        print(f"| {n} | " + " | ".join(cells) + " |")
    wall1 = median(runs[1], "wall")
    print(f"\nmax(generation, training) + sync of N = 0: {bound:.3f} s; + 15 %: {1.15 * bound:.3f} s; "
          f"N = 1 measured {wall1:.3f} s = {wall1 / bound:.2f} x the bound (target <= 1.15); speed-up "
          f"N = 0 / N = 1: {median(runs[0], 'wall') / wall1:.2f}x")


def main() -> None:
    from e2e_vs_trl import smollm2_pair

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max_completion_length", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="pairs of runs, N = 0 then 1; the table gives the last")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-async"), help="models, data and run folders")
    ap.add_argument("--server_cpus", default="", help="CPU ids for the vLLM server, e.g. 1 or 2-3 (default: any)")
    ap.add_argument("--trainer_cpus", default="", help="CPU ids for the trainer, e.g. 0 (default: any)")
    a = ap.parse_args()
    pins = pin_cpus(a.server_cpus, a.trainer_cpus)
    a.work.mkdir(parents=True, exist_ok=True)
    teacher, student = smollm2_pair(a.work)
    data = prompt_rows(a.work)
    port = free_port()
    server = start_server(student, port, a.work / "server.log", pins[0])
    try:
        for _ in range(a.repeats):  # alternating; the last pair counts (the first warms this process up)
            runs = {n: run(a, teacher, student, data, port, n, a.work / f"out-n{n}") for n in (0, 1)}
    finally:
        server.terminate()
        server.wait(timeout=60)
    table(a, runs, pins)


if __name__ == "__main__":
    main()
