"""Fault injection: kill -9 at seeded points of checkpoint saves and of the final export, a disk that fills
up mid-run or inside a large file (a small tmpfs in a private mount namespace), an output folder remounted
read-only mid-run, and two runs started at once into one folder.
Each ends in one line or resumes exactly (the same losses), and no complete checkpoint is ever damaged.
Every run here is a fresh process (killed, or resuming with the arithmetic of the killed one)."""

import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gkd.train.metrics import read_metrics
from helpers import ENV, ROOT, gkd_subprocess

pytestmark = pytest.mark.slow


def train_args(tiny, out, *extra):
    return ["train", "--model", tiny["student"], "--teacher_model", tiny["teacher"], "--dataset", tiny["data"],
            "--output_dir", str(out), "--max_completion_length", "6", "--micro_batch_size", "4",
            "--global_batch_size", "8", "--progress_bar", "false", "--lmbda", "0.5", "--learning_rate", "1e-3",
            "--lr_scheduler_type", "constant", "--save_total_limit", "2", *extra]


def losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(out / "metrics.jsonl")}


def resume(tiny, out: Path, *extra) -> None:
    """In a fresh process on one thread, like the runs under test: the same arithmetic."""
    proc = gkd_subprocess(*train_args(tiny, out, *extra))
    assert proc.returncode == 0, proc.stderr[-2000:]


def assert_checkpoints_intact(out: Path) -> list[int]:
    """Every complete checkpoint is whole: its DCP metadata reads, each stored item lies within its file,
    and the scheduler / RNG files load. Returns their steps."""
    from torch.distributed.checkpoint import FileSystemReader

    steps = []
    for ck in sorted(out.glob("checkpoint-*")):
        if not (ck / "gkd_checkpoint.json").is_file():
            continue
        meta = FileSystemReader(str(ck / "state")).read_metadata()
        for item in meta.storage_data.values():
            assert (ck / "state" / item.relative_path).stat().st_size >= item.offset + item.length, (ck, item)
        torch.load(ck / "trainer.pt", weights_only=False)
        torch.load(ck / "rng-0.pt", weights_only=False)
        steps.append(json.loads((ck / "gkd_checkpoint.json").read_text())["step"])
    return steps


def assert_clean(out: Path, keep: int = 2) -> None:
    assert not list(out.glob(".checkpoint-*")) and not (out / ".final.tmp").exists() and not (out / ".final.old").exists()
    assert len(list(out.glob("checkpoint-*"))) <= keep
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out / "final"))


# --------------------------------------------------------------------------------------------------
# kill -9 inside saves and the export
# --------------------------------------------------------------------------------------------------


def killed_run(tiny, out: Path, kill_at: int, count_file: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(ENV, GKD_KILL_AT=str(kill_at), **({"GKD_KILL_COUNT": str(count_file)} if count_file else {}))
    return subprocess.run([sys.executable, str(ROOT / "tests" / "killpoint.py"),
                           *train_args(tiny, out, "--max_steps", "3", "--save_steps", "1")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    """The run without faults: its losses, how many traced lines its saves and its export execute, and its folder."""
    root = tmp_path_factory.mktemp("uninterrupted")
    proc = killed_run(tiny, root / "out", 0, root / "count.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return losses(root / "out"), json.loads((root / "count.json").read_text()), root / "out"


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_kill_9_in_a_save_or_the_export_then_resume(tiny, tmp_path, uninterrupted, seed):
    reference, counts, _ = uninterrupted
    assert counts["save"] > 100 and counts["export"] > 100, counts
    rng = random.Random(seed)
    # even seeds inside one of the three saves (the third prunes), odd ones inside the export
    kill_at = rng.randint(1, counts["save"]) if seed % 2 == 0 else counts["save"] + rng.randint(1, counts["export"])
    out = tmp_path / "out"
    proc = killed_run(tiny, out, kill_at)
    assert proc.returncode == -9, (proc.returncode, proc.stderr[-2000:])

    saved = assert_checkpoints_intact(out)
    if (out / "final").is_dir():  # present only as a whole folder
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(str(out / "final"))
    again = ("--resume_from_checkpoint", "latest") if saved else ("--overwrite_output_dir", "true")
    resume(tiny, out, "--max_steps", "3", "--save_steps", "1", *again)
    assert losses(out) == reference, (kill_at, saved)  # exactly, every step
    assert_clean(out)


# --------------------------------------------------------------------------------------------------
# a full disk and a read-only folder, for real: a tmpfs in a private mount namespace
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def private_mounts():
    """A private mount namespace (`unshare -m`, root here), or the test fails saying why: never a skip, which
    would keep the suite green with the disk faults untested. Not simulated instead: running as root, a mode
    0555 folder stays writable, and RLIMIT_FSIZE gives EFBIG (SIGXFSZ), not the ENOSPC of a full disk."""
    if not shutil.which("unshare"):
        pytest.fail("these tests need unshare (util-linux) to mount a small tmpfs in a private mount namespace",
                    pytrace=False)
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True, text=True)
    if probe.returncode:
        pytest.fail(f"these tests need a private mount namespace (unshare -m, as root or with CAP_SYS_ADMIN) to mount "
                    f"a small tmpfs; here: {probe.stderr.strip()}", pytrace=False)


def run_on_tmpfs(tiny, tmp_path, trigger: str, action: str, size: str = "16m",
                 steps: tuple = ("--max_steps", "60", "--save_steps", "2")) -> tuple[int, str, Path]:
    """Train on a tmpfs of ``size`` (16 MiB); once ``trigger`` (a shell test) holds, run ``action`` (shell);
    returns the exit code, the last stderr line and a copy of the output folder taken when the run ended."""
    mnt, keep, log = tmp_path / "mnt", tmp_path / "kept", tmp_path / "stderr.txt"
    mnt.mkdir()
    cmd = " ".join(f"'{a}'" for a in [sys.executable, "-m", "gkd", *train_args(tiny, mnt / "run", *steps)])
    script = f"""
set -u
mount -t tmpfs -o size={size} tmpfs '{mnt}'
cd '{ROOT}'
{cmd} > /dev/null 2> '{log}' &
pid=$!
until {trigger} || ! kill -0 $pid 2>/dev/null; do sleep 0.01; done
{action}
wait $pid; rc=$?
rm -f '{mnt}/filler'
cp -a '{mnt}/run' '{keep}'
exit $rc
"""
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c", script], env=ENV,
                          capture_output=True, text=True, timeout=300)
    lines = log.read_text().strip().splitlines()
    return proc.returncode, lines[-1] if lines else proc.stderr, keep


def assert_resumes_exactly(tiny, out: Path, reference: dict[int, float]) -> None:
    """From the newest complete checkpoint, the next steps give the losses the faulted run logged, or the
    uninterrupted run's (the same options but the step count and save interval, which change no loss)."""
    expected = {**reference, **losses(out)}
    last = max(assert_checkpoints_intact(out))
    assert last + 1 in expected, (last, expected)
    redo = [s for s in sorted(expected) if s > last][:2]
    resume(tiny, out, "--max_steps", str(redo[-1]), "--save_steps", "2", "--resume_from_checkpoint", "latest")
    got = losses(out)
    assert all(got[s] == expected[s] for s in redo), (redo, got, expected)
    assert_clean(out)


@pytest.mark.parametrize("fault,action,says", [
    # fill the disk, then free 64 KiB: metrics lines still fit, a checkpoint does not
    ("disk full", "dd if=/dev/zero of='{mnt}/filler' bs=64k 2>/dev/null; truncate -s -64K '{mnt}/filler'",
     ["saving checkpoint-", "failed: No space left on device", "MiB free there", "--resume_from_checkpoint latest"]),
    ("read-only", "mount -o remount,ro '{mnt}'",
     ["failed: Read-only file system", "make the folder writable", "--resume_from_checkpoint latest"]),
])
def test_disk_full_or_read_only_mid_run_is_one_line_and_keeps_the_checkpoints(private_mounts, tiny, tmp_path,
                                                                             uninterrupted, fault, action, says):
    mnt = tmp_path / "mnt"
    rc, err, kept = run_on_tmpfs(tiny, tmp_path, trigger=f"[ -f '{mnt}/run/checkpoint-2/gkd_checkpoint.json' ]",
                                 action=action.format(mnt=mnt))
    assert rc == 2 and err.startswith("gkd: error: "), err
    assert all(s in err for s in says), err
    if fault == "disk full":  # (a read-only folder may keep one, if the remount fell inside a save: resume removes it)
        assert not list(kept.glob(".checkpoint-*")), "the temp folder of a failed save is removed"
    assert_resumes_exactly(tiny, kept, uninterrupted[0])


def _pages(files) -> int:
    """Bytes a tmpfs charges for these files (whole 4 KiB pages)."""
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in files if f.is_file())


@pytest.mark.parametrize("inside", ["checkpoint", "export"])
def test_a_disk_that_fills_inside_a_large_file_is_one_line(private_mounts, tiny, tmp_path, uninterrupted, inside):
    """A tmpfs sized from the uninterrupted run so that the disk fills in the middle of checkpoint-2's tensor
    file (torch.save's writer may then say only "unexpected pos", see the next test), or of the final
    model.safetensors (safetensors says only "os error 28"): one line naming what was written and where, no
    temp folder left, checkpoint-1 whole."""
    ck = list((uninterrupted[2] / "checkpoint-3").rglob("*"))
    if inside == "checkpoint":  # checkpoint-1 fits, half of checkpoint-2's largest file does
        size = _pages(ck) + 32768 + max(f.stat().st_size for f in ck) // 2
        steps, says = ("--max_steps", "2", "--save_steps", "1"), "saving checkpoint-2 failed: No space left on device"
    else:  # checkpoint-1 fits, a quarter of the exported weights does
        size = _pages(ck) + 32768 + (uninterrupted[2] / "final" / "model.safetensors").stat().st_size // 4
        steps, says = ("--max_steps", "1"), "writing the final model final failed: No space left on device"
    rc, err, kept = run_on_tmpfs(tiny, tmp_path, trigger="false", action=":", size=f"{size // 1024}k", steps=steps)
    assert rc == 2 and err.startswith("gkd: error: ") and says in err and "MiB free there" in err, err
    assert str(tmp_path / "mnt" / "run") in err
    assert not list(kept.glob(".checkpoint-*")) and not (kept / ".final.tmp").exists() and not (kept / "final").exists()
    assert assert_checkpoints_intact(kept) == [1]


def test_torch_save_filling_the_disk_is_named(private_mounts, tmp_path):
    """torch.save (gkd's RNG and scheduler files, each tensor torch.distributed.checkpoint writes) swallows the
    ENOSPC of its writes and raises only "unexpected pos": gkd still names the full disk, in one line. Where a
    whole run's disk fills varies which error comes out; here it does not (a 256 KiB tmpfs, a 400 KB tensor)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    code = (f"import torch; from gkd.train import outdir\n"
            f"with outdir.writing('saving x', {str(mnt)!r}): torch.save(torch.zeros(100000), {str(mnt / 'x.pt')!r})")
    script = f"mount -t tmpfs -o size=256k tmpfs '{mnt}' && '{sys.executable}' -c \"{code}\""
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c", script], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"gkd.errors.GKDError: saving x failed: No space left on device ({mnt}); 0.0 MiB free there; " \
        "free some space or choose another --output_dir, then resume with --resume_from_checkpoint latest", last


# --------------------------------------------------------------------------------------------------
# two runs into one folder
# --------------------------------------------------------------------------------------------------


def test_two_runs_started_at_once_into_one_folder(tiny, tmp_path):
    """One of two identical runs started at once into one fresh folder refuses in one line (another run holds
    the folder) and the other trains alone (one metrics line per step); killed with SIGKILL, it leaves no
    stale lock: the next run resumes there."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "gkd", *train_args(tiny, out, "--max_steps", "100000", "--save_steps", "1")]
    logs = [tmp_path / f"stderr-{i}.txt" for i in range(2)]
    procs = []
    for log in logs:
        with open(log, "w") as fh:
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=fh, env=ENV, cwd=ROOT))
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(0.05)
        loser = next(i for i, p in enumerate(procs) if p.poll() is not None)
        winner = procs[1 - loser]
        err = logs[loser].read_text().strip()
        assert procs[loser].returncode == 2 and len(err.splitlines()) == 1, err
        assert err.startswith(f"gkd: error: --output_dir {out} is in use by another gkd run (pid {winner.pid})"), err
        while not list(out.glob("checkpoint-*/gkd_checkpoint.json")):
            assert winner.poll() is None, logs[1 - loser].read_text()[-2000:]
            time.sleep(0.05)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    got = [m["step"] for m in read_metrics(out / "metrics.jsonl")]
    assert got == list(range(1, len(got) + 1)), got
    last = max(assert_checkpoints_intact(out))
    resume(tiny, out, "--max_steps", str(last + 1), "--save_steps", "1", "--resume_from_checkpoint", "latest")
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")][-1] == last + 1
