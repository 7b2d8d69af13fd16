"""Rollouts: completions sampled from a model for on-policy (student) or sequence-level KD (teacher)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gkd.data import left_pad


@dataclass
class SamplingConfig:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True
    batch_size: int = 32


class HFSampler:
    """Batched `generate` with the KV cache; stops each sequence at EOS. Returns token ids only.

    Sampling is seeded per call (``seed``) with the global RNG forked, so the training RNG stream and
    hence resumed runs are unaffected, and the samples do not depend on how the training batch is
    split into micro-batches.
    """

    def __init__(self, cfg: SamplingConfig, eos_ids: list[int], pad_id: int, device: torch.device):
        self.cfg, self.eos_ids, self.pad_id, self.device = cfg, eos_ids, pad_id, device
        self.seed = 0

    @torch.no_grad()
    def generate(self, model, prompts: list[list[int]]) -> list[list[int]]:
        was_training = model.training
        model.eval()
        out: list[list[int]] = []
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            for i in range(0, len(prompts), self.cfg.batch_size):
                out += self._generate(model, prompts[i : i + self.cfg.batch_size])
        model.train(was_training)
        return out

    def _generate(self, model, prompts: list[list[int]]) -> list[list[int]]:
        ids, mask = left_pad(prompts, self.pad_id)
        kw = dict(max_new_tokens=self.cfg.max_new_tokens, do_sample=self.cfg.do_sample, eos_token_id=self.eos_ids,
                  pad_token_id=self.pad_id, use_cache=True)
        if self.cfg.do_sample:
            kw.update(temperature=self.cfg.temperature, top_p=self.cfg.top_p, top_k=self.cfg.top_k or None)
        else:
            kw.update(temperature=None, top_p=None, top_k=None)
        gen = model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kw)
        new = gen[:, ids.shape[1]:].tolist()
        completions = []
        for row in new:
            cut = len(row)
            for j, t in enumerate(row):
                if t in self.eos_ids:
                    cut = j + 1  # keep the EOS: the student must learn to stop
                    break
            completions.append(row[:cut])
        return completions
