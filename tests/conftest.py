import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

# One thread per pytest process, as every process the tests start has (ENV below): the two workers share two
# cores, and torch's default of a thread per core spends more time synchronising threads than computing on the
# tiny models (tests/test_families.py on one worker: 61 s with two threads, 19 s with one).
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# what every process a test starts runs under: one thread each (several share 2 cores), gloo on loopback
ENV = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))


def run_torchrun(script: Path, nproc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a script under torchrun on 127.0.0.1 with gloo-friendly settings; returns the finished process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)


def gkd_subprocess(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m gkd ARGS` in a fresh process: for runs whose arithmetic must not depend on what this pytest
    worker ran before (a vLLM test makes torch.set_num_threads a no-op here), for kill tests and real CLIs."""
    return subprocess.run([sys.executable, "-m", "gkd", *args], capture_output=True, text=True, timeout=timeout,
                          env=ENV, cwd=ROOT)


def gkd_in_process(*args: str) -> subprocess.CompletedProcess:
    """`gkd ARGS` run in this process (what `python -m gkd` runs, without the ~4 s of imports per call):
    its exit code and what it printed. For user-mistake tests; a few of them still run the real command."""
    import contextlib
    import io

    from gkd.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's own errors
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(["gkd", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture
def torchrun():
    return run_torchrun


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of a tiny teacher, a tiny student (same tokenizer) and a small dataset."""
    from tiny import write_dataset, write_model

    root = tmp_path_factory.mktemp("tiny")
    return {
        "teacher": str(write_model(root / "teacher", layers=3, seed=1)),
        "student": str(write_model(root / "student", layers=2, seed=2)),
        "data": str(write_dataset(root / "train.jsonl", n=16)),
        "prompts": str(write_dataset(root / "prompts.jsonl", n=8, seed=5, prompt_only=True)),
        "root": root,
    }
