"""`gkd prune`: depth-prune a teacher into a student folder."""

from __future__ import annotations

import json

from gkd.config import _OneLineErrors
from gkd.errors import GKDError


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
    a = p.parse_args(argv)
    if a.every < 1:
        raise GKDError("--every must be >= 1")
    print(json.dumps(prune_command(a.teacher_model, a.output_dir, a.keep_layers, a.every, a.torch_dtype)))
