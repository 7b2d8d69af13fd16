"""What one optimizer step measured, by name, and the sums over the steps between two log lines."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from gkd.train.step import STATS, TEACHER_STATS


@dataclass
class StepStats:
    """One step's sums over every rank (forward_backward's row, reduced, read by name)."""

    loss: float
    divergence: float
    sft: float
    agree: int
    sft_tokens: int
    router_aux: float
    aligned: int  # scored positions with a token-level teacher distribution, of ``alignable`` (a teacher with
    alignable: int  # another tokenizer scored them; 0 of 0 with the student's own tokenizer)
    expert_tokens: torch.Tensor | None  # [MoE layers, E] tokens routed to each expert (None: a dense student)
    teachers: dict[str, list[float]] = field(default_factory=dict)  # routed teacher -> TEACHER_STATS sums

    @classmethod
    def of(cls, row: torch.Tensor, num_experts: int | None, teachers: list[str] | None = None) -> StepStats:
        named = dict(zip(STATS, row[:len(STATS)].tolist()))
        end = len(STATS) + len(TEACHER_STATS) * len(teachers or ())
        per = row[len(STATS):end].view(-1, len(TEACHER_STATS)).tolist()
        load = row[end:].view(-1, num_experts) if len(row) > end else None
        return cls(loss=named["loss"], divergence=named["divergence"], sft=named["sft"], agree=int(named["agree"]),
                   sft_tokens=int(named["sft_tokens"]), router_aux=named["router_aux"],
                   aligned=int(named["aligned"]), alignable=int(named["alignable"]), expert_tokens=load,
                   teachers=dict(zip(teachers or (), per)))


@dataclass
class Window:
    """Sums over the optimizer steps since the last log line."""

    loss: float = 0.0
    div: float = 0.0
    sft: float = 0.0
    sft_tokens: int = 0
    agree: int = 0
    tokens: int = 0
    seqs: int = 0
    student_seqs: int = 0
    grad_norm: float = 0.0
    learning_rate: float = 0.0  # the window's last step trained with it
    router_aux: float = 0.0
    aligned: int = 0
    alignable: int = 0
    expert_tokens: object = None  # [MoE layers, E] tokens routed to each expert (MoE students)
    policy_version: int | None = None  # of the window's last on-policy step: the updates its sampler held
    staleness: int | None = None  # the largest step index - policy version of the window's on-policy steps
    proposed: int = 0  # --speculative_kd_topk: tokens the student proposed, and those the teacher replaced
    replaced: int = 0
    teachers: dict = field(default_factory=dict)  # routed teacher -> TEACHER_STATS sums
    replayed_seqs: int = 0  # of the student's: replayed from earlier steps (--lmbda_schedule adaptive)
    steps: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def add(self, s: StepStats, tokens: int, seqs: int, sampled: bool, grad_norm: float, learning_rate: float,
            replayed: bool = False) -> None:
        self.loss += s.loss
        self.div += s.divergence
        self.sft += s.sft
        self.agree += s.agree
        self.sft_tokens += s.sft_tokens
        self.tokens += tokens
        self.seqs += seqs
        self.student_seqs += seqs if sampled else 0
        self.replayed_seqs += seqs if replayed else 0
        self.grad_norm += grad_norm
        self.learning_rate = learning_rate
        self.router_aux += s.router_aux
        self.aligned += s.aligned
        self.alignable += s.alignable
        if s.expert_tokens is not None:
            self.expert_tokens = s.expert_tokens if self.expert_tokens is None else self.expert_tokens + s.expert_tokens
        for name, values in s.teachers.items():
            self.teachers[name] = [a + b for a, b in zip(self.teachers.get(name, [0.0] * len(values)), values)]
        self.steps += 1

    def add_policy(self, step: int, version: int | None) -> None:
        """An on-policy step's samples came from the weights after ``version`` steps (None: not sampled)."""
        if version is not None:
            self.policy_version = version
            self.staleness = max(self.staleness or 0, step - version)

    def metrics(self) -> dict:
        elapsed = time.perf_counter() - self.t0
        return {
            "loss": self.loss / self.steps,
            "divergence": self.div / max(self.tokens, 1),
            "sft_loss": self.sft / max(self.sft_tokens, 1) if self.sft_tokens else None,
            "learning_rate": self.learning_rate,
            "grad_norm": self.grad_norm / self.steps,
            "tokens_per_s": self.tokens / max(elapsed, 1e-9),
            "step_time": elapsed / self.steps,
            "on_policy_share": self.student_seqs / max(self.seqs, 1),
            "replay_share": self.replayed_seqs / max(self.seqs, 1) if self.replayed_seqs else None,
            "completion_length": self.tokens / max(self.seqs, 1),
            "top1_agreement": self.agree / max(self.tokens, 1),
            "policy_version": self.policy_version,
            "staleness": self.staleness,
            **self._moe(),
            **({"corrected_share": self.replaced / self.proposed} if self.proposed else {}),
            # a teacher with another tokenizer: the share of scored tokens aligned token for token
            **({"aligned_share": self.aligned / self.alignable} if self.alignable else {}),
            **self._per_teacher(),
        }

    def _per_teacher(self) -> dict:
        """Routed teachers: each one's divergence and top-1 agreement over its own tokens, and their count."""
        out = {}
        for name, values in self.teachers.items():
            v = dict(zip(TEACHER_STATS, values))
            out[f"divergence/{name}"] = v["divergence"] / v["tokens"] if v["tokens"] else None
            out[f"top1_agreement/{name}"] = v["agree"] / v["tokens"] if v["tokens"] else None
            out[f"tokens/{name}"] = int(v["tokens"])
        return out

    def _moe(self) -> dict:
        """MoE students: the router aux loss (before its coefficient; the step's loss includes coef x it)
        and the expert load, tokens of the busiest expert over the mean (1 = balanced; E/k = all tokens
        on the same k experts), in the worst layer."""
        if self.expert_tokens is None:
            return {}
        t = self.expert_tokens
        return {"router_aux_loss": self.router_aux / self.steps,
                "expert_load": float((t.max(1).values / t.mean(1).clamp(min=1e-9)).max())}
