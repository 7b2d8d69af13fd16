"""A teacher with its own tokenizer around one that scores its own token ids (docs/cross_tokenizer.md).

Each sequence's prompt is rendered again with the teacher's chat template (from the row's messages), its
completion decoded once with the student's tokenizer and tokenised with the teacher's (gkd.data.align). The
teacher scores that; at every student position whose next token is aligned with a teacher token, the
teacher's distribution is handed to the loss as top-K entries over the paired vocabulary (student ids of
the strings both tokenizers hold), so the loss renormalises both sides over those entries. Other scored
positions get a distribution that gives divergence 0 and no gradient, and count as not aligned; with the
span fallback their spans also carry the teacher's log-probability of the span's text, which span_divergence
(called by the training step) compares with the student's. A sampled completion whose text the teacher's tokenizer does not give back is not aligned at all (a warning,
once); a dataset completion like that is refused before training.
"""

from __future__ import annotations

import torch

from gkd.data.align import Aligner
from gkd.data.batch import Batch, collate
from gkd.data.rows import tokenize
from gkd.errors import GKDError
from gkd.losses import LogitHead, logprobs_at
from gkd.teacher.base import OneTeacher, SpanScores, TeacherOutput

FALLBACKS = ("none", "span_logprob")


class CrossTokenizerTeacher(OneTeacher):
    """``inner``: a teacher of the teacher's token ids giving hidden states + head (a LocalTeacher built
    with topk 0, or a RemoteTeacher on the hidden wire); ``topk``: the K entries per position (None: every paired id)."""

    chunk_logits = 2 ** 23  # the teacher's logits formed at once (float32: 32 MiB)

    def __init__(self, inner, student_tok, teacher_tok, topk: int = 0, log=print, fallback: str = "none",
                 tp_group=None):
        if fallback not in FALLBACKS:
            raise GKDError(f"--cross_tokenizer_fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")
        self.fallback = fallback
        self.tp_group = tp_group  # a local teacher's head is split by vocabulary over it under tensor parallelism
        self.inner, self.student_tok, self.teacher_tok = inner, student_tok, teacher_tok
        self.aligner = Aligner(student_tok, teacher_tok)
        pairs = self.aligner.pairs
        self.student_ids = torch.tensor([s for s, _ in pairs])
        self.teacher_ids = torch.tensor([t for _, t in pairs])
        if topk > len(pairs):
            raise GKDError(f"--gkd_logits_topk {topk} exceeds the {len(pairs)} token strings both tokenizers hold")
        self.topk = topk or None
        self.context = None  # its own token counts are checked by check_rows, not the student's
        self.prompts: dict[tuple, list[int]] = {}  # the student's prompt ids -> the teacher's
        self.log, self.warned = log, False

    def check_rows(self, examples: list, new_tokens: int, sampled: bool) -> None:
        """Renders every prompt for the teacher and aligns every dataset completion once: a row that cannot be
        aligned fails now, in one line."""
        chat = bool(getattr(self.student_tok, "chat_template", None))
        for e in examples:
            if e.images:
                raise GKDError(f"{e.source}: --teacher_tokenizer other takes text rows only (this one has images)")
            if chat and not getattr(self.teacher_tok, "chat_template", None):
                raise GKDError(f"{e.source}: the student renders chat rows with its chat template but the teacher's "
                               "tokenizer has none; --teacher_tokenizer other needs one to render the prompt for it")
            theirs, _ = tokenize(self.teacher_tok, e.prompt_messages, False, e.source)
            key = tuple(e.prompt_ids)
            if self.prompts.setdefault(key, theirs) != theirs:
                raise GKDError(f"{e.source}: two rows with the same student prompt render differently for the teacher")
            completion = [] if e.completion_ids is None else self.aligner.retokenise(e.completion_ids, e.source)[0]
            need = len(theirs) + max(len(completion), new_tokens if sampled else 0)
            context = self.limit
            if context is not None and need > context:
                raise GKDError(f"{e.source}: the teacher's tokens reach {need} (prompt {len(theirs)} + completion "
                               f"up to {need - len(theirs)}), beyond its context of {context} positions: lower "
                               "--max_completion_length or --max_length")
        self.log(f"[gkd] --teacher_tokenizer other: {len(self.student_ids)} of the student's {len(self.student_tok)} "
                 f"token strings are in the teacher's vocabulary of {len(self.teacher_tok)}; the divergence runs over "
                 "those")

    @property
    def limit(self) -> int | None:
        """The longest sequence of the teacher's tokens it scores: a local model's context, a server's
        max_model_len less the one token it keeps room for (None: unknown)."""
        if self.inner.context is not None:
            return self.inner.context
        served = getattr(self.inner, "max_model_len", None)
        return None if served is None else served - 1

    def teacher_batch(self, batch: Batch) -> tuple[Batch, list[tuple[int, int, int, list, list]]]:
        """(the teacher's batch, per sequence: (row, first scored position, the teacher's, aligned pairs, unaligned
        segments))."""
        prompts, completions, where = [], [], []
        for (b, start, _), (ids, first) in zip(batch.sequences(), batch.scored_sequences(), strict=True):
            if first < 0:  # no completion: nothing to score
                continue
            prompt = self.prompts.get(tuple(ids[:first + 1]))
            if prompt is None:
                raise GKDError("--teacher_tokenizer other: a prompt the teacher has not rendered (not among the "
                               "training rows checked before training)")
            try:
                theirs, pairs, segments = self.aligner.retokenise(
                    ids[first + 1:], "--teacher_tokenizer other: a sampled completion")
            except GKDError as e:  # only sampled ones: check_rows refused such dataset completions
                if not self.warned:
                    self.log(f"[gkd] {e}; such completions get no teacher signal (once-only warning)")
                    self.warned = True
                continue
            if self.limit is not None:  # a sample the teacher's tokens make longer: its tail goes unscored
                theirs = theirs[:self.limit - len(prompt)]
                pairs = [(i, j) for i, j in pairs if j < len(theirs)]
                segments = [s for s in segments if s[3] <= len(theirs)]
            prompts.append(prompt)
            completions.append(theirs)
            where.append((b, start + first, len(prompt) - 1, pairs, segments))
        tok = self.teacher_tok
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if not prompts:  # the teacher still runs: sharded over ranks, every rank takes part in its forward
            prompts, completions = [[pad]], [[]]
        return collate(prompts, completions, pad).to(batch.input_ids.device), where

    def score(self, batch: Batch, split=None) -> TeacherOutput:
        """The teacher's distribution over the paired vocabulary at the student's aligned positions. Under a
        context ``split`` the teacher's tokens are not the student's (they cannot be split alike): every rank of
        the group scores the whole rows and keeps its positions."""
        if split is not None:
            from gkd.parallel.context import whole_sequences

            with whole_sequences():
                whole = self.score(batch)
            return whole.local(split)
        tbatch, where = self.teacher_batch(batch)
        return self._mapped(batch, tbatch, where, self.inner.score(tbatch))

    def score_pipelined(self, batches: list[Batch], last_stage: bool, splits=None) -> list[TeacherOutput | None]:
        """Each micro-batch's teacher batch through the teacher's own pipeline (its tokens: whole rows, never
        split), mapped to the student's positions on the last stage (this rank's of them under a context split)."""
        made = [self.teacher_batch(b) for b in batches]
        outs = self.inner.score_pipelined([tbatch for tbatch, _ in made], last_stage)
        if not last_stage:
            return [None] * len(batches)
        mapped = [self._mapped(b, tbatch, where, out) for b, (tbatch, where), out in zip(batches, made, outs)]
        return mapped if splits is None else [m.local(split) for m, split in zip(mapped, splits)]

    def _mapped(self, batch: Batch, tbatch: Batch, where: list, out: TeacherOutput) -> TeacherOutput:
        """The teacher's output ``out`` of ``tbatch`` (``teacher_batch``'s) at the student's positions of ``batch``."""
        B, T = batch.input_ids.shape
        device = batch.input_ids.device
        K = self.topk or len(self.student_ids)
        # unaligned and unscored positions: K copies of the label with equal log-probs (divergence 0, no gradient)
        ids = batch.labels.clamp(min=0).unsqueeze(-1).expand(B, T, K).clone()
        logprobs = torch.zeros(B, T, K, device=device)
        aligned = torch.zeros(B, T, dtype=torch.bool, device=device)
        if where:
            rows, theirs = [], []
            for r, (b, s0, t0, pairs, _) in enumerate(where):
                for i, j in pairs:
                    rows.append((b, s0 + i))
                    theirs.append((r, t0 + j))
            if rows:
                b, s = torch.tensor(rows, device=device).T
                ids[b, s], logprobs[b, s] = self._paired(out, torch.tensor(theirs, device=device))
                aligned[b, s] = True
        spans = self._spans(batch, tbatch, where, out) if self.fallback == "span_logprob" else None
        return TeacherOutput(topk_ids=ids, topk_logprobs=logprobs, aligned=aligned, spans=spans)

    def _spans(self, batch: Batch, tbatch: Batch, where: list, out: TeacherOutput) -> SpanScores:
        """The unaligned segments of every sequence: the student positions of each (its index), and the teacher's
        log-probability of the segment's text, the sum of its log-softmax at each of its tokens (temperature 1)."""
        device = batch.input_ids.device
        index = torch.full(batch.input_ids.shape, -1, dtype=torch.long, device=device)
        at, owner, count = [], [], 0  # the teacher's (row, position) of each of its span tokens, the span it is in
        for r, (b, s0, t0, _, segments) in enumerate(where):
            for i0, i1, j0, j1 in segments:
                index[b, s0 + i0:s0 + i1] = count
                at += [(r, t0 + j) for j in range(j0, j1)]
                owner += [count] * (j1 - j0)
                count += 1
        sums = torch.zeros(count, dtype=torch.float64, device=device)
        if at:
            at = torch.tensor(at, device=device)
            target = tbatch.input_ids[at[:, 0], at[:, 1] + 1]
            chunk = max(1, self.chunk_logits // out.head.weight.shape[0])
            lp = torch.cat([logprobs_at(out.head.logits(out.hidden[p[:, 0], p[:, 1]]), t[:, None],
                                        tp_group=self.tp_group)[:, 0]
                            for p, t in zip(at.split(chunk), target.split(chunk))])
            sums.index_add_(0, torch.tensor(owner, device=device), lp.double())
        return SpanScores(index, batch.labels.clamp(min=0), sums)

    def _paired(self, out: TeacherOutput, at: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(student ids, the teacher's log-probs) [N, K] at the teacher's (row, position) pairs ``at`` [N, 2]: its
        log-softmax over its whole vocabulary read at the paired ids, the K largest of them under topk; the logits
        formed a chunk of positions at a time (about 32 MiB of float32 each)."""
        teacher_ids, student_ids = self.teacher_ids.to(at.device), self.student_ids.to(at.device)
        chunk = max(1, self.chunk_logits // out.head.weight.shape[0])
        ids, logprobs = [], []
        for part in at.split(chunk):
            lp = logprobs_at(out.head.logits(out.hidden[part[:, 0], part[:, 1]]), teacher_ids.expand(len(part), -1),
                             tp_group=self.tp_group)
            cols = student_ids.expand(len(part), -1)
            if self.topk:
                lp, top = lp.topk(self.topk, -1)
                cols = cols.gather(-1, top)
            ids.append(cols)
            logprobs.append(lp)
        return torch.cat(ids), torch.cat(logprobs)

    def check_generation(self, rollout, why: str) -> None:
        raise GKDError(f"{why}; a teacher with --teacher_tokenizer other does not write completions yet")

    def generate(self, prompts, rollout, rows=None, inputs=None, seed: int = 0):
        raise GKDError("a teacher with --teacher_tokenizer other does not write completions yet")

    def evaluate(self, student, prompts, **kw):
        raise GKDError("--eval_steps with --teacher_tokenizer other is not supported yet")

    def memory_mib(self, most, device) -> dict[str, float]:
        return self.inner.memory_mib(most, device)

    def close(self) -> None:
        self.inner.close()


def span_divergence(hidden: torch.Tensor, head: LogitHead, spans: SpanScores, mask: torch.Tensor) -> torch.Tensor:
    """Sum over the unaligned spans of 1/2 (log p_s(span) - log p_t(span))^2, with gradient (docs/cross_tokenizer.md):
    the student's log-probability of a span, the sum of its log-softmax (temperature 1) at its tokens, from its
    final hidden states ``hidden`` [B, T, H] and logit head; positions outside ``mask`` do not count."""
    where = (spans.index >= 0) & mask
    if not bool(where.any()):
        return hidden.sum() * 0.0  # (still in the student's graph)
    logits = head.through(lambda h: torch.nn.functional.linear(h, head.weight, head.bias), hidden[where])
    mine = torch.log_softmax(logits.float(), -1).gather(-1, spans.tokens[where][:, None])[:, 0]
    sums = torch.zeros(len(spans.teacher_logprobs), dtype=torch.float32, device=hidden.device)
    sums = sums.index_add(0, spans.index[where], mine)
    used = torch.zeros_like(sums, dtype=torch.bool).index_fill(0, spans.index[where], True)
    gap = (sums - spans.teacher_logprobs.to(sums))[used]
    return 0.5 * (gap * gap).sum()
