"""`gkd train` steps against the method computed naively, in float64, from the models' own logits.

The reference scores each row alone (no padding, no batching, no masks: positions picked by hand), takes
the logits the model's own forward returns (its head, softcap and scale included; a vision-language row's
images go through the model's own image processor into its forward), applies the formula of the design
note and divides by the step's completion-token count. The cross-entropy term applies to dataset completions
only: on an on-policy step the student wrote them. The trainer's step must give the same loss and the same
gradient for every parameter: this guards collate, masks, the normaliser and the logit head end to end, for
any family and any parallel layout. A mixture-of-experts student adds the router load-balancing loss as
gkd.step defines it: transformers' own ``aux_loss`` of each row alone, weighted by the row's tokens over the
step's, times the config's ``router_aux_loss_coef``.

Over several steps (:func:`assert_steps_match`) the first step is compared on the reference's own weights and
each later one on the weights the trainer holds before it, which must be the previous ones moved by AdamW
(computed here in float64 from the step's gradient; the last step's update is checked too). An on-policy
step's completions must be the student's own draws: row by row, token by token, the inverse CDF of the tempered
float64 distribution at the row's seeded uniforms (gkd's per-row seeding). Under torchrun rank 0 computes the
reference and every rank fails with its verdict.
"""

from __future__ import annotations

import copy
import inspect
import math

import torch

from gkd.losses import Skew
from gkd.models import adapter_for, text_config, unwrap


def naive_step(student, teacher, examples, *, beta: float, temperature: float, sft_alpha: float,
               completions=None, sampled: bool = False, inputs=None, teacher_inputs=None
               ) -> tuple[float, dict[str, torch.Tensor]]:
    """(loss, {name: gradient}) of the step over ``examples`` (prompt_ids and completion_ids, or
    ``completions``; ``sampled``: the student wrote them, so no cross-entropy) in float64 on copies of the
    models; ``inputs`` / ``teacher_inputs``: each row's image inputs for the student / the teacher."""
    return _naive_step(_float64(student), _float64(teacher), examples, beta=beta, temperature=temperature,
                       sft_alpha=sft_alpha, completions=completions, sampled=sampled, inputs=inputs,
                       teacher_inputs=teacher_inputs)


def _naive_step(s, t, examples, *, beta, temperature, sft_alpha, completions, sampled, inputs, teacher_inputs):
    """naive_step on float64 models (``s``'s gradients are set, from None)."""
    coef = getattr(text_config(unwrap(s).config), "router_aux_loss_coef", 0.0) if adapter_for(s).moe else 0.0
    completions = [e.completion_ids for e in examples] if completions is None else completions
    inputs, teacher_inputs = inputs or [{}] * len(examples), teacher_inputs or inputs or [{}] * len(examples)
    total, tokens = torch.zeros((), dtype=torch.float64), 0
    aux, routed = torch.zeros((), dtype=torch.float64), 0
    for e, c, extra, theirs in zip(examples, completions, inputs, teacher_inputs):
        p, c = list(e.prompt_ids), list(c)
        rows = slice(len(p) - 1, len(p) + len(c) - 1)  # logits at i predict token i + 1
        out = _forward(s, p + c, extra, **({"output_router_logits": True} if coef else {}))
        zs = out.logits[0, rows]
        if coef:
            aux, routed = aux + (len(p) + len(c)) * out.aux_loss, routed + len(p) + len(c)
        with torch.no_grad():
            zt = _forward(t, p + c, theirs).logits[0, rows]
        ls, lt = torch.log_softmax(zs / temperature, -1), torch.log_softmax(zt / temperature, -1)
        if isinstance(beta, Skew):  # DistiLLM's: KL(t || a t + (1-a) s), KL(s || a s + (1-a) t)
            own, other = (lt, ls) if beta.kind == "kl" else (ls, lt)
            m = torch.logsumexp(torch.stack([own + math.log(beta.alpha), other + math.log(1 - beta.alpha)]), 0)
            div = (own.exp() * (own - m)).sum(-1)
        elif beta == 0:
            div = (lt.exp() * (lt - ls)).sum(-1)
        elif beta == 1:
            div = (ls.exp() * (ls - lt)).sum(-1)
        else:
            m = torch.logsumexp(torch.stack([ls + math.log(1 - beta), lt + math.log(beta)]), 0)
            div = beta * (lt.exp() * (lt - m)).sum(-1) + (1 - beta) * (ls.exp() * (ls - m)).sum(-1)
        total = total + div.sum()
        if not sampled:
            ce = -torch.log_softmax(zs, -1).gather(-1, torch.tensor(c)[:, None])[:, 0]
            total = total + sft_alpha * ce.sum()
        tokens += len(c)
    loss = total / tokens + (coef * aux / routed if coef else 0.0)
    s.zero_grad(set_to_none=True)
    loss.backward()
    return float(loss.detach()), {n: q.grad for n, q in s.named_parameters() if q.grad is not None}


def _forward(model, ids: list[int], extra: dict, **kw):
    """The model's own forward of one unpadded row; ``extra``: its image inputs (a Qwen2-VL-style model is
    also given mm_token_type_ids, 1 on image tokens, as its processor returns them)."""
    ids = torch.tensor([ids])
    config = unwrap(model).config
    if "image_grid_thw" in extra and "mm_token_type_ids" in inspect.signature(unwrap(model).forward).parameters:
        extra = {**extra, "mm_token_type_ids": (ids == config.image_token_id).long()}
    return model(input_ids=ids, use_cache=False, **extra, **kw)


def _float64(model):
    """A float64 copy in eval mode (experts run transformers' eager loop: grouped_mm has no float64 kernel)."""
    m = copy.deepcopy(model).double().eval()
    if adapter_for(m).moe:
        unwrap(m).set_experts_implementation("eager")
    return m


def image_inputs(folder: str, rows) -> list[dict] | None:
    """Each row's image inputs from the model folder's own image processor, floats in float64 (None: no row
    has images)."""
    if not any(r.images for r in rows):
        return None
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(folder)
    out = []
    for r in rows:
        got = dict(processor(images=r.images, return_tensors="pt")) if r.images else {}
        got.pop("num_patches", None)  # InternVL's tiles per image: its processor counts tokens with it, then drops it
        out.append({k: v.double() if v.is_floating_point() else v for k, v in got.items()})
    return out


def naive_samples(s, examples, inputs, *, call_seed: int, temperature: float, max_new_tokens: int,
                  eos_ids: list[int]) -> list[list[int]]:
    """Each row's completion drawn from the float64 model ``s`` at ``temperature``, one unbatched, uncached
    forward per token: the first token whose cumulative probability exceeds u (the row's k-th uniform, from
    its own generator seeded by gkd.rollout.base.row_seed(call_seed, row)); image placeholders are never
    drawn; cut after the first EOS."""
    from gkd.rollout.base import row_seed

    config = unwrap(s).config
    never = [v for k in ("image_token_id", "image_token_index", "video_token_id")
             if isinstance(v := getattr(config, k, None), int)]
    out = []
    for row, e in enumerate(examples):
        u = torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(row_seed(call_seed, row)),
                       dtype=torch.float64)
        new: list[int] = []
        for k in range(max_new_tokens):
            with torch.no_grad():
                z = _forward(s, list(e.prompt_ids) + new, inputs[row] if inputs else {}).logits[0, -1]
            z[never] = -math.inf
            cdf = torch.softmax(z / temperature, -1).cumsum(0)
            new.append(min(int(torch.searchsorted(cdf, u[k] * cdf[-1], right=True)), len(cdf) - 1))
            if new[-1] in eos_ids:
                break
        out.append(new)
    return out


class _AdamW:
    """torch.optim.AdamW's update in float64, written out: the weights a step should leave."""

    def __init__(self, lr: float, betas: tuple[float, float], eps: float, weight_decay: float):
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.m, self.v, self.t = {}, {}, {}

    def step(self, weights: dict, grads: dict) -> dict:
        out = dict(weights)
        for n, g in grads.items():
            self.t[n] = t = self.t.get(n, 0) + 1
            self.m[n] = m = self.b1 * self.m.get(n, 0) + (1 - self.b1) * g
            self.v[n] = v = self.b2 * self.v.get(n, 0) + (1 - self.b2) * g * g
            out[n] = weights[n] * (1 - self.lr * self.wd) - self.lr * (m / (1 - self.b1 ** t)) / (
                (v / (1 - self.b2 ** t)).sqrt() + self.eps)
        return out


def _whole(trainer, tensors: dict) -> dict[str, torch.Tensor]:
    """``tensors`` (this rank's, maybe DTensor shards) whole, in float64; under PP every stage's, merged."""
    from torch.distributed.tensor import DTensor

    out = {n: (t.full_tensor() if isinstance(t, DTensor) else t).detach().double().clone() for n, t in tensors.items()}
    if trainer.par.pp > 1:  # a rank holds its stages' parameters: together the stages hold every one
        import torch.distributed as dist

        from gkd.parallel.pipeline import tied_copy_names

        held = [None] * trainer.par.pp
        dist.all_gather_object(held, (out, tied_copy_names(trainer.student)), group=trainer.par.pp_group)
        out = {n: t for h, _ in held for n, t in h.items()}
        for copy, one in (pair for _, names in held for pair in names.items()):
            if copy not in out and one not in out:  # a frozen tied weight, asked for its gradients (it has none)
                continue
            # a tied lm_head's copy on the last stage holds the embedding's value (both took the summed gradient)
            assert torch.equal(out[copy], out[one]), f"the tied {one} and its last-stage copy {copy} differ"
            del out[copy]
    return out


def under(name: str, prefixes) -> bool:
    """Whether parameter ``name`` lies under one of ``prefixes`` read as whole name components, as
    --freeze_parameters reads them (model.layers.1 is not model.layers.10)."""
    return any(name == p.rstrip(".") or name.startswith(p.rstrip(".") + ".") for p in prefixes)


def assert_frozen_as_loaded(trainer, folder: str, prefixes: list[str]) -> None:
    """The student's weights that do not train are exactly those under ``prefixes`` and end as loaded from
    ``folder``, bit for bit (whole: gathered from their shards and stages; every rank must call this)."""
    from gkd.models import load_model, unwrap

    frozen = _whole(trainer, {n: p for n, p in trainer.student.named_parameters() if not p.requires_grad})
    loaded = {n: p.detach().double() for n, p in unwrap(load_model(folder)).named_parameters()}
    assert frozen.keys() == {n for n in loaded if under(n, prefixes)}, sorted(frozen)
    moved = [n for n, w in frozen.items() if not torch.equal(w, loaded[n])]
    assert not moved, f"frozen weights moved: {moved}"


def _weights(trainer) -> dict[str, torch.Tensor]:
    return _whole(trainer, {n: p for n, p in trainer.student.named_parameters() if p.requires_grad})


def trainer_step(trainer, step: int = 0):
    """Run the trainer's step ``step``; return its loss, the gradients the optimizer applied (whole tensors,
    gathered from their shards and stages), the global batch's completions (gathered from every rank) and
    whether the student sampled them."""
    import torch.distributed as dist

    from gkd.train.stats import Window

    grads, seen = {}, {}
    real_completions = trainer.completions

    def capture(*_a):
        grads.update(_whole(trainer, {n: p.grad for n, p in trainer.student.named_parameters() if p.grad is not None}))

    def record(rows, at, first, *a):
        seen["mine"] = (first, *real_completions(rows, at, first, *a))
        return seen["mine"][1:]

    hook = trainer.optimizer.register_step_pre_hook(capture)
    trainer.completions = record
    try:
        loss = trainer.train_step(step, Window())
    finally:
        hook.remove()
        trainer.completions = real_completions
    assert grads, f"step {step}: the optimizer did not step"
    every = [seen["mine"]]
    if trainer.par.world > 1:
        every = [None] * trainer.par.world
        dist.all_gather_object(every, seen["mine"])
    shares = {}
    for first, completions, sampled in every:  # (tensor-parallel and pipeline peers share their rows)
        assert shares.setdefault(first, (completions, sampled)) == (completions, sampled), "peers differ"
    assert len({s for _, s in shares.values()}) == 1, "ranks disagree on the step's kind"
    return loss, grads, [c for first in sorted(shares) for c in shares[first][0]], every[0][2]


class _Reference:
    """The float64 reference of a run, in one process: its models, the weights it expects the trainer to hold,
    and AdamW's state."""

    def __init__(self, trainer, student, teacher):
        cfg = self.cfg = trainer.cfg
        group = trainer.optimizer.param_groups[0]
        self.adam = _AdamW(cfg.learning_rate, group["betas"], group["eps"], cfg.weight_decay)
        self.s, self.t = _float64(student), _float64(teacher)
        self.params = dict(self.s.named_parameters())
        # step 1 runs on the reference's own weights, loaded apart from the trainer's; each later one on the
        # trainer's, once they are shown to be the previous ones moved by AdamW
        self.held = {n: p.detach().clone() for n, p in self.params.items() if p.requires_grad}
        self.expected = None
        self.images, self.eos_ids = trainer.images is not None, trainer.sampler.eos_ids

    def moved_to(self, weights: dict, when: str) -> None:
        """The trainer's (whole) weights are AdamW's: float32 rounding (up to ~1e-7 near 1) is far below the
        tolerance of lr / 100, and a step of ~lr per weight (one left out: ~lr) far above it; later steps run on
        them."""
        assert weights.keys() == self.expected.keys(), f"{when}: trained {sorted(weights.keys() ^ self.expected.keys())}"
        for name, w in weights.items():
            err = float((w - self.expected[name]).abs().max())
            assert err <= 1e-2 * self.cfg.learning_rate, f"{when}: {name} is {err:.3g} from AdamW's update"
        with torch.no_grad():
            for name, w in weights.items():
                self.params[name].copy_(w)
        self.held = weights

    def check(self, step: int, rows, loss: float, grads: dict, completions, sampled: bool, rel: float) -> None:
        """The trainer's step ``step`` (its loss, gradients, completions) equals the naive one at the weights
        held; an on-policy step's completions are the student's own draws."""
        cfg, s = self.cfg, self.s
        if self.images:
            assert any(r.images for r in rows), f"step {step}: no row of a vision-language student has an image"
        inputs, teacher_inputs = image_inputs(cfg.model, rows), image_inputs(cfg.teacher_model, rows)
        if sampled:
            from gkd.data.order import sample_seed

            assert cfg.top_k == 0 and cfg.top_p == 1.0, "the naive sampler draws from the tempered distribution only"
            drawn = naive_samples(s, rows, inputs, call_seed=sample_seed(cfg.seed, step, 0),
                                  temperature=cfg.temperature, max_new_tokens=cfg.max_completion_length,
                                  eos_ids=self.eos_ids)
            assert completions == drawn, f"step {step}: the on-policy completions {completions} are not the " \
                                         f"student's draws {drawn}"
        elif not cfg.seq_kd:  # (the teacher completes prompt-only rows)
            assert all(c == r.completion_ids for c, r in zip(completions, rows) if r.completion_ids is not None), \
                f"step {step}: the off-policy completions are not the dataset's"
        ref_loss, ref = _naive_step(s, self.t, rows, beta=cfg.objective, temperature=cfg.divergence_temperature,
                                    sft_alpha=cfg.sft_alpha, completions=completions, sampled=sampled, inputs=inputs,
                                    teacher_inputs=teacher_inputs)
        assert abs(loss - ref_loss) <= rel * abs(ref_loss), f"step {step}: loss {loss} vs naive float64 {ref_loss}"
        assert grads.keys() == ref.keys(), sorted(grads.keys() ^ ref.keys())
        # a gradient that is 0 in exact arithmetic (an attention key bias: softmax ignores a shift; LoRA's A while B
        # is 0) keeps float32 rounding (LLaVA's CLIP tower: 3e-11 of the step's largest gradient): every gradient
        # is compared at a scale of at least 1e-5 of the largest
        floor = 1e-5 * max(float(g.abs().max()) for g in ref.values())
        for name, g in grads.items():
            err = float((g - ref[name]).abs().max())
            scale = float(ref[name].abs().max())
            assert err <= 10 * rel * max(scale, floor), \
                f"step {step}: {name}: gradient differs by {err:.3g} (largest {scale:.3g})"
        moved = sum(float(g.abs().max()) > 0 for g in ref.values())
        assert moved >= len(ref) / 2, f"step {step}: only {moved} of {len(ref)} parameters get a gradient"
        self.expected = self.adam.step(self.held, grads)


def _agreed(trainer, ref: _Reference | None, check: str, *args) -> None:
    """``ref``'s ``check`` of ``args`` run by rank 0 alone (every rank holds the same gathered step; the float64
    reference is made once), its failure raised on every rank, so that none goes on into collectives the others
    left."""
    if trainer.par.world == 1:
        return getattr(ref, check)(*args)
    import torch.distributed as dist

    said = [None]
    if trainer.par.rank == 0:
        try:
            getattr(ref, check)(*args)
        except Exception as e:  # told to the other ranks, then raised here
            said[0] = f"{type(e).__name__}: {e}" if not isinstance(e, AssertionError) else str(e)
            dist.broadcast_object_list(said, src=0)
            raise
    dist.broadcast_object_list(said, src=0)
    if said[0] is not None:
        raise AssertionError(said[0])


def assert_steps_match(trainer, student, teacher, *, steps: int = 2, rel: float = 2e-5) -> list[bool]:
    """The trainer's first ``steps`` steps, on- and off-policy both (the lmbda draws must give both kinds), each
    equal the naive float64 step of ``student`` and ``teacher`` (whole, unsharded models with the trainer's
    initial weights) on the step's rows and completions, at the weights AdamW (float64, here) moved them to;
    returns whether each step was on-policy."""
    kinds = _steps(trainer, student, teacher, steps, rel)[1]
    assert len(set(kinds)) == 2, f"steps on-policy: {kinds}: both kinds of step must be compared"
    return kinds


def assert_step_matches(trainer, student, teacher, *, rel: float = 2e-5) -> float:
    """The trainer's first step equals the naive float64 step of ``student`` and ``teacher`` (whole, unsharded
    models with the trainer's initial weights) on the same rows; returns its loss."""
    return _steps(trainer, student, teacher, 1, rel)[0][0]


def _steps(trainer, student, teacher, steps: int, rel: float) -> tuple[list[float], list[bool]]:
    cfg = trainer.cfg
    if steps > 1:
        assert cfg.lr_scheduler_type == "constant" and not cfg.warmup_ratio, "the float64 AdamW keeps lr constant"
        assert not cfg.max_grad_norm, "the float64 AdamW does not clip"
    ref = _Reference(trainer, student, teacher) if trainer.par.rank == 0 else None
    losses, kinds = [], []
    for step in range(steps):
        if step:
            held = _weights(trainer)  # (a gather: every rank takes part)
            _agreed(trainer, ref, "moved_to", held, f"before step {step}")
        loss, grads, completions, sampled = trainer_step(trainer, step)
        _agreed(trainer, ref, "check", step, trainer.data.rows(step), loss, grads, completions, sampled, rel)
        losses.append(loss)
        kinds.append(sampled)
    if steps > 1:  # the last step's update too (AdamW's moments at work)
        held = _weights(trainer)
        _agreed(trainer, ref, "moved_to", held, "after the last step")
    return losses, kinds
