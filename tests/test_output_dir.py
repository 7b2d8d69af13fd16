"""The output folder through the CLI: one run per folder, torn metrics lines, failed writes in one line,
leftovers of killed prunes cleaned, and the Weights & Biases sink offline."""

import errno
import json
import os
from pathlib import Path

import pytest

from gkd.cli import main
from gkd.train.metrics import MetricsLog, read_metrics


def train_args(tiny, out, *extra):
    return ["train", "--model", tiny["student"], "--teacher_model", tiny["teacher"], "--dataset", tiny["data"],
            "--output_dir", str(out), "--max_completion_length", "6", "--micro_batch_size", "4",
            "--global_batch_size", "8", "--progress_bar", "false", "--lmbda", "0", "--learning_rate", "1e-3", *extra]


def listing(out: Path) -> dict:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*"))}


def steps(out: Path) -> list[int]:
    return [m["step"] for m in read_metrics(out / "metrics.jsonl")]


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("checkpoint-*"))


def test_a_folder_holding_another_run_is_refused_or_overwritten_never_mixed(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(train_args(tiny, out, "--max_steps", "4", "--save_steps", "2", "--save_total_limit", "5")) == 0
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"] and steps(out) == [1, 2, 3, 4]
    before = listing(out)
    capsys.readouterr()

    # a new run there: refused in one line, the folder untouched
    assert main(train_args(tiny, out, "--max_steps", "3", "--save_steps", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds another run" in err and "checkpoint-4" in err, err
    assert "--resume_from_checkpoint latest" in err and "--overwrite_output_dir" in err
    assert listing(out) == before

    # asked for: the old run is deleted first, and only the new run's steps and checkpoints remain
    assert main(train_args(tiny, out, "--max_steps", "3", "--save_steps", "1", "--overwrite_output_dir", "true")) == 0
    assert steps(out) == [1, 2, 3] and checkpoints(out) == ["checkpoint-2", "checkpoint-3"]
    assert json.loads((out / "checkpoint-3" / "gkd_checkpoint.json").read_text())["step"] == 3

    # latest is this run's newest; going back past a newer checkpoint of the run is refused
    capsys.readouterr()
    assert main(train_args(tiny, out, "--max_steps", "3", "--resume_from_checkpoint", str(out / "checkpoint-2"))) == 2
    err = capsys.readouterr().err
    assert "newer checkpoints of this run (checkpoint-3)" in err, err
    assert main(train_args(tiny, out, "--max_steps", "4", "--resume_from_checkpoint", "latest")) == 0
    assert "resumed from" in capsys.readouterr().err and steps(out) == [1, 2, 3, 4]


def test_a_torn_last_metrics_line_does_not_block_plot_or_resume(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(train_args(tiny, out, "--max_steps", "2", "--save_steps", "1")) == 0
    with open(out / "metrics.jsonl", "ab") as fh:
        fh.write(b'{"step": 3, "loss": 0.12')  # a kill or a full disk mid-line
    (out / "loss_curve.png").unlink()
    assert main(["plot", str(out)]) == 0 and (out / "loss_curve.png").is_file()
    assert main(train_args(tiny, out, "--max_steps", "3", "--resume_from_checkpoint", "latest")) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [1, 2, 3]  # every line whole again

    lines.insert(1, '{"step": 1.5, "lo')  # damage in the middle is not a torn tail: named, not skipped
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert main(["plot", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("metrics.jsonl:2: not a JSON line (the file is damaged; remove that line)"), err


def test_a_metrics_line_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    log = MetricsLog(tmp_path)
    log.log(1, {"loss": 1.0})
    real_write = os.write

    def half_then_full(fd, data):  # the disk fills in the middle of the line
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", half_then_full)
    from gkd.errors import GKDError

    with pytest.raises(GKDError, match="writing metrics failed: No space left on device .*MiB free"):
        log.log(2, {"loss": 0.5})
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_text() == json.dumps({"step": 1, "loss": 1.0}) + "\n"


def test_disk_full_during_a_checkpoint_save_is_one_line_and_leaves_no_temp_folder(tiny, tmp_path, capsys, monkeypatch):
    """A simulated ENOSPC inside torch.distributed.checkpoint's writer (tests/test_faults.py fills a real tmpfs)."""
    from torch.distributed.checkpoint import filesystem

    real = filesystem.FileSystem.create_stream

    def create_stream(self, path, mode):
        if ".checkpoint-2.tmp" in str(path) and "w" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(self, path, mode)

    monkeypatch.setattr(filesystem.FileSystem, "create_stream", create_stream)
    out = tmp_path / "out"
    assert main(train_args(tiny, out, "--max_steps", "3", "--save_steps", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "saving checkpoint-2 failed: No space left on device" in err and "MiB free" in err, err
    assert "--resume_from_checkpoint latest" in err
    assert not list(out.glob(".checkpoint-*")) and checkpoints(out) == ["checkpoint-1"]
    monkeypatch.undo()
    assert main(train_args(tiny, out, "--max_steps", "3", "--resume_from_checkpoint", "latest")) == 0
    assert steps(out) == [1, 2, 3]


def test_leftovers_of_killed_saves_and_prunes_are_cleaned_and_never_counted(tiny, tmp_path, capsys):
    """Only gkd's own temp names are cleaned (a prune killed midway, a save killed midway); a checkpoint-N
    without gkd's marker is another tool's: a resume refuses it rather than delete it or count it."""
    out = tmp_path / "out"
    assert main(train_args(tiny, out, "--max_steps", "2", "--save_steps", "1", "--save_total_limit", "5")) == 0
    (out / ".checkpoint-0.deleting").mkdir()
    (out / ".checkpoint-3.tmp" / "state").mkdir(parents=True)
    (out / "checkpoint-7").mkdir()
    resume = train_args(tiny, out, "--max_steps", "4", "--save_steps", "1", "--save_total_limit", "2",
                        "--resume_from_checkpoint", "latest")
    capsys.readouterr()
    assert main(resume) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{out} holds checkpoint-7, which gkd did not write" in err, err
    assert (out / "checkpoint-7").is_dir() and (out / ".checkpoint-3.tmp").is_dir()
    (out / "checkpoint-7").rmdir()
    assert main(resume) == 0
    assert checkpoints(out) == ["checkpoint-3", "checkpoint-4"]
    assert not list(out.glob(".checkpoint-*"))


def test_another_tools_checkpoints_are_never_deleted(tiny, tmp_path, capsys):
    """HF Trainer, TRL and ms-swift name their checkpoints checkpoint-N too: a fresh run refuses a folder
    holding one without gkd's marker (also with --overwrite_output_dir), naming it, and leaves it as it was."""
    out = tmp_path / "hf"
    (out / "checkpoint-500").mkdir(parents=True)
    (out / "checkpoint-500" / "trainer_state.json").write_text("{}")
    (out / "checkpoint-500" / "model.safetensors").write_bytes(b"weights")
    before = listing(out)
    for extra in ((), ("--overwrite_output_dir", "true")):
        assert main(train_args(tiny, out, "--max_steps", "1", *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--output_dir {out} holds checkpoint-500, which gkd did not" in err, err
    assert listing(out) == before


def prune_args(teacher, out, *extra):
    return ["prune", "--teacher_model", str(teacher), "--output_dir", str(out), "--keep_layers", "0,1", *extra]


def test_prune_never_overwrites_what_it_did_not_write(tiny, tmp_path, capsys):
    """gkd prune refuses the teacher's own folder and any non-empty folder but its own earlier output, which
    --overwrite_output_dir replaces; the teacher and the user's files stay as they were."""
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny["teacher"], teacher)
    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    kept = {p: listing(p) for p in (teacher, mine)}
    for out, says in ((teacher, "the teacher's folder"), (teacher / "student", "the teacher's folder"),
                      (mine, "is not empty and is not a gkd prune output")):
        assert main(prune_args(teacher, out)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--output_dir {out}" in err and says in err, err
    assert {p: listing(p) for p in (teacher, mine)} == kept

    student, empty = tmp_path / "student", tmp_path / "empty"
    empty.mkdir()
    for theirs in ("student.tmp", "student.old"):  # the user's, beside the output: the atomic write leaves them be
        (tmp_path / theirs).mkdir()
        (tmp_path / theirs / "keep.txt").write_text("mine")
    assert main(prune_args(teacher, student)) == 0 and main(prune_args(teacher, empty)) == 0
    capsys.readouterr()
    assert main(prune_args(teacher, student, "--keep_layers", "0")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite_output_dir true replaces it" in err, err
    assert main(prune_args(teacher, student, "--keep_layers", "2", "--overwrite_output_dir", "true")) == 0
    assert json.loads((student / "gkd_prune.json").read_text())["layers_kept"] == [2]
    assert json.loads((student / "config.json").read_text())["num_hidden_layers"] == 1
    assert listing(teacher) == kept[teacher]
    assert all((tmp_path / t / "keep.txt").read_text() == "mine" for t in ("student.tmp", "student.old"))


def test_eval_output_is_checked_before_the_work_and_written_whole(tiny, tmp_path, capsys):
    """--output naming a folder is one line before any model loads; a results file is replaced whole."""
    args = ["eval", "--model", tiny["student"], "--teacher_model", tiny["teacher"], "--dataset", tiny["prompts"],
            "--max_completion_length", "3", "--output"]
    folder = tmp_path / "results"
    folder.mkdir()
    assert main([*args, str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--output {folder}: is a folder" in err, err
    result = folder / "eval.json"
    result.write_text("old")
    assert main([*args, str(result)]) == 0
    assert json.loads(result.read_text())["prompts"] == 8 and [p.name for p in folder.iterdir()] == ["eval.json"]


@pytest.mark.needs_module("wandb")  # scripts/setup.sh installs it (the wandb extra)
def test_report_to_wandb_offline(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    assert main(train_args(tiny, out, "--max_steps", "2", "--report_to", "wandb", "tensorboard")) == 0
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").rglob("*"))
    logged = b"".join(f.read_bytes() for f in runs[0].glob("*.wandb"))
    assert b"top1_agreement" in logged and b"divergence" in logged  # the metrics went to the run
    run_id = (out / "wandb" / "gkd_run_id").read_text().strip()
    assert runs[0].name.endswith(run_id)
    assert list((out / "tensorboard").glob("events.*"))


def test_report_to_wandb_without_the_package_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    assert main(train_args(tiny, tmp_path / "out", "--max_steps", "1", "--report_to", "wandb")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install" in err and "wandb" in err, err
