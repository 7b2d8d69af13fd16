"""Run a command as on a slower 2-core machine: this CPU held to AVX2 code paths and paused for a share of each
10 ms, so that a 2048-square float32 matmul runs at --gflop_s (the README's slower machine: 70 GFLOP/s, AVX2).

    .venv/bin/python benchmarks/slower_machine.py --gflop_s 70 -- .venv/bin/gkd demo --output_dir runs/demo-slow

AVX2: ATen's, MKL's and oneDNN's kernels are told to use no wider vector instructions than the slower machine has
(their environment variables; the same numerics paths as there). Pausing: the command's process group is stopped
(SIGSTOP) and resumed (SIGCONT) every period, running the share of it that brings the matmul rate down to the
target (corrected for the pause's own slack, measured on the gauge first). That share follows this machine's own
speed, which drifts on a shared host: every --every_s seconds the command is stopped while a gauge process (started
once, idle between) times three unpaused matmuls after a warm-up, and the share is set from that. The gauge's
seconds count in the command's wall time (about 2 % of it at 30 s).

The pause slows everything by the same factor, memory traffic included (the emulated machine reads memory at about
12 GB/s where the slower machine reads 20), while caches and the core's design are not emulated. Checked once
against the one program timed on the slower machine itself (the demo at b791be5, 2026-12-03: 1676 s of training
there), the script as at b628cd0 (its gauge then two matmuls without a warm-up) trained it in 1588 s, 5 % faster,
one run on each side (benchmarks/RESULTS.md). The script prints the rates it measured (medians of back-to-back
repeats: a best-of would catch the runs between pauses), warns when the pause missed its target, and exits with
the command's status.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

ISA = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
       "native": {}}
# One line in ("matmuls reads"), one JSON line out: the median rate of that many matmuls and the mean bandwidth of
# that many 1 GiB reads, each after one untimed warm-up (a matmul after a long idle runs slow); "free" drops the
# 1 GiB buffer, used only before the command starts.
GAUGE = """
import json, statistics, sys, time, torch
a, b, big = torch.randn(2048, 2048), torch.randn(2048, 2048), torch.ones(2**28)
def seconds(f, n):
    f()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        out.append(time.perf_counter() - t0)
    return out
print(json.dumps({"isa": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}), flush=True)
for line in sys.stdin:
    if line.strip() == "free":
        big = None
        continue
    mm, reads = map(int, line.split())
    print(json.dumps({"gflop_s": 2 * 2048**3 / statistics.median(seconds(lambda: a @ b, mm)) / 1e9,
                      "gb_s": big.numel() * 4 / statistics.mean(seconds(big.sum, reads)) / 1e9 if reads else None}),
          flush=True)
"""


class Gauge:
    """A process that times matmuls (and reads) on request, in the command's environment."""

    def __init__(self, env: dict):
        self.proc = subprocess.Popen([sys.executable, "-c", GAUGE], env=env, start_new_session=True, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        first = self.proc.stdout.readline()
        if not first:
            self.proc.wait()
            raise SystemExit(f"the gauge process did not start (exit {self.proc.returncode}): can {sys.executable} "
                             "import torch?")
        self.info = json.loads(first)

    def rates(self, matmuls: int, reads: int = 0) -> dict:
        self.proc.stdin.write(f"{matmuls} {reads}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def free(self) -> None:
        self.proc.stdin.write("free\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Pacer(threading.Thread):
    """Stops and resumes a process group so that it runs ``duty`` of every ``period`` seconds; ``hold`` keeps it
    stopped (while the gauge runs alone)."""

    def __init__(self, pgid: int, duty: float, period: float):
        super().__init__(daemon=True)
        self.pgid, self.duty, self.period = pgid, duty, period
        self.lock, self.done = threading.Lock(), threading.Event()

    def _signal(self, sig) -> None:
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            self.done.set()

    def run(self) -> None:
        while not self.done.is_set():
            time.sleep(self.duty * self.period)
            if not self.lock.acquire(timeout=self.period):  # held (or left held by an interrupt): look at done again
                continue
            try:
                self._signal(signal.SIGSTOP)
                time.sleep((1 - self.duty) * self.period)
                self._signal(signal.SIGCONT)
            finally:
                self.lock.release()

    def hold(self):
        self.lock.acquire()
        self._signal(signal.SIGSTOP)

    def release(self) -> None:
        self._signal(signal.SIGCONT)
        self.lock.release()

    def stop(self) -> None:
        self.done.set()
        self.join()
        self._signal(signal.SIGCONT)


def positive(text: str) -> float:
    x = float(text)
    if not 0 < x < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return x


def calibrate(gauge: Gauge, target: float, period: float) -> tuple[float, dict, dict]:
    """(slack, unpaused rates, paused rates): the gauge paced as the command will be. The pause's own slack (a stop
    lands a little late) is the ratio of the target to the paused rate at the share the unpaused rate calls for;
    each try measures the unpaused rate next to the paused one, so the machine's drift stays out of the slack."""
    slack = 1.0
    for attempt in range(3):  # twice corrected, the third printed
        unpaused = gauge.rates(16, 4 if attempt == 2 else 0)
        if unpaused["gflop_s"] <= target:
            raise SystemExit(f"this machine's matmul rate, {unpaused['gflop_s']:.0f} GFLOP/s, is not above --gflop_s "
                             f"{target:g}: nothing to slow down")
        pacer = Pacer(gauge.proc.pid, min(1.0, slack * target / unpaused["gflop_s"]), period)
        pacer.start()
        try:
            paused = gauge.rates(16, 4 if attempt == 2 else 0)
        finally:
            pacer.stop()
        if attempt < 2:
            slack *= target / paused["gflop_s"]
    return slack, unpaused, paused


def follow(proc: subprocess.Popen, pacer: Pacer, gauge: Gauge, aim: float, every_s: float) -> tuple[list, int]:
    """Pace ``proc`` until it exits, resetting the share to ``aim`` / the machine's gauged rate every ``every_s``
    seconds (``aim``: the target with the pause's slack in); (the gauged rates, how many of them left no pause)."""
    speeds, capped, last = [], 0, time.perf_counter()
    pacer.start()
    try:
        while proc.poll() is None:
            time.sleep(0.2)
            if time.perf_counter() - last < every_s:
                continue
            pacer.hold()
            try:
                speeds.append(gauge.rates(3)["gflop_s"])
            except (OSError, ValueError) as e:  # the gauge died: the command goes on at the last share
                print(f"[slower] WARNING: the gauge failed ({e}); the share stays {pacer.duty:.0%}", flush=True)
                every_s = float("inf")
            else:
                pacer.duty = min(1.0, aim / speeds[-1])
                capped += pacer.duty == 1.0
            finally:
                pacer.release()
            last = time.perf_counter()
    except BaseException:  # never leave the command's group stopped or running behind us
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    finally:
        pacer.stop()
    return speeds, capped


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gflop_s", type=positive, default=70.0, help="the emulated machine's 2048-square matmul rate")
    ap.add_argument("--isa", choices=sorted(ISA), default="avx2", help="widest vector instructions the libraries use")
    ap.add_argument("--period", type=positive, default=0.01, help="seconds of one run-and-pause cycle")
    ap.add_argument("--every_s", type=positive, default=30.0, help="seconds between two gauges of the machine's speed")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    a = ap.parse_args()
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        ap.error("no command: give it after --")
    if shutil.which(cmd[0]) is None:
        ap.error(f"command not found: {cmd[0]}")
    env = {**os.environ, **ISA[a.isa]}
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a kill of this script ends the command too (below)
        signal.signal(sig, lambda n, _: sys.exit(128 + n))
    load = os.getloadavg()
    gauge = Gauge(env)
    try:
        slack, unpaused, paused = calibrate(gauge, a.gflop_s, a.period)
        gauge.free()
        duty = min(1.0, slack * a.gflop_s / unpaused["gflop_s"])
        off = abs(paused["gflop_s"] / a.gflop_s - 1)
        print(f"[slower] load {load[0]:.2f} {load[1]:.2f}; {gauge.info['isa']}, {gauge.info['threads']} threads: "
              f"{unpaused['gflop_s']:.0f} GFLOP/s, {unpaused['gb_s']:.1f} GB/s; running {duty:.0%} of every "
              f"{a.period * 1e3:.0f} ms: {paused['gflop_s']:.0f} GFLOP/s, {paused['gb_s']:.1f} GB/s"
              + (f" (WARNING: {off:.0%} off the target: the machine's speed moved while calibrating)" if off > 0.05
                 else ""), flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        speeds, capped = follow(proc, Pacer(proc.pid, duty, a.period), gauge, slack * a.gflop_s, a.every_s)
        rc, wall = proc.wait(), time.perf_counter() - t0
        after = gauge.rates(16) if gauge.proc.poll() is None else {"gflop_s": float("nan")}
    finally:
        gauge.close()
    seen = speeds or [unpaused["gflop_s"]]
    print(f"[slower] the command: exit {rc}, {wall:.0f} s wall; the machine's own {gauge.info['isa']} rate "
          f"{unpaused['gflop_s']:.0f} GFLOP/s before, then gauged {len(speeds)} times: median "
          f"{statistics.median(seen):.0f}, {min(seen):.0f}-{max(seen):.0f}, {after['gflop_s']:.0f} after"
          + (f"; WARNING: at or below the target {capped} of those times, when the command ran unpaused" if capped
             else ""), flush=True)
    return 128 - rc if rc < 0 else rc


if __name__ == "__main__":
    sys.exit(main())
