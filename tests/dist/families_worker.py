"""Under torchrun with 2 processes (alone, or as a job of batch_worker.py): for each layout and family, two
`gkd train` steps at FSDP = 2, TP = 2, PP = 2, EP = 2 or CP = 2 (or LoRA at FSDP = 2 or TP = 2), one off-policy
and one on-policy, each equal the naive float64 step of the whole models at the weights AdamW left
(tests/naive.py), the on-policy completions are the whole student's own draws (under PP: through the pipelined
sampler, which also gives HF generate's completions), and vision-language families train on rows with images. One
launch serves every layout (each trainer builds its own mesh). Usage: families_worker.py DATA IMAGE_DATA
fsdp|tp|pp|ep|cp|fsdp-lora|tp-lora|fsdp-frozen|tp-frozen|pp-frozen|ep-frozen ROOT FAMILY,FAMILY... [LAYOUT ROOT FAMILIES ...] (ROOT/FAMILY holds the student
and teacher folders; vision-language families train on IMAGE_DATA)."""

import sys
from dataclasses import replace
import traceback
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline_sampler_worker import assert_same_samples

from families import VISION, frozen_prefixes
from gkd.config import TrainConfig
from gkd.models import apply_lora, freeze_parameters, load_model
from gkd.rollout.base import SamplingConfig
from gkd.rollout.pipelined import PipelineSampler
from gkd.train.trainer import Trainer
from naive import assert_frozen_as_loaded, assert_steps_match, image_inputs

LORA = dict(train_type="lora", lora_rank=4, lora_alpha=8, lora_dropout=0.0)  # (dropout would make the step random)
LAYOUTS = {  # mode: (TrainConfig arguments, the (tp, pp, ep, data-parallel size) they must give)
    "fsdp": (dict(micro_batch_size=1), (1, 1, 1, 2)),
    "tp": (dict(micro_batch_size=2, tensor_model_parallel_size=2), (2, 1, 1, 1)),
    "pp": (dict(micro_batch_size=2, pipeline_model_parallel_size=2), (1, 2, 1, 1)),  # 3 micro-batches: 1F1B fills
    "ep": (dict(micro_batch_size=1, expert_model_parallel_size=2), (1, 1, 2, 2)),
    "cp": (dict(micro_batch_size=2, context_parallel_size=2), (1, 1, 1, 1)),  # each sequence split over the ranks
    # LoRA (all-linear): with FSDP on the experts' tensors too; with TP on the linear layers (experts frozen)
    "fsdp-lora": (dict(micro_batch_size=1, **LORA), (1, 1, 1, 2)),
    "tp-lora": (dict(micro_batch_size=2, tensor_model_parallel_size=2, lora_experts=False, **LORA), (2, 1, 1, 1)),
}
# --freeze_parameters (the embedding, with it a tied lm_head, and the first decoder layer: tests/families.py) on
# each layout: the reference freezes the same weights
LAYOUTS.update({f"{mode}-frozen": LAYOUTS[mode] for mode in ("fsdp", "tp", "pp", "ep")})


def run(args) -> int:
    """Every family of every layout, each saying OK or FAIL on stdout (the test reads those lines); returns 0
    once every rank is done, so that a batch_worker.py launch goes on with its next job."""
    data, image_data, *groups = args
    for mode, root, families in zip(groups[0::3], groups[1::3], groups[2::3]):
        for family in families.split(","):
            _step(mode, root, image_data if family in VISION else data, family)
    dist.barrier()
    return 0


def _step(mode: str, root: str, data: str, family: str) -> bool:
    """Whether the family's steps (and, under PP, its sampling) equal the naive ones; says so on stdout."""
    flags, sizes = LAYOUTS[mode]
    student, teacher = (str(Path(root) / family / side) for side in ("student", "teacher"))
    if family in VISION:  # the tower and projector train too: their gradients are compared
        flags = dict(flags, freeze_vit=False, freeze_aligner=False)
    if mode.endswith("-frozen"):
        flags = dict(flags, freeze_parameters=frozen_prefixes(load_model(student)))
    # seed 42 and lmbda 0.5: step 1 off-policy, step 2 on-policy (assert_steps_match checks both kinds ran)
    cfg = TrainConfig(model=student, teacher_model=teacher, dataset=[data], output_dir=str(Path(root) / "out"),
                      lmbda=0.5, seed=42, beta=0.5, temperature=0.9, sft_alpha=0.3, global_batch_size=6, max_steps=2,
                      max_completion_length=4, learning_rate=1e-3, lr_scheduler_type="constant", max_grad_norm=0.0,
                      loss_chunk_size=5, progress_bar=False, **flags)
    try:
        trainer = Trainer(cfg, log=lambda *_: None)
        par = trainer.par
        assert (par.tp, par.pp, par.ep, par.dp_size) == sizes
        if mode == "pp":  # on-policy steps sample through the stages: each family's masks and KV caches (at the
            # loaded weights: before the steps move them); top-k, EOS cuts, several chunks
            assert isinstance(trainer.rollout, PipelineSampler), type(trainer.rollout)
            sampling = SamplingConfig(max_new_tokens=8, temperature=1.3, top_k=40, batch_size=6)
            assert_same_samples(student, trainer.student, trainer.device, sampling)
            if family in VISION:  # prompts with images: the first stage's merge, M-RoPE positions and their offset
                rows = [e for e in trainer.train_examples if e.images][:6]
                inputs = [{k: v.float() if v.is_floating_point() else v for k, v in got.items()}
                          for got in image_inputs(student, rows)]
                assert_same_samples(student, trainer.student, trainer.device, replace(sampling, max_new_tokens=24),
                                    [e.prompt_ids for e in rows], inputs)
        reference = load_model(student)
        freeze_parameters(reference, flags.get("freeze_parameters"))
        if flags.get("train_type") == "lora":  # the same adapters as the trainer's, at the same initialisation
            reference = apply_lora(reference, 4, 8, 0.0, "all-linear", cfg.seed, experts=cfg.lora_experts)
        assert_steps_match(trainer, reference, load_model(teacher))
        if mode.endswith("-frozen"):  # (every rank: the gather is a collective)
            assert_frozen_as_loaded(trainer, student, flags["freeze_parameters"])
    except Exception as e:  # noqa: BLE001 - reported, and the launch goes on to the next family
        traceback.print_exc()  # where it failed, in the run's stderr
        print(f"FAIL {mode} {family} rank {dist.get_rank()}: {type(e).__name__}: {e}", flush=True)
        return False
    print(f"OK {mode} {family} rank {dist.get_rank()}", flush=True)
    return True


if __name__ == "__main__":
    run(sys.argv[1:])
    dist.destroy_process_group()
