"""Where metrics go: JSONL always, TensorBoard and Weights & Biases on request, a loss-curve PNG at the end."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from gkd.errors import GKDError
from gkd.train import outdir


class MetricsLog:
    def __init__(self, output_dir: Path, tensorboard: bool = False, resume_step: int = 0, enabled: bool = True,
                 wandb_config: dict | None = None):
        """``wandb_config`` (the run's options): also log to Weights & Biases (``WANDB_MODE=offline`` keeps
        the run in OUTPUT_DIR/wandb for a later ``wandb sync``)."""
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled, self.tb, self.wandb = enabled, None, None
        if not enabled:  # another process (rank 0) writes
            return
        with outdir.writing("writing metrics", self.path):
            if resume_step and self.path.exists():
                # a resumed run rewrites what the killed run logged after its checkpoint
                kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
                self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
            elif not resume_step:
                self.path.write_text("")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        if wandb_config is not None:
            self.wandb = _start_wandb(Path(output_dir), wandb_config, resume_step)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        line = (json.dumps({"step": step, **values}) + "\n").encode()
        with outdir.writing("writing metrics", self.path):
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                try:
                    written = os.write(fd, line)  # one write: the line lands whole or not at all
                    if written != len(line):
                        raise OSError(28, os.strerror(28), str(self.path))  # a short write: the disk is full
                except OSError:
                    os.ftruncate(fd, size)  # never leave a torn line behind
                    raise
            finally:
                os.close(fd)
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(output_dir: Path, config: dict, resume_step: int):
    try:
        import wandb
    except ImportError:
        raise GKDError("--report_to wandb needs the wandb package: pip install 'gkd[wandb]' (or pip install wandb)") from None
    # the run id is kept in the output folder so that a resumed run continues the same W&B run
    id_file = output_dir / "wandb" / "gkd_run_id"
    run_id = id_file.read_text().strip() if resume_step and id_file.is_file() else uuid.uuid4().hex[:8]
    id_file.parent.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id)
    try:
        return wandb.init(project=os.environ.get("WANDB_PROJECT", "gkd"), dir=str(output_dir), id=run_id,
                          resume="allow", config=config, name=output_dir.name)
    except Exception as e:  # noqa: BLE001 - no login, no network: say so in one line
        raise GKDError(f"--report_to wandb: cannot start a run ({type(e).__name__}: {(str(e).splitlines() or [''])[0]}); "
                       "log in with `wandb login`, or set WANDB_MODE=offline") from None


def read_metrics(path: Path) -> list[dict]:
    """The logged rows. A torn last line (a kill or a full disk mid-write) is dropped; a damaged line
    elsewhere is an error naming it."""
    lines = Path(path).read_bytes().split(b"\n")
    rows = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rows.append(json.loads(raw))
        except ValueError:
            if all(not rest.strip() for rest in lines[n:]):
                break  # the last line, cut short
            raise GKDError(f"{path}:{n}: not a JSON line (the file is damaged; remove that line)") from None
    return rows


def plot(metrics_path: Path, out_png: Path, keys=("loss", "divergence", "sft_loss", "top1_agreement")) -> Path:
    """Curves of the logged metrics against the step, one panel per metric that was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = read_metrics(metrics_path)
    present = [k for k in keys if any(k in r for r in rows)]
    n = max(len(present), 1)
    width, height = 4.0 * n, 3.2
    # the margins below are sized for these settings, whatever a user's matplotlibrc says
    with plt.rc_context({"font.size": 10, "figure.autolayout": False, "figure.constrained_layout.use": False}):
        fig, axes = plt.subplots(1, n, figsize=(width, height), squeeze=False)
        for ax, key in zip(axes[0], present):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".")
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        # margins in inches rather than tight_layout, which measured every label again and was most of the
        # run's end (0.35 s of a tiny run's ~1 s)
        panel = (width - 0.85 - 0.2 - 0.95 * (n - 1)) / n
        fig.subplots_adjust(left=0.85 / width, right=1 - 0.2 / width, bottom=0.5 / height, top=1 - 0.35 / height,
                            wspace=0.95 / panel)
        fig.savefig(out_png, dpi=100)
        plt.close(fig)
    return out_png
