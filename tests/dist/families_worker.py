"""Under torchrun with 2 processes (alone, or as a job of batch_worker.py): for each layout and family, one
`gkd train` step at FSDP = 2, TP = 2, PP = 2 or EP = 2 equals the naive float64 step of the whole models
(tests/naive.py); under PP the pipelined sampler also gives HF generate's completions. One launch serves every
layout (each trainer builds its own mesh). Usage: families_worker.py DATA fsdp|tp|pp|ep ROOT FAMILY,FAMILY...
[LAYOUT ROOT FAMILIES ...] (ROOT/FAMILY holds the student and teacher folders)."""

import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gkd.config import TrainConfig  # noqa: E402
from gkd.models import load_model  # noqa: E402
from gkd.rollout.base import SamplingConfig  # noqa: E402
from gkd.train.trainer import Trainer  # noqa: E402
from naive import assert_step_matches  # noqa: E402
from pipeline_sampler_worker import assert_same_samples  # noqa: E402

LAYOUTS = {  # mode: (TrainConfig arguments, the (tp, pp, ep, data-parallel size) they must give)
    "fsdp": (dict(micro_batch_size=1), (1, 1, 1, 2)),
    "tp": (dict(micro_batch_size=2, tensor_model_parallel_size=2), (2, 1, 1, 1)),
    "pp": (dict(micro_batch_size=2, pipeline_model_parallel_size=2), (1, 2, 1, 1)),  # 3 micro-batches: 1F1B fills
    "ep": (dict(micro_batch_size=1, expert_model_parallel_size=2), (1, 1, 2, 2)),
}


def run(args) -> int:
    """Every family of every layout, each saying OK or FAIL on stdout (the test reads those lines); returns 0
    once every rank is done, so that a batch_worker.py launch goes on with its next job."""
    data, *groups = args
    for mode, root, families in zip(groups[0::3], groups[1::3], groups[2::3]):
        for family in families.split(","):
            _step(mode, root, data, family)
    dist.barrier()
    return 0


def _step(mode: str, root: str, data: str, family: str) -> bool:
    """Whether the family's step (and, under PP, its sampling) equals the naive one; says so on stdout."""
    flags, sizes = LAYOUTS[mode]
    student, teacher = (str(Path(root) / family / side) for side in ("student", "teacher"))
    cfg = TrainConfig(model=student, teacher_model=teacher, dataset=[data], output_dir=str(Path(root) / "out"),
                      lmbda=0.0, beta=0.5, temperature=0.9, sft_alpha=0.3, global_batch_size=6, max_steps=1,
                      max_grad_norm=0.0, loss_chunk_size=5, progress_bar=False, **flags)
    try:
        trainer = Trainer(cfg, log=lambda *_: None)
        par = trainer.par
        assert (par.tp, par.pp, par.ep, par.dp_size) == sizes
        assert_step_matches(trainer, load_model(student), load_model(teacher))
        if mode == "pp":  # on-policy steps sample through the stages: each family's masks and KV caches
            assert_same_samples(student, trainer.student, trainer.device,
                                SamplingConfig(max_new_tokens=8, temperature=1.3, top_k=40, batch_size=6))
    except Exception as e:  # noqa: BLE001 - reported, and the launch goes on to the next family
        print(f"FAIL {mode} {family} rank {dist.get_rank()}: {type(e).__name__}: {e}", flush=True)
        return False
    print(f"OK {mode} {family} rank {dist.get_rank()}", flush=True)
    return True


if __name__ == "__main__":
    run(sys.argv[1:])
    dist.destroy_process_group()
