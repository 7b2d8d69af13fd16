"""The jobs of a plan, in turn, in these processes: one plain process, or each rank under torchrun (one gloo
process group for all of them). Each process pays its start-up (~4-7 s of imports) once for all the jobs
instead of once per job. Usage: batch_worker.py PLAN.json, written by tests/helpers.py's Runs:

    {"logs": DIR, "jobs": [{"name": NAME, "call": "", "args": [GKD ARGS]},            # `gkd ARGS`
                           {"name": NAME, "call": "module:function", "args": [...]}]}  # a tests/dist function

A job's stdout and stderr (the file descriptors, so what C++ code and child processes print too) go to
DIR/NAME.rank-R.out and .err, and its exit code to DIR/NAME.rank-R.rc. A job that fails (an exception, a
non-zero return) ends this launch, since its peers may be waiting in a collective it never reaches; the jobs
after it are left for another launch. A job still running after JOB_SECONDS is killed (SIGALRM's default
action, which also ends a process blocked in a collective), and with it the launch."""

import importlib
import json
import os
import signal
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
JOB_SECONDS = 600  # the longest job (tests/dist/families_worker.py) takes ~40 s on the 2-core machine


def run_job(job: dict) -> int:
    if job["call"]:
        module, function = job["call"].split(":")
        return getattr(importlib.import_module(module), function)(job["args"]) or 0
    from gkd.cli import main

    return main(job["args"])


def logged(job: dict, logs: Path, rank: int) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    name = logs / f"{job['name']}.rank-{rank}"
    with open(f"{name}.out", "w") as out, open(f"{name}.err", "w") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            rc = run_job(job)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - reported in the job's own log
            traceback.print_exc()
            rc = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
    return rc


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    logs = Path(plan["logs"])
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        import gkd.parallel  # noqa: F401 - before the group (gkd.parallel.mesh says why)

        dist.init_process_group("gloo")  # kept by every job: gkd's setup makes its meshes in it
    for job in plan["jobs"]:
        signal.alarm(JOB_SECONDS)
        rc = logged(job, logs, rank)
        signal.alarm(0)
        (logs / f"{job['name']}.rank-{rank}.rc").write_text(str(rc))
        if rc != 0:
            print(f"batch_worker: {job['name']} failed on rank {rank} (exit code {rc}); see {logs}", file=sys.stderr,
                  flush=True)
            os._exit(1)  # the launcher ends the other ranks
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
