"""Rollouts: completions sampled from a model for on-policy (student) or sequence-level KD (teacher)."""

from __future__ import annotations

import torch

from gkd.data.batch import join_rows, left_pad
from gkd.models.adapter import adapter_for
from gkd.rollout import decode
from gkd.rollout.base import SamplingConfig, cut_at_eos, row_seeded


class HFSampler:
    """Batched sampling from a transformers model with a KV cache; stops each sequence at EOS. Returns
    token ids only. Decoder-only models on SDPA run `gkd.rollout.decode`'s loop (a static cache, no copied KV
    heads, batched seeded draws); others, and extra model inputs, take HF `generate`.

    Every prompt is sampled from its own generator, seeded by ``row_seed(seed, row)`` (``seed``: the call's) where ``row`` is
    its index in the step's global batch: samples do not depend on how the batch is split into chunks,
    micro-batches or data-parallel ranks, and the training RNG stream is never touched. With ``synced``
    (several processes sharing sharded weights) every rank keeps stepping until all are done, so their
    collectives stay matched.
    """

    def __init__(self, cfg: SamplingConfig, eos_ids: list[int], pad_id: int, device: torch.device,
                 synced: bool = False):
        self.cfg, self.eos_ids, self.pad_id, self.device, self.synced = cfg, eos_ids, pad_id, device, synced

    def check_model(self, model, where: str) -> None:
        """Every model it is given samples as HF generate would."""

    def weights_changed(self) -> None:
        """Nothing to do: every call samples from the model it is given."""

    def close(self) -> None:
        """Nothing outlives a call (the vLLM samplers hold an engine or threads)."""

    def generate(self, model, prompts: list[list[int]], rows: list[int] | None = None,
                 inputs: list[dict] | None = None, seed: int = 0) -> list[list[int]]:
        """Completions of ``prompts``; ``inputs``: each prompt's other model inputs (images), or None."""
        return self.generate_with(model, prompts, rows, row_seeded(self.cfg, seed, self.device), inputs)

    @torch.no_grad()
    def generate_with(self, model, prompts: list[list[int]], rows: list[int] | None, sampling,
                      inputs: list[dict] | None = None) -> list[list[int]]:
        """``generate`` with each chunk's draws made by ``sampling(ids, mask, rows)`` (the chunk's left-padded
        prompts and their rows): a RowSeededSampling, or None for greedy search."""
        rows = list(range(len(prompts))) if rows is None else rows
        inputs = inputs or [{} for _ in prompts]
        was_training = model.training
        model.eval()
        out: list[list[int]] = []
        for i in range(0, len(prompts), self.cfg.batch_size):
            chunk = slice(i, i + self.cfg.batch_size)
            out += self._generate(model, prompts[chunk], rows[chunk], join_rows(inputs[chunk]), sampling)
        model.train(was_training)
        return out

    def _generate(self, model, prompts: list[list[int]], rows: list[int], inputs: dict, sampling) -> list[list[int]]:
        ids, mask = (t.to(self.device) for t in left_pad(prompts, self.pad_id))
        seeded = sampling(ids, mask, rows)
        with decode.few_row_linears(model):
            new = self._new_tokens(model, ids, mask, inputs, seeded)
        return cut_at_eos(new, self.eos_ids)

    def _new_tokens(self, model, ids, mask, inputs: dict, seeded) -> list[list[int]]:
        if decode.supported(model) and not inputs:  # (the decode loop: see gkd.rollout.decode)
            pick = seeded.draw if seeded else (lambda logits: logits.argmax(-1))
            return decode.decode(model, ids, mask, self.cfg.max_new_tokens, pick, self.eos_ids, self.pad_id,
                                 synced=self.synced).tolist()
        # other families, and rows with images: HF generate with the same per-row draws
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
        return gen[:, ids.shape[1]:].tolist()


