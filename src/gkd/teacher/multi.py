"""Several teachers in one run (docs/teachers.md): each row routed to one of them (RoutedTeacher), or
every position scored against their mixture (MixtureTeacher).

Teachers are named ``name=source`` or by their source (the model path or server URL as given), in the
order of --teacher_model's entries, then --teacher_model_server's (gkd.config.teacher_specs). A row names
its teacher in a ``teacher`` column, or --teacher_route maps its dataset (``*``: every other one) to one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gkd.data.batch import Batch
from gkd.errors import GKDError
from gkd.teacher.base import TeacherOutput


def assign_routes(examples: list, names: list[str], routes: dict[str, str], datasets: list[str]) -> None:
    """Every row's teacher (its ``teacher`` column, else its dataset's route), checked to be one of
    ``names``; one line for the first that is not, or a row with none."""
    stray = sorted(set(routes) - set(datasets) - {"*"})
    if stray:
        raise GKDError(f"--teacher_route names dataset {stray[0]!r}, which is none of --dataset / --val_dataset")
    for where, name in routes.items():
        if name not in names:
            raise GKDError(f"--teacher_route {where}={name}: no teacher is named {name!r} (teachers: {', '.join(names)})")
    for e in examples:
        name = e.teacher or routes.get(e.dataset) or routes.get("*")
        if name is None:
            if len(names) > 1:
                raise GKDError(f"{e.source}: the row names no teacher; give it a 'teacher' column or map its "
                               f"dataset with --teacher_route (teachers: {', '.join(names)})")
            name = names[0]
        if name not in names:
            raise GKDError(f"{e.source}: teacher {name!r} is none of the run's teachers ({', '.join(names)})")
        e.teacher = name


def rows_of(batch: Batch, rows: list[int]) -> Batch:
    """The batch of these rows alone (its other model inputs are joined over rows: a batch with any is
    scored whole, and only these rows count)."""
    if len(rows) == batch.input_ids.shape[0] or batch.inputs or batch.teacher_inputs:
        return batch
    idx = torch.tensor(rows, device=batch.input_ids.device)
    seqs = batch.sequences()
    images = None if batch.images is None else [batch.images[s] for s, (b, _, _) in enumerate(seqs) if b in rows]
    return Batch(batch.input_ids[idx], batch.attention_mask[idx], batch.loss_mask[idx], batch.labels[idx],
                 images=images, sampled=batch.sampled,
                 position_ids=None if batch.position_ids is None else batch.position_ids[idx])


@dataclass
class Group:
    """One teacher's share of a micro-batch: the rows it scored (None: all), the positions of its
    sequences among them, and its output for those rows."""

    name: str
    rows: torch.Tensor | None
    mask: torch.Tensor  # [rows, T] bool: loss positions of this teacher's sequences
    output: TeacherOutput


class _Several:
    """What routed and mixed teachers share: each member asked in turn."""

    def __init__(self, teachers: dict):
        self.teachers = teachers
        self.names = list(teachers)
        self.topk = None
        contexts = [t.context for t in teachers.values() if t.context is not None]
        self.context = min(contexts) if contexts else None

    def members(self) -> list:
        return list(self.teachers.values())

    def score_pipelined(self, batches, last_stage, splits=None):
        """Each member's outputs of every micro-batch (every rank takes part in each member's forward): [member]
        [micro-batch], None off the last stage; ``splits``: as the members take them."""
        return [t.score_pipelined(batches, last_stage, splits) for t in self.members()]

    def check_generation(self, rollout, why: str) -> None:
        raise GKDError(f"{why}; with several teachers none writes completions: give every row a completion")

    def generate(self, *a, **kw):
        raise GKDError("several teachers: no one teacher writes completions")

    def evaluate(self, *a, **kw):
        raise GKDError("several teachers evaluate one at a time (evaluation_groups)")

    def memory_mib(self, most, device) -> dict[str, float]:
        out: dict[str, float] = {}
        for t in self.members():
            for k, v in t.memory_mib(most, device).items():
                out[k] = out.get(k, 0.0) + v
        return out

    def close(self) -> None:
        for t in self.members():
            t.close()


class RoutedTeacher(_Several):
    """Each sequence scored by the teacher its row names; a teacher with none in a micro-batch is not run."""

    def check_rows(self, examples: list, new_tokens: int, sampled: bool) -> None:
        for name, t in self.teachers.items():
            mine = [e for e in examples if e.teacher == name]
            if mine:
                t.check_rows(mine, new_tokens, sampled)

    def score(self, batch: Batch, split=None) -> TeacherOutput:
        raise GKDError("a routed teacher scores groups of rows (score_groups), not a whole batch")

    def evaluation_groups(self, examples: list) -> list[tuple[str, object, list]]:
        """Each teacher against the student on the held-out rows routed to it (one with none is left out)."""
        return [(name, t, mine) for name, t in self.teachers.items() if (mine := [e for e in examples if e.teacher == name])]

    def _owners(self, batch: Batch, teachers: list[str]) -> torch.Tensor:
        """[B, T]: the index (in ``names``) of the teacher of each position's sequence, -1 outside any."""
        index = batch.sequence_index()
        owner = torch.full_like(index, -1)
        for s, name in enumerate(teachers):
            owner[index == s] = self.names.index(name)
        return owner

    def groups_pipelined(self, batches: list[Batch], teachers: list[list[str]], last_stage: bool,
                         splits=None) -> list:
        """Per micro-batch (``teachers``: its sequences' teachers) the groups of the teachers with sequences in it,
        on the last stage (None elsewhere): every teacher scores every micro-batch through its own stages (each
        forward needs every rank), its group is its sequences' positions (rows None; this rank's of them under
        a context split, ``splits``: each micro-batch's)."""
        outputs = _Several.score_pipelined(self, batches, last_stage, splits)
        if not last_stage:
            return [None] * len(batches)
        out = []
        for k, (batch, names, split) in enumerate(zip(batches, teachers, splits or [None] * len(batches), strict=True)):
            owner = self._owners(batch, names)
            out.append([Group(name, None, mine if split is None else split.local(mine, False), outputs[i][k])
                        for i, name in enumerate(self.names) if bool((mine := (owner == i) & batch.loss_mask).any())])
        return out

    def score_groups(self, batch: Batch, teachers: list[str], everyone: bool = False, split=None) -> list[Group]:
        """Each teacher's group of ``batch`` (``teachers``: each sequence's, in ``batch.sequences()`` order).
        ``everyone``: a teacher with no sequence here still runs (on one row, its output unused), for
        teachers sharded over processes that all must join each forward. With ``split`` (context parallelism:
        every rank of the group holds its part of every sequence) a teacher scores the whole micro-batch under
        the split, and its group is its sequences' positions among this rank's (rows None)."""
        owner = self._owners(batch, teachers)
        groups = []
        for i, (name, t) in enumerate(self.teachers.items()):
            mine = (owner == i) & batch.loss_mask
            rows = mine.any(1).nonzero().squeeze(1).tolist()
            if split is not None:  # (the same rows on every rank of the group: all of them join, or none)
                if rows or everyone:
                    out = t.score(batch, split)
                    if rows:
                        groups.append(Group(name, None, split.local(mine, False), out))
                continue
            if not rows:
                if everyone:
                    t.score(rows_of(batch, [0]))
                continue
            sub = rows_of(batch, rows)
            idx = None if sub is batch else torch.tensor(rows, device=mine.device)
            groups.append(Group(name, idx, mine if idx is None else mine[idx], t.score(sub)))
        return groups


class MixtureTeacher(_Several):
    """Every position scored against sum_i w_i softmax(z_i / T) (gkd.losses: exact, over the vocabulary or
    the union of the teachers' top-k ids)."""

    def __init__(self, teachers: dict, weights: list[float]):
        super().__init__(teachers)
        self.weights = weights

    def check_rows(self, examples: list, new_tokens: int, sampled: bool) -> None:
        for t in self.members():
            t.check_rows(examples, new_tokens, sampled)

    def score(self, batch: Batch, split=None) -> TeacherOutput:
        return TeacherOutput(mixture=[t.score(batch, split) for t in self.members()], weights=self.weights)

    def evaluation_groups(self, examples: list) -> list[tuple[str, object, list]]:
        """Each member against the student on every held-out row (the mixture writes no completions to
        evaluate on)."""
        return [(name, t, examples) for name, t in self.teachers.items()]

    def score_pipelined(self, batches: list[Batch], last_stage: bool, splits=None) -> list[TeacherOutput | None]:
        per_member = super().score_pipelined(batches, last_stage, splits)
        if not last_stage:
            return [None] * len(batches)
        return [TeacherOutput(mixture=list(outs), weights=self.weights) for outs in zip(*per_member, strict=True)]


def check_mixable(teachers: dict, vocabs: dict[str, int]) -> None:
    """A mixture needs one vocabulary and one kind of output (full vocabulary, or top-k) over its teachers."""
    if len(set(vocabs.values())) > 1:
        raise GKDError("--teacher_mixture needs one vocabulary, the teachers' differ: "
                       + ", ".join(f"{n} {v}" for n, v in vocabs.items()))
    if len({t.topk is None for t in teachers.values()}) > 1:
        raise GKDError("--teacher_mixture mixes full-vocabulary and top-k teachers: give every teacher a "
                       "--gkd_logits_topk K, or none")
