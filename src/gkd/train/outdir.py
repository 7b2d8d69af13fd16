"""The output folder: one run per folder, leftovers of killed saves cleaned, write failures in one line.

A run owns its ``--output_dir``. A fresh run refuses a folder that holds another run's checkpoints,
metrics or final model (their step numbers would mix with its own: pruning would delete the newer run's
checkpoints and ``latest`` would resume the other run); ``--overwrite_output_dir`` deletes them first,
``--resume_from_checkpoint`` continues them. A ``checkpoint-N`` without gkd's marker was written by another
tool (HF Trainer, TRL and ms-swift use that name too): never deleted, always refused. A live run holds a lock
on its folder (rank 0, ``flock`` on ``.gkd.lock``: it dies with the process), so a second run refuses it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import tempfile
from pathlib import Path

from gkd.errors import GKDError

DONE = "gkd_checkpoint.json"  # the last file a checkpoint save writes (in its temp folder, before the rename)
LOCK = ".gkd.lock"  # flock'ed by the live run's rank 0; never deleted (a new file would not be the same lock)
_CKPT = re.compile(r"checkpoint-(\d+)")
# what a run writes into its folder (anything else there is the user's and is left alone)
_RUN_FILES = ("metrics.jsonl", "loss_curve.png", "final", ".final.tmp", ".final.old", "tensorboard", "wandb",
              "vllm-sync")


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (their marker written), oldest first."""
    found = []
    for p in Path(out).glob("checkpoint-*"):
        m = _CKPT.fullmatch(p.name)
        if m and (p / DONE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def foreign(out: Path) -> list[str]:
    """``checkpoint-N`` entries without gkd's marker: another tool's (gkd's own saves are renamed into place
    with the marker already inside, and deleted by renaming them away first, so gkd never leaves one)."""
    return sorted((p.name for p in Path(out).glob("checkpoint-*") if _CKPT.fullmatch(p.name) and not (p / DONE).is_file()),
                  key=lambda n: int(n.split("-")[1]))


def leftovers(out: Path) -> list[Path]:
    """What killed saves and prunes leave, under names only gkd uses: temp folders (``.checkpoint-N.tmp``,
    ``.final.tmp``) and folders being deleted (``.checkpoint-N.deleting``, ``.final.old``). Never a ``checkpoint-N``."""
    out = Path(out)
    found = [p for p in out.glob(".checkpoint-*") if re.fullmatch(r"\.checkpoint-\d+\.(tmp|deleting)", p.name)]
    return found + [out / n for n in (".final.tmp", ".final.old") if (out / n).exists()]


def remove_leftovers(out: Path) -> None:
    for p in leftovers(out):
        shutil.rmtree(p, ignore_errors=True)


def delete_checkpoint(path: Path) -> None:
    """Renamed out of the checkpoint namespace first (atomic), then removed: a kill midway leaves a
    ``.deleting`` folder that the next save removes, never a half-deleted ``checkpoint-N``."""
    doomed = path.with_name(f".{path.name}.deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _other_run(out: Path) -> list[str]:
    metrics = out / "metrics.jsonl"
    held = [p.name for _, p in checkpoints(out)]
    if metrics.is_file() and metrics.stat().st_size:
        held.append(metrics.name)
    if (out / "final").exists():
        held.append("final")
    return held


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _in_use(out: Path, pid: str) -> GKDError:
    return GKDError(f"--output_dir {out} is in use by another gkd run (pid {pid or '?'}); wait for it to end or "
                    "choose another --output_dir")


def _lock_pid(fd: int) -> str:
    with contextlib.suppress(OSError):
        return os.pread(fd, 32, 0).decode(errors="replace").strip()
    return ""


_LOCKS: dict[str, int] = {}  # folder -> the open lock file this process holds
_SEEN: dict[str, tuple] = {}  # folder -> what check_owner saw (claim refuses if another run changed it since)


def _probe_lock(out: Path) -> None:
    """Refuse a folder whose lock a live run holds (a shared lock, released at once: nothing is written)."""
    key = str(out.resolve())
    if key in _LOCKS or not (out / LOCK).is_file():
        return
    try:
        fd = os.open(out / LOCK, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(out, _lock_pid(fd)) from None
    finally:
        os.close(fd)


def lock(out: Path) -> None:
    """Hold ``out``'s lock for the rest of this run (rank 0); refuse in one line if another run holds it. The
    kernel drops it when the process ends, however it ends, so a killed run leaves no stale lock."""
    out = Path(out)
    key = str(out.resolve())
    if key in _LOCKS:
        return
    # held open read-only: a file open for writing would keep the folder's filesystem from being remounted
    # read-only (flock needs no write access)
    fd = os.open(out / LOCK, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _lock_pid(fd)
        os.close(fd)
        raise _in_use(out, pid) from None
    (out / LOCK).write_text(f"{os.getpid()}\n")  # for the refusal's message; the same file, the lock stays
    _LOCKS[key] = fd


def release(out: Path) -> None:
    """Let other runs use ``out`` (the end of a run; a no-op where this process holds no lock on it)."""
    fd = _LOCKS.pop(str(Path(out).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor drops the flock


def _state(out: Path) -> tuple:
    metrics = out / "metrics.jsonl"
    return (tuple(p.name for _, p in checkpoints(out)), tuple(foreign(out)),
            metrics.stat().st_size if metrics.is_file() else 0, (out / "final").exists())


def check_owner(out: Path, resume_from: Path | None, overwrite: bool) -> None:
    """Refuse to mix runs in one folder (read-only: nothing is deleted here, see :func:`claim`)."""
    out = Path(out)
    if not out.is_dir():
        _SEEN[str(out.resolve())] = ((), (), 0, False)
        return
    if _is_main():
        _probe_lock(out)  # a live run's folder is refused even with --overwrite_output_dir
    others = foreign(out)
    if others:
        shown = ", ".join(others[:4]) + (" ..." if len(others) > 4 else "")
        raise GKDError(f"--output_dir {out} holds {shown}, which gkd did not write (no {DONE} inside); gkd never "
                       "deletes or resumes another tool's checkpoints, also with --overwrite_output_dir: choose "
                       "another --output_dir")
    _SEEN[str(out.resolve())] = _state(out)
    if overwrite:
        return
    if resume_from is not None and resume_from.resolve().parent == out.resolve():
        step = int(_CKPT.fullmatch(resume_from.name).group(1)) if _CKPT.fullmatch(resume_from.name) else None
        newer = [p.name for s, p in checkpoints(out) if step is not None and s > step]
        if newer:
            raise GKDError(f"--resume_from_checkpoint {resume_from}: {out} holds newer checkpoints of this run "
                           f"({', '.join(newer)}); resume from latest, or delete them to go back to step {step}")
        return
    held = _other_run(out)
    if held:
        shown = ", ".join(held[:4]) + (" ..." if len(held) > 4 else "")
        how = ("start it in a new --output_dir" if resume_from is not None else
               "continue that run with --resume_from_checkpoint latest, start afresh with --overwrite_output_dir true "
               "(deletes them), or choose a new --output_dir")
        raise GKDError(f"--output_dir {out} holds another run ({shown}); {how}")


def claim(out: Path, overwrite: bool) -> None:
    """Before the first write (rank 0): lock the folder for this run, refuse it if another run wrote there
    since :func:`check_owner` looked, and with --overwrite_output_dir delete what an earlier run wrote there."""
    out = Path(out)
    lock(out)
    seen = _SEEN.pop(str(out.resolve()), None)
    if seen is not None and _state(out) != seen:
        release(out)
        raise GKDError(f"--output_dir {out} was written by another run while this one was starting; start this "
                       "one again (it checks the folder anew)")
    if overwrite and out.is_dir():
        for _, p in checkpoints(out):
            delete_checkpoint(p)
        for name in _RUN_FILES:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    remove_leftovers(out)


# --------------------------------------------------------------------------------------------------
# Write failures (disk full, read-only, permissions) as one line
# --------------------------------------------------------------------------------------------------


def _causes(e: BaseException, depth: int = 0):
    """``e``, each rank's failure inside a torch.distributed.checkpoint CheckpointException, and their causes."""
    if e is None or depth > 8:
        return
    yield e
    for failure in (getattr(e, "failures", None) or {}).values():
        yield from _causes(failure[0] if isinstance(failure, tuple) else failure, depth + 1)
    yield from _causes(e.__cause__ or e.__context__, depth + 1)


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind ``e``: raised as such, or only said in the message of safetensors' error
    (``... (os error 28)``)."""
    found = list(_causes(e))
    for inner in found:
        if isinstance(inner, OSError):
            return inner
    for inner in found:
        m = re.search(r"\(os error (\d+)\)", str(inner))
        if m and type(inner).__name__ == "SafetensorError":
            return OSError(int(m.group(1)), os.strerror(int(m.group(1))))
    return None


def _torch_write_failed(e: BaseException) -> bool:
    """torch.save's zip writer, when a write of its stream fails, swallows the OSError and says only
    ``[enforce fail at inline_container.cc] unexpected pos`` (or ``file write failed``)."""
    return any(isinstance(inner, RuntimeError) and "inline_container.cc" in str(inner)
               and ("unexpected pos" in str(inner) or "write failed" in str(inner)) for inner in _causes(e))


def _why_writes_fail(where: Path) -> OSError:
    """Why a write into ``where`` fails now (before the half-written file is removed): write 1 MiB there and
    see (a full disk says ENOSPC, a read-only one EROFS); the probe is removed."""
    probe = Path(where)
    while not probe.is_dir() and probe != probe.parent:
        probe = probe.parent
    try:
        fd, name = tempfile.mkstemp(prefix=".gkd-probe-", dir=probe)
        try:
            for _ in range(16):
                os.write(fd, bytes(65536))
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as e:
        return OSError(e.errno, e.strerror, str(where))
    return OSError(errno.EIO, "a write failed (torch's file writer gave no reason)", str(where))


def _free_mib(path: Path) -> str:
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return f"{shutil.disk_usage(probe).free / 2**20:.1f} MiB free"
    except OSError:
        return "free space unknown"


def describe(what: str, where: Path, e: OSError, then: str = "then resume with --resume_from_checkpoint latest") -> str:
    name = e.filename or where
    reason = e.strerror or type(e).__name__
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        hint = f"{_free_mib(Path(where))} there; free some space or choose another --output_dir"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = "make the folder writable or choose another --output_dir"
    else:
        hint = "check the folder"
    return f"{what} failed: {reason} ({name}); {hint}" + (f", {then}" if then else "")


@contextlib.contextmanager
def writing(what: str, where: Path, cleanup=None, then: str = "then resume with --resume_from_checkpoint latest"):
    """Run a write; an OSError (also one wrapped by torch.distributed.checkpoint, said by safetensors, or
    swallowed by torch.save's writer) becomes one GKDError line after ``cleanup`` (removing the half-written
    thing) has run."""
    try:
        yield
    except BaseException as e:  # noqa: BLE001 - CheckpointException is a BaseException
        err = None
        if not isinstance(e, (KeyboardInterrupt, SystemExit, GKDError)):
            err = _os_error(e) or (_why_writes_fail(Path(where)) if _torch_write_failed(e) else None)
        if cleanup is not None:
            cleanup()
        if err is None:
            raise
        raise GKDError(describe(what, Path(where), err, then)) from None


def check_output_dir(path: str) -> Path:
    """Fail early if the folder cannot be written; leaves nothing behind."""
    out = Path(path).absolute()
    probe = out
    while not probe.exists():
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(f"{probe} is not a folder")
        os.rmdir(tempfile.mkdtemp(prefix=".gkd-probe-", dir=probe))
    except OSError as e:
        raise GKDError(f"--output_dir {path}: not writable ({e.strerror or e})") from None
    return out


def prepare_output_dir(path: str) -> Path:
    out = check_output_dir(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GKDError(f"--output_dir {path}: cannot create it ({e.strerror})") from None
    return out
