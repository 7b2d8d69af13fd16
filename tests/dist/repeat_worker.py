"""Under torchrun, as a job of batch_worker.py (whose default group outlives each job, as a launcher's does):
the same `gkd train` twice in these processes. After each, the process's group count and thread count go to
OUT/held.rank-R.json, so a test sees whether the second training made new groups (each holds threads and
sockets) or took the first one's. Usage (a job's args): OUT GKD-TRAIN-ARGS... (their --output_dir is set here)."""

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
from torch.distributed import distributed_c10d

from gkd.cli import main


def run(args):
    out, train = Path(args[0]), list(args[1:])
    held = []
    for i in (1, 2):
        if main([*train, "--output_dir", str(out / f"run{i}")]) not in (0, None):
            sys.exit(1)
        held.append({"groups": len(distributed_c10d._world.pg_map), "threads": len(os.listdir("/proc/self/task"))})
    (out / f"held.rank-{dist.get_rank()}.json").write_text(json.dumps(held))
