"""Rollouts: completions sampled from a model for on-policy (student) or sequence-level KD (teacher)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gkd import decode
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
    """Draws each row's next token from its own generator: the inverse CDF of the warped distribution at
    one uniform per row and token, all of a row's uniforms drawn up front from its generator. HF's
    multinomial sampling uses one RNG stream for the whole batch, so a row's sample would depend on the
    rows beside it. ``draw`` serves the decode loop; as a logits processor (HF `generate`) it leaves only
    the drawn token for greedy search to pick."""

    def __init__(self, seeds: list[int], cfg: SamplingConfig, device: torch.device):
        from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                            TopPLogitsWarper)

        steps = cfg.max_new_tokens
        self.u = torch.stack([torch.rand(steps, generator=torch.Generator(device).manual_seed(s), device=device,
                                         dtype=torch.float64) for s in seeds])  # [rows, steps]
        self.step = 0
        self.warpers = [TemperatureLogitsWarper(cfg.temperature)]
        if cfg.top_k:
            self.warpers.append(TopKLogitsWarper(cfg.top_k))
        if cfg.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(cfg.top_p))

    def draw(self, scores: torch.Tensor) -> torch.Tensor:
        for warp in self.warpers:
            scores = warp(None, scores)
        token = decode.inverse_cdf(torch.softmax(scores.float(), dim=-1), self.u[:, self.step])
        self.step += 1
        return token

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        token = self.draw(scores)
        return torch.full_like(scores, float("-inf")).scatter_(1, token[:, None], 0.0)


class HFSampler:
    """Batched sampling from a transformers model with a KV cache; stops each sequence at EOS. Returns
    token ids only. Decoder-only models on SDPA run `gkd.decode`'s loop (a static cache, no copied KV
    heads, batched seeded draws); others, and extra model inputs, take HF `generate`.

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
        ids, mask = (t.to(self.device) for t in left_pad(prompts, self.pad_id))
        seeded = (_RowSeededSampling([row_seed(self.seed, r) for r in rows], self.cfg, self.device)
                  if self.cfg.do_sample else None)
        if decode.supported(model) and not inputs:
            pick = seeded.draw if seeded else (lambda logits: logits.argmax(-1))
            new = decode.decode(model, ids, mask, self.cfg.max_new_tokens, pick, self.eos_ids, self.pad_id,
                                synced=self.synced).tolist()
        else:  # other families, and rows with images: HF generate with the same per-row draws
            from transformers import GenerationConfig, LogitsProcessorList

            # a clean generation config: the model's own (a repetition penalty, say) would change the
            # distribution the samples come from
            config = GenerationConfig(max_new_tokens=self.cfg.max_new_tokens, do_sample=False, use_cache=True,
                                      eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
                                      suppress_tokens=adapter_for(model).placeholder_ids(model) or None)
            model_inputs = adapter_for(model).prepare(
                model, {"input_ids": ids, "attention_mask": mask, **{k: v.to(self.device) for k, v in inputs.items()}})
            gen = model.generate(**model_inputs, generation_config=config, synced_gpus=self.synced,
                                 logits_processor=LogitsProcessorList([seeded] if seeded else []))
            new = gen[:, ids.shape[1]:].tolist()
        return cut_at_eos(new, self.eos_ids)


def cut_at_eos(rows: list[list[int]], eos_ids: list[int]) -> list[list[int]]:
    """Each row up to and including its first EOS (kept: the student must learn to stop)."""
    completions = []
    for row in rows:
        cut = next((j + 1 for j, t in enumerate(row) if t in eos_ids), len(row))
        completions.append(row[:cut])
    return completions
