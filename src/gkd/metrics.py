"""Where metrics go: JSONL always, TensorBoard on request, a loss-curve PNG at the end."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    def __init__(self, output_dir: Path, tensorboard: bool = False, resume_step: int = 0, enabled: bool = True):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled, self.tb = enabled, None
        if not enabled:  # another process (rank 0) writes
            return
        if resume_step and self.path.exists():
            # a resumed run rewrites what the killed run logged after its checkpoint
            kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        elif not resume_step:
            self.path.write_text("")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def plot(metrics_path: Path, out_png: Path, keys=("loss", "divergence", "sft_loss", "top1_agreement")) -> Path:
    """Curves of the logged metrics against the step, one panel per metric that was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    present = [k for k in keys if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, max(len(present), 1), figsize=(4 * max(len(present), 1), 3.2), squeeze=False)
    for ax, key in zip(axes[0], present):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
