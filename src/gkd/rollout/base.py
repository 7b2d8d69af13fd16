"""What every rollout shares: the Rollout protocol, the sampling settings, per-row seeds and the EOS cut."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from gkd.errors import GKDError
from gkd.rollout import decode


class Rollout(Protocol):
    """Completions sampled from the student (on-policy) or, through a local teacher, from the teacher.

    ``generate(model, prompts, rows, inputs, seed)``: one completion per prompt (token ids, cut after the
    first EOS). ``rows`` are the prompts' indices in the step's global batch and ``seed`` the call's seed:
    each prompt's sample is a function of (seed, row) alone, whichever rank or chunk draws it. ``model``
    is what to sample from (an engine that holds its own copy of the student ignores it and is told of
    new weights by ``weights_changed``). ``close`` releases what outlives a call (an engine, threads)."""

    def generate(self, model, prompts: list[list[int]], rows: list[int] | None = None,
                 inputs: list[dict] | None = None, seed: int = 0) -> list[list[int]]: ...

    def weights_changed(self) -> None: ...

    def check_model(self, model, where: str) -> None:
        """Fail now on a model it would not sample faithfully (``where``: the flag that named it)."""

    def close(self) -> None: ...


@dataclass
class SamplingConfig:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True
    batch_size: int = 32


def row_seed(call_seed: int, row: int) -> int:
    """The sampling seed of one prompt: a function of the call's seed and the prompt's row in the global
    batch, so a completion does not depend on which rank, micro-batch or chunk samples it."""
    return (call_seed * 100_003 + row) % (2**31 - 1)


class RowSeededSampling:
    """Draws each row's next token from its own generator: the inverse CDF of the warped distribution at
    one uniform per row and token, all of a row's uniforms drawn up front from its generator. HF's
    multinomial sampling uses one RNG stream for the whole batch, so a row's sample would depend on the
    rows beside it. ``draw`` serves the decode loop; as a logits processor (HF `generate`) it leaves only
    the drawn token for greedy search to pick."""

    def __init__(self, seeds: list[int], cfg: SamplingConfig, device: torch.device):
        from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        steps = cfg.max_new_tokens
        self.u = torch.stack([torch.rand(steps, generator=torch.Generator(device).manual_seed(s), device=device,
                                         dtype=torch.float64) for s in seeds])  # [rows, steps]
        self.steps, self.step, self.device = steps, 0, device
        self.finite = torch.ones((), dtype=torch.bool, device=device)  # all logits so far (checked every CHECK steps)
        self.warpers = [TemperatureLogitsWarper(cfg.temperature)]
        if cfg.top_k:
            self.warpers.append(TopKLogitsWarper(cfg.top_k))
        if cfg.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(cfg.top_p))

    CHECK = 8  # on an accelerator, asking whether the logits were finite waits for the device: every 8 tokens

    def draw(self, scores: torch.Tensor) -> torch.Tensor:
        for warp in self.warpers:
            scores = warp(None, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        # a diverged model's NaN/inf logits have no distribution to draw from: one clear error (inverse_cdf
        # returns some in-range token meanwhile; it was an index error). A NaN or an inf logit makes its whole
        # softmax row NaN, so one column tells (no second pass over the vocabulary on the sampling path)
        self.finite &= torch.isfinite(probs[:, 0]).all()
        token = decode.inverse_cdf(probs, self.u[:, self.step])
        self.step += 1
        if self.device.type == "cpu" or self.step % self.CHECK == 0 or self.step == self.steps:
            self.check_finite()
        return token

    def check_finite(self) -> None:
        if not bool(self.finite):
            raise GKDError("sampling stopped: the model's next-token logits are not finite (NaN or inf), so the "
                           "student's weights have diverged (lower --learning_rate, or check --torch_dtype)")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        token = self.draw(scores)
        return torch.full_like(scores, float("-inf")).scatter_(1, token[:, None], 0.0)


def row_seeded(cfg: SamplingConfig, seed: int, device: torch.device):
    """A plain ``generate``'s ``sampling(ids, mask, rows)``: each row's own seeded draws, or None (greedy)."""
    def sampling(ids, mask, rows):
        return RowSeededSampling([row_seed(seed, r) for r in rows], cfg, device) if cfg.do_sample else None

    return sampling


def cut_at_eos(rows: list[list[int]], eos_ids: list[int]) -> list[list[int]]:
    """Each row up to and including its first EOS (kept: the student must learn to stop)."""
    return [cut_row(row, eos_ids) for row in rows]


def cut_row(row: list[int], eos_ids: list[int]) -> list[int]:
    cut = next((j + 1 for j, t in enumerate(row) if t in eos_ids), len(row))
    return row[:cut]
