"""`python tests/killpoint.py GKD-ARGS...`: run `gkd` and SIGKILL it at the N-th executed line of a
checkpoint save or of the final export (our code, torch.distributed.checkpoint's file writer,
torch.save and transformers' save_pretrained), N = $GKD_KILL_AT.

With GKD_KILL_AT=0 nothing is killed and the number of such lines in saves and in the export is written
as JSON to $GKD_KILL_COUNT, so that a test can pick kill points spread over both."""

import json
import os
import signal
import sys
from pathlib import Path

from gkd.cli import main
from gkd.train import checkpoint

WATCHED = ("gkd/train/checkpoint.py", "gkd/train/outdir.py", "gkd/models/load.py", "torch/distributed/checkpoint/filesystem.py",
           "torch/serialization.py", "transformers/modeling_utils.py")
KILL_AT = int(os.environ.get("GKD_KILL_AT", "0"))
counts = {"save": 0, "export": 0}
phase = None


def _line(frame, event, arg):
    if event == "line":
        counts[phase] += 1
        if counts["save"] + counts["export"] == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
    return _line


def _call(frame, event, arg):
    return _line if frame.f_code.co_filename.endswith(WATCHED) else None


def traced(name, fn):
    def run(*args, **kwargs):
        global phase
        phase = name
        sys.settrace(_call)
        try:
            return fn(*args, **kwargs)
        finally:
            sys.settrace(None)

    return run


checkpoint.save = traced("save", checkpoint.save)
checkpoint.export = traced("export", checkpoint.export)
rc = main(sys.argv[1:])
if os.environ.get("GKD_KILL_COUNT"):
    Path(os.environ["GKD_KILL_COUNT"]).write_text(json.dumps(counts))
sys.exit(rc)
