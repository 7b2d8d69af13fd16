"""Teachers: what scores a batch of sequences. The loss never knows which one it got."""

from __future__ import annotations

from dataclasses import replace

import torch

from gkd.data.batch import Batch
from gkd.models import adapter_for
from gkd.parallel import local_head
from gkd.teacher.base import TeacherOutput


class LocalTeacher:
    """A transformers model in this process. With ``offload`` its weights live on CPU and visit the
    training device only while scoring or generating."""

    def __init__(self, model, device: torch.device, topk: int = 0, offload: bool = False):
        self.model = model.eval().requires_grad_(False)
        self.adapter = adapter_for(model)
        self.device = device
        self.topk = topk or None
        self.offload = offload and device.type != "cpu"
        self.model.to("cpu" if self.offload else device)

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

    @torch.no_grad()
    def score(self, batch: Batch, split=None) -> TeacherOutput:
        inputs = split.model_inputs() if split else batch.model_inputs(teacher=True)
        with self._on_device() as model:
            hidden = self.adapter.final_hidden(model, inputs)
            head = local_head(self.adapter.logit_head(model))  # this rank's vocabulary shard under TP
            if self.offload:  # the weight must outlive the visit
                head = replace(head, weight=head.weight.detach().clone(),
                               bias=None if head.bias is None else head.bias.detach().clone())
        return TeacherOutput(hidden=hidden, head=head, topk=self.topk)

    def generate(self, prompts: list[list[int]], sampler, rows: list[int] | None = None,
                 inputs: list[dict] | None = None) -> list[list[int]]:
        with self._on_device() as model:
            return sampler.generate(model, prompts, rows, inputs)
