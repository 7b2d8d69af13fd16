"""Which rows each optimizer step trains on, and its seeded draws: pure functions of (seed, step), the same
on every rank with no communication."""

from __future__ import annotations

import torch

from gkd.data.rows import Example


def lmbda_draw(seed: int, step: int) -> float:
    """u ~ U(0, 1) for one generation cycle, from (seed, step) alone: identical on every rank."""
    g = torch.Generator().manual_seed((seed * 0x9E3779B1 + step * 0x85EBCA77) % 2**63)
    return float(torch.rand((), generator=g))


def sample_seed(seed: int, step: int, who: int) -> int:
    return (seed * 1_000_003 + step * 7919 + who) % 2**63


class StepData:
    """Rows of each optimizer step: a seeded permutation per epoch, a pure function of the step."""

    def __init__(self, examples: list[Example], global_batch: int, seed: int):
        self.examples, self.gb, self.seed = examples, global_batch, seed
        self._perm: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._perm:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = {epoch: torch.randperm(len(self.examples), generator=g).tolist()}
        return self._perm[epoch]

    def indices(self, step: int) -> list[int]:
        """The step's rows as indices into ``examples``."""
        n = len(self.examples)
        return [self._order(i // n)[i % n] for i in range(step * self.gb, (step + 1) * self.gb)]

    def rows(self, step: int) -> list[Example]:
        return [self.examples[i] for i in self.indices(step)]
