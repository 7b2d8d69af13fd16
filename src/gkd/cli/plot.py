"""`gkd plot OUT`: redraw a run's loss curve from its metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from gkd.config import _OneLineErrors
from gkd.errors import GKDError


def run(argv: list[str]) -> None:
    from gkd.train.metrics import plot

    p = _OneLineErrors(prog="gkd plot", description="Draw the logged curves of a training run.")
    p.add_argument("output_dir", help="a training --output_dir (holds metrics.jsonl)")
    a = p.parse_args(argv)
    src = Path(a.output_dir) / "metrics.jsonl"
    if not src.is_file():
        raise GKDError(f"{src}: no such file (is {a.output_dir} a training output folder?)")
    print(plot(src, Path(a.output_dir) / "loss_curve.png"))
