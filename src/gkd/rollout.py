"""Rollouts: completions sampled from a model for on-policy (student) or sequence-level KD (teacher)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gkd.data import join_rows, left_pad
from gkd.models.adapter import adapter_for


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


class _RowSeededSampling:
    """A logits processor that draws each row's next token from its own generator (inverse CDF of the
    warped distribution, one uniform per row and token) and leaves only that token for greedy search to
    pick. HF's multinomial sampling uses one RNG stream for the whole batch, so a row's sample would
    depend on the rows beside it."""

    def __init__(self, seeds: list[int], cfg: SamplingConfig, device: torch.device):
        from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                            TopPLogitsWarper)

        self.gens = [torch.Generator(device).manual_seed(s) for s in seeds]
        self.warpers = [TemperatureLogitsWarper(cfg.temperature)]
        if cfg.top_k:
            self.warpers.append(TopKLogitsWarper(cfg.top_k))
        if cfg.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(cfg.top_p))
        self.device = device

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        # float64: in float32 a token whose probability is under the running sum's rounding step (~6e-8 near
        # 1) adds nothing to the cdf and could never be drawn
        cdf = torch.softmax(scores.double(), dim=-1).cumsum(-1)
        total = cdf[:, -1:].contiguous()
        u = torch.cat([torch.rand(1, generator=g, device=self.device, dtype=torch.float64) for g in self.gens])
        # side=right: a token of probability 0 is never the first index whose cdf exceeds u; u rounded up to
        # the total falls back to the last token of nonzero probability
        token = torch.searchsorted(cdf, u[:, None] * total, right=True)
        token = torch.where(token < scores.shape[-1], token, torch.searchsorted(cdf, total))
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


class HFSampler:
    """Batched `generate` with the KV cache; stops each sequence at EOS. Returns token ids only.

    Every prompt is sampled from its own generator, seeded by ``row_seed(seed, row)`` where ``row`` is
    its index in the step's global batch: samples do not depend on how the batch is split into chunks,
    micro-batches or data-parallel ranks, and the training RNG stream is never touched. With ``synced``
    (several processes sharing sharded weights) every rank keeps stepping until all are done, so their
    collectives stay matched.
    """

    def __init__(self, cfg: SamplingConfig, eos_ids: list[int], pad_id: int, device: torch.device,
                 synced: bool = False):
        self.cfg, self.eos_ids, self.pad_id, self.device, self.synced = cfg, eos_ids, pad_id, device, synced
        self.seed = 0

    def close(self) -> None:
        """Nothing outlives a call (the vLLM samplers hold an engine or threads)."""

    @torch.no_grad()
    def generate(self, model, prompts: list[list[int]], rows: list[int] | None = None,
                 inputs: list[dict] | None = None) -> list[list[int]]:
        """Completions of ``prompts``; ``inputs``: each prompt's other model inputs (images), or None."""
        rows = list(range(len(prompts))) if rows is None else rows
        inputs = inputs or [{} for _ in prompts]
        was_training = model.training
        model.eval()
        out: list[list[int]] = []
        for i in range(0, len(prompts), self.cfg.batch_size):
            chunk = slice(i, i + self.cfg.batch_size)
            out += self._generate(model, prompts[chunk], rows[chunk], join_rows(inputs[chunk]))
        model.train(was_training)
        return out

    def _generate(self, model, prompts: list[list[int]], rows: list[int], inputs: dict) -> list[list[int]]:
        ids, mask = left_pad(prompts, self.pad_id)
        kw = dict(max_new_tokens=self.cfg.max_new_tokens, do_sample=False, eos_token_id=self.eos_ids,
                  pad_token_id=self.pad_id, use_cache=True, temperature=None, top_p=None, top_k=None,
                  synced_gpus=self.synced)
        placeholders = adapter_for(model).placeholder_ids(model)
        if placeholders:  # a sampled image placeholder would stand for an image the batch does not have
            kw["suppress_tokens"] = placeholders
        if self.cfg.do_sample:
            from transformers import LogitsProcessorList

            seeded = _RowSeededSampling([row_seed(self.seed, r) for r in rows], self.cfg, self.device)
            kw["logits_processor"] = LogitsProcessorList([seeded])
        model_inputs = {"input_ids": ids, "attention_mask": mask, **inputs}
        model_inputs = adapter_for(model).prepare(model, {k: v.to(self.device) for k, v in model_inputs.items()})
        with skinny_linears(model):
            gen = model.generate(**model_inputs, **kw)
        return cut_at_eos(gen[:, ids.shape[1]:].tolist(), self.eos_ids)


def cut_at_eos(rows: list[list[int]], eos_ids: list[int]) -> list[list[int]]:
    """Each row up to and including its first EOS (kept: the student must learn to stop)."""
    completions = []
    for row in rows:
        cut = next((j + 1 for j, t in enumerate(row) if t in eos_ids), len(row))
        completions.append(row[:cut])
    return completions


SKINNY_ROWS = 32


def _skinny_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if rows > SKINNY_ROWS:
        return F.linear(x, self.weight, self.bias)
    y = (self.weight @ x.reshape(rows, -1).T).T  # same product, weight as the left operand
    if self.bias is not None:
        y = y + self.bias
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _tensor_parallel(weight: torch.Tensor) -> bool:
    """A weight sharded by tensor parallelism: its module's hooks expect F.linear on DTensors."""
    from torch.distributed.tensor import DTensor

    return isinstance(weight, DTensor) and "tp" in (weight.device_mesh.mesh_dim_names or ())


@contextlib.contextmanager
def skinny_linears(model: torch.nn.Module):
    """Decode steps multiply a few rows by every weight. On CPU, BLAS streams a weight about 2-3x
    faster as the left operand (W @ x.T) than through F.linear (x @ W.T) when x has few rows
    (measured 5.5 vs 18.5 ms for SmolLM2's [49152, 576] lm_head at 4 rows, 2 threads); generation is
    bound by that weight traffic. The Linear modules of ``model`` take that path for inputs of at most
    SKINNY_ROWS rows while the context is open; nothing changes on other devices."""
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.device.type == "cpu"
               and not _tensor_parallel(m.weight)]
    for m in linears:
        m.forward = _skinny_linear.__get__(m)
    try:
        yield
    finally:
        for m in linears:
            del m.forward
