"""Under torchrun with 2 processes (alone, or as a job of batch_worker.py): the pipelined sampler (2 stages) gives
HFSampler's completions on the whole model, token for token, EOS cuts included. Args: MODEL_FOLDER."""

import sys

import torch

from gkd.config import TrainConfig
from gkd.models import load_model
from gkd.parallel import load_sharded, shard_student
from gkd.parallel.mesh import setup, teardown
from gkd.rollout.pipelined import PipelineSampler
from gkd.rollout.hf import HFSampler
from gkd.rollout.base import SamplingConfig


def assert_same_samples(folder: str, staged, device, cfg: SamplingConfig, prompts=None,
                        inputs=None) -> tuple[int, int]:
    """The pipelined sampler's completions of 12 seeded prompts (or ``prompts``, with their images' ``inputs``)
    on ``staged`` (the model in ``folder``, split into stages) equal HFSampler's on the whole model; returns
    (completions, how many stopped at EOS)."""
    g = torch.Generator().manual_seed(3)
    if prompts is None:
        prompts = [torch.randint(5, 96, (int(n),), generator=g).tolist()
                   for n in torch.randint(2, 9, (12,), generator=g)]
    rows = list(range(7, 7 + len(prompts)))  # rows of a global batch: the seeds follow them
    whole = HFSampler(cfg, [4], 0, device)
    expected = whole.generate(load_model(folder, "float32"), prompts, rows, inputs, seed=1234)
    piped = PipelineSampler(cfg, [4], 0, device)
    got = piped.generate(staged, prompts, rows, inputs, seed=1234)
    assert got == expected, (got, expected)
    return len(got), sum(1 for c in expected if c[-1] == 4 and len(c) < cfg.max_new_tokens)


def run(args):
    folder = args[0]
    par = setup(TrainConfig(pipeline_model_parallel_size=2))
    cfg = SamplingConfig(max_new_tokens=24, temperature=1.3, top_p=0.95, top_k=40, batch_size=5)
    staged = load_sharded(lambda: load_model(folder, "float32"), lambda m: m, lambda m: shard_student(m, par), par)
    assert len(list(staged.parameters())) < len(list(load_model(folder, "float32").parameters()))
    n, stopped = assert_same_samples(folder, staged, par.device, cfg)
    assert stopped >= 2, stopped  # EOS cuts are compared too
    print(f"rank {par.rank}: {n} completions equal, {stopped} stopped at EOS", flush=True)
    teardown()


if __name__ == "__main__":
    run(sys.argv[1:])
