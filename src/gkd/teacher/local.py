"""A teacher that is a transformers model in this process (sharded like the student where it is)."""

from __future__ import annotations

from dataclasses import replace

import torch

from gkd.data.batch import Batch
from gkd.data.rows import model_context
from gkd.errors import GKDError
from gkd.models import adapter_for
from gkd.parallel import local, local_head, local_mib
from gkd.teacher.base import OneTeacher, TeacherOutput


class LocalTeacher(OneTeacher):
    """A transformers model in this process. With ``offload`` its weights live on CPU and visit the
    training device only while scoring or generating."""

    def __init__(self, model, device: torch.device, topk: int = 0, offload: bool = False, name: str = "the teacher"):
        self.model = model.eval().requires_grad_(False)
        self.name = name  # how errors name it (the flag that gave it)
        self.adapter = adapter_for(model)
        vocab = model.config.get_text_config().vocab_size
        if topk > vocab:
            raise GKDError(f"--gkd_logits_topk {topk} exceeds the teacher's vocabulary of {vocab} tokens; use at "
                           "most that (0 = the full vocabulary)")
        self.device = device
        self.topk = topk or None
        self.context = model_context(model)
        self.offload = offload and device.type != "cpu"
        self.model.to("cpu" if self.offload else device)

    def check_rows(self, examples: list, new_tokens: int, sampled: bool) -> None:
        """Nothing beyond ``context``: it takes whatever inputs the student's processor made."""

    def _on_device(self):
        teacher = self

        class _Visit:
            def __enter__(self):
                if teacher.offload:
                    teacher.model.to(teacher.device, non_blocking=True)
                return teacher.model

            def __exit__(self, *exc):
                if teacher.offload:
                    teacher.model.to("cpu")
                    if teacher.device.type == "cuda":
                        torch.cuda.empty_cache()

        return _Visit()

    def _head(self, model):
        head = local_head(self.adapter.logit_head(model))  # this rank's vocabulary shard under TP
        if self.offload:  # the weight must outlive the visit
            head = replace(head, weight=head.weight.detach().clone(),
                           bias=None if head.bias is None else head.bias.detach().clone())
        return head

    def logit_head(self, device: torch.device):
        """The head the loss applies to its final hidden states (on the last pipeline stage under PP), without
        a forward: under --offload_teacher_model the head alone visits ``device``."""
        head = local_head(self.adapter.logit_head(self.model))
        return replace(head, weight=head.weight.to(device), bias=None if head.bias is None else head.bias.to(device))

    @torch.no_grad()
    def score(self, batch: Batch, split=None) -> TeacherOutput:
        inputs = split.model_inputs(teacher=True) if split else batch.model_inputs(teacher=True)
        with self._on_device() as model:
            hidden = self.adapter.final_hidden(model, inputs)
            head = self._head(model)
        return TeacherOutput(hidden=hidden, head=head, topk=self.topk)

    def score_pipelined(self, batches: list[Batch], last_stage: bool, splits=None) -> list[TeacherOutput | None]:
        from gkd.parallel.pipeline import teacher_hidden

        with self._on_device() as model:
            hidden = teacher_hidden(model, batches, splits)  # through its own stages: every rank takes part
            if hidden is None:
                return [None] * len(batches)
            head = self._head(model)
        return [TeacherOutput(hidden=h, head=head, topk=self.topk) for h in hidden]

    def check_generation(self, rollout, why: str) -> None:
        rollout.check_model(self.model, self.name)

    def generate(self, prompts: list[list[int]], rollout, rows: list[int] | None = None,
                 inputs: list[dict] | None = None, seed: int = 0) -> list[list[int]]:
        with self._on_device() as model:
            return rollout.generate(model, prompts, rows, inputs, seed)

    def evaluate(self, student, prompts: list[list[int]], **kw):
        from gkd.evaluate import evaluate

        with self._on_device() as model:
            return evaluate(student, model, prompts, **kw)

    def memory_mib(self, most, device) -> dict[str, float]:
        params = list(self.model.parameters())
        # what stays on the training device between uses (less under --offload_teacher_model)
        return {"teacher_mib_per_rank": most(local_mib(params)),
                "teacher_device_mib_per_rank": most(local_mib(p for p in params if local(p).device.type == device.type))}

    def close(self) -> None:
        """Nothing outlives training."""
