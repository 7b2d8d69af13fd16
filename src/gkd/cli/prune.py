"""`gkd prune`: depth-prune a teacher into a student folder."""

from __future__ import annotations

import json
from pathlib import Path

from gkd.config import _OneLineErrors, _parse_bool
from gkd.errors import GKDError

MARKER = "gkd_prune.json"  # in every folder gkd prune writes (inside it before it is renamed into place)


def check_output_dir(teacher: str, out: str, overwrite: bool) -> None:
    """Before any work: never the teacher's folder (or one inside it, or one holding it), never a non-empty
    folder gkd prune did not write, and its own earlier output only with --overwrite_output_dir."""
    from gkd.models.load import resolve

    folder, _ = resolve(teacher)
    src, dst = Path(folder).resolve(), Path(out).resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise GKDError(f"--output_dir {out} is the teacher's folder, or in it, or holds it ({folder}); prune into "
                       "a new folder")
    if dst.exists() and not dst.is_dir():
        raise GKDError(f"--output_dir {out} is a file, not a folder")
    if not dst.is_dir() or not any(dst.iterdir()):
        return
    if not (dst / MARKER).is_file():
        raise GKDError(f"--output_dir {out} is not empty and is not a gkd prune output (no {MARKER}); gkd does not "
                       "overwrite it: choose an empty or new folder")
    if not overwrite:
        raise GKDError(f"--output_dir {out} holds an earlier gkd prune output; --overwrite_output_dir true replaces "
                       "it, or choose a new folder")


def run(argv: list[str]) -> None:
    from gkd.models import prune_command

    p = _OneLineErrors(prog="gkd prune", description="Depth-prune a teacher into a student folder.")
    p.add_argument("--teacher_model", "--teacher-model", "--model", required=True,
                   help="a Hugging Face folder, a .gguf file, or smollm2")
    p.add_argument("--output_dir", "--output-dir", required=True, help="where the student folder goes")
    p.add_argument("--keep_layers", "--keep-layers", type=lambda s: [int(x) for x in s.split(",")],
                   help="comma-separated layer indices to keep (default: every --every-th)")
    p.add_argument("--every", type=int, default=2, help="keep layers 0, every, 2*every, ...")
    p.add_argument("--torch_dtype", "--torch-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype of the saved weights")
    p.add_argument("--overwrite_output_dir", "--overwrite-output-dir", type=_parse_bool, nargs="?", const=True,
                   default=False, metavar="true|false", help="replace an earlier gkd prune output in --output_dir")
    a = p.parse_args(argv)
    if a.every < 1:
        raise GKDError("--every must be >= 1")
    check_output_dir(a.teacher_model, a.output_dir, a.overwrite_output_dir)
    from gkd.train import outdir

    # a full disk or a read-only folder: one line, and no half-written folder (save_pretrained_atomic's temp goes)
    with outdir.writing(f"writing the pruned model {a.output_dir}", Path(a.output_dir).absolute().parent, then=""):
        info = prune_command(a.teacher_model, a.output_dir, a.keep_layers, a.every, a.torch_dtype)
    print(json.dumps(info))
