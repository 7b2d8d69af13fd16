"""On-policy sampling through pipeline stages (gkd.parallel.pipeline), with the samples one process gives.

Each decode step runs the stages in order: the first embeds the new tokens, every stage runs its layers
with its own KV cache and passes the hidden states on, the last applies the final norm and the family's
logit head (lm_head, scale, softcap) to the last position and draws each row's token exactly as
``HFSampler`` does (``RowSeededSampling``: the row's own generator seeded by ``row_seed``, the same
warpers, the same inverse-CDF draw, then greedy pick); the tokens go back to every stage. Positions and masks follow HF ``generate`` (left-padded prompts, positions
from the attention mask's running count), so a completion does not depend on the pipeline size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from gkd.data.batch import join_rows, left_pad
from gkd.models.adapter import adapter_for
from gkd.parallel.pipeline import staged
from gkd.rollout.base import SamplingConfig, cut_at_eos, row_seeded

# generation-config settings HF generate turns into logits processors of its own; the pipelined sampler
# applies only the sampling ones (temperature, top-k, top-p), so a model asking for these is refused
_PROCESSORS = {"repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
               "min_length": 0, "min_new_tokens": 0, "bad_words_ids": None, "suppress_tokens": None,
               "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
               "sequence_bias": None, "exponential_decay_length_penalty": None}


def check_generation_config(model, where: str) -> None:
    """A one-line error for a generation config whose logits processors the pipelined sampler lacks (its
    samples would differ from HF generate's)."""
    from gkd.errors import GKDError
    from gkd.models.adapter import unwrap

    config = unwrap(model).generation_config
    for name, neutral in _PROCESSORS.items():
        value = getattr(config, name, None)
        if value not in (None, neutral):
            raise GKDError(f"{where}: its generation_config.json sets {name} = {value!r}, which sampling through "
                           "pipeline stages does not apply yet; remove it or train without "
                           "--pipeline_model_parallel_size")


class PipelineSampler:
    """The Rollout protocol (gkd.rollout.base), as HFSampler keeps it, for a model
    split into pipeline stages. Every rank of the job calls ``generate`` together; ranks keep stepping
    until every row everywhere has finished (sharded layers need all their ranks in each forward)."""

    def __init__(self, cfg: SamplingConfig, eos_ids: list[int], pad_id: int, device: torch.device,
                 synced: bool = True):
        self.cfg, self.eos_ids, self.pad_id, self.device = cfg, eos_ids, pad_id, device

    def check_model(self, model, where: str) -> None:
        check_generation_config(model, where)

    def weights_changed(self) -> None:
        """Nothing to do: every call samples from the model it is given."""

    def close(self) -> None:
        """Nothing outlives a call."""

    def generate(self, model, prompts: list[list[int]], rows: list[int] | None = None,
                 inputs: list[dict] | None = None, seed: int = 0) -> list[list[int]]:
        return self.generate_with(model, prompts, rows, row_seeded(self.cfg, seed, self.device), inputs)

    @torch.no_grad()
    def generate_with(self, model, prompts: list[list[int]], rows: list[int] | None, sampling,
                      inputs: list[dict] | None = None) -> list[list[int]]:
        """``generate`` with each chunk's draws made by ``sampling(ids, mask, rows)`` (a RowSeededSampling, or
        None for greedy search). A draw with a ``teacher`` split into stages (teacher-corrected sampling,
        gkd.rollout.corrected) has that teacher run through its own stages at every position beside the
        student; its logits reach the draw on the last stage's rank (``given``)."""
        rows = list(range(len(prompts))) if rows is None else rows
        inputs = inputs or [{} for _ in prompts]
        st = staged(model)
        was_training = model.training
        model.eval()
        out: list[list[int]] = []
        try:
            for i in range(0, len(prompts), self.cfg.batch_size):
                chunk = slice(i, i + self.cfg.batch_size)
                out += self._generate(st, prompts[chunk], rows[chunk], join_rows(inputs[chunk]), sampling)
        finally:
            model.train(was_training)
        return out

    def _through(self, st, x: torch.Tensor, attention: torch.Tensor, caches, positions: torch.Tensor,
                 images: dict) -> torch.Tensor | None:
        """One forward of every stage in order (stage s lives on pipeline rank s % P; the first takes the
        prompt's images); the last stage's final-position logits in float32 on the rank that holds it, None
        elsewhere."""
        mine = dict(zip(st.indices, zip(st.stages, caches)))
        width = (x.shape[0], x.shape[1], st.hidden_size())
        h = None
        for s in range(st.num):
            if s not in mine:
                continue
            if s > 0:
                h = torch.empty(width, dtype=st.dtype(), device=x.device)
                dist.recv(h, src=st.peer((s - 1) % st.size), group=st.group)
            stage, cache = mine[s]
            h = stage(x if s == 0 else h, attention_mask=attention, position_ids=positions, cache=cache,
                      images=images if s == 0 else None)
            if s < st.num - 1:
                dist.send(h.contiguous(), dst=st.peer((s + 1) % st.size), group=st.group)
            else:
                return stage.head().through(stage.lm_head, h[:, -1:, :])[:, -1, :].float()
        return None

    def _generate(self, st, prompts: list[list[int]], rows: list[int], inputs: dict, sampling) -> list[list[int]]:
        from transformers import DynamicCache

        ids, attention = left_pad(prompts, self.pad_id)
        ids, attention = ids.to(self.device), attention.to(self.device)
        images = {k: v.to(self.device) for k, v in inputs.items()}
        model = st.stages[0].model
        # a family's own positions of the prompt (Qwen2-VL's M-RoPE ones) and their offset for the new tokens
        prompt_positions, offset = adapter_for(model).stage_position_ids(model, ids, attention, images)
        seeded = sampling(ids, attention, rows)
        teacher = staged(seeded.teacher) if hasattr(seeded, "teacher") else None  # (a corrected draw's)
        caches = [DynamicCache(config=s.config) for s in st.stages]
        teacher_caches = [DynamicCache(config=s.config) for s in teacher.stages] if teacher else None
        eos = torch.tensor(self.eos_ids, device=self.device)
        unfinished = torch.ones(len(prompts), dtype=torch.bool, device=self.device)
        holder = st.peer((st.num - 1) % st.size)  # the rank of the last stage
        # image placeholders are never sampled (HFSampler suppresses them in HF generate likewise)
        placeholders = torch.tensor(adapter_for(model).placeholder_ids(model), dtype=torch.long, device=self.device)
        x, new = ids, []
        for _ in range(self.cfg.max_new_tokens):
            positions = _positions(attention, x.shape[1], prompt_positions if not new else None, offset)
            logits = self._through(st, x, attention, caches, positions, images if not new else {})
            if teacher is not None:  # text only: positions counted by the mask
                theirs = self._through(teacher, x, attention, teacher_caches, _positions(attention, x.shape[1], None,
                                                                                         None), {})
                if theirs is not None:
                    seeded.given = theirs
            token = torch.empty(len(prompts), dtype=torch.long, device=self.device)
            if logits is not None:
                logits[:, placeholders] = -float("inf")
                sofar = torch.cat([ids, *new], dim=1) if new else ids
                scores = seeded(sofar, logits) if seeded is not None else logits
                token = torch.where(unfinished, scores.argmax(-1), self.pad_id)
            dist.broadcast(token, src=holder, group=st.group)
            new.append(token[:, None])
            unfinished &= ~torch.isin(token, eos)
            attention = torch.cat([attention, attention.new_ones(len(prompts), 1)], dim=1)
            x = token[:, None]
            going = torch.tensor(int(unfinished.any()), device=self.device)
            dist.all_reduce(going, op=dist.ReduceOp.MAX)  # every rank steps until all are done
            if not going:
                break
        return cut_at_eos(torch.cat(new, dim=1).tolist(), self.eos_ids)


def _positions(attention: torch.Tensor, n: int, prompt: torch.Tensor | None, offset: torch.Tensor | None):
    """The positions of the last ``n`` tokens as HF generate gives them: counted by the (left-padded) attention
    mask; with a family's own positions of the prompt (``prompt`` [3, B, T]) and their ``offset`` for the
    tokens after it, those lead by the counted ones (the masks take them, the rotary embedding the rest)."""
    counted = (attention.cumsum(-1) - 1).masked_fill(attention == 0, 0)[:, -n:]
    if offset is None:
        return counted
    rest = prompt if prompt is not None else (counted + offset)[None].expand(3, -1, -1)
    return torch.cat([counted[None], rest])
