"""One `gkd train` step against the method computed naively, in float64, from the models' own logits.

The reference scores each row alone (no padding, no batching, no masks: positions picked by hand), takes
the logits the model's own forward returns (its head, softcap and scale included), applies the formula of
the design note and divides by the step's completion-token count. The trainer's step must give the same
loss and the same gradient for every parameter: this guards collate, masks, the normaliser and the logit
head end to end, for any family and any parallel layout. A mixture-of-experts student adds the router
load-balancing loss as gkd.step defines it: transformers' own ``aux_loss`` of each row alone, weighted by the
row's tokens over the step's, times the config's ``router_aux_loss_coef``.
"""

from __future__ import annotations

import copy
import math

import torch

from gkd.models import adapter_for, unwrap


def trainer_step(trainer) -> tuple[float, dict[str, torch.Tensor]]:
    """Run the trainer's first step; return its loss and the gradients the optimizer would have applied
    (whole tensors, gathered from their shards)."""
    from torch.distributed.tensor import DTensor

    from gkd.train.stats import Window

    grads = {}

    def capture(*_a, **_k):
        for name, p in trainer.student.named_parameters():
            if p.grad is not None:
                g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                grads[name] = g.detach().double().clone()

    trainer.optimizer.step = capture
    loss = trainer.train_step(0, Window())
    return loss, grads


def naive_step(student, teacher, examples, *, beta: float, temperature: float, sft_alpha: float
               ) -> tuple[float, dict[str, torch.Tensor]]:
    """(loss, {name: gradient}) of the off-policy step over ``examples`` (prompt_ids, completion_ids), in
    float64 on copies of the models."""
    s, t = _float64(student), _float64(teacher)
    coef = getattr(unwrap(s).config, "router_aux_loss_coef", 0.0) if adapter_for(s).moe else 0.0
    total, tokens = torch.zeros((), dtype=torch.float64), 0
    aux, routed = torch.zeros((), dtype=torch.float64), 0
    for e in examples:
        p, c = list(e.prompt_ids), list(e.completion_ids)
        ids = torch.tensor([p + c])
        rows = slice(len(p) - 1, len(p) + len(c) - 1)  # logits at i predict token i + 1
        out = s(input_ids=ids, use_cache=False, **({"output_router_logits": True} if coef else {}))
        zs = out.logits[0, rows]
        if coef:
            aux, routed = aux + ids.shape[1] * out.aux_loss, routed + ids.shape[1]
        with torch.no_grad():
            zt = t(input_ids=ids, use_cache=False).logits[0, rows]
        ls, lt = torch.log_softmax(zs / temperature, -1), torch.log_softmax(zt / temperature, -1)
        if beta == 0:
            div = (lt.exp() * (lt - ls)).sum(-1)
        elif beta == 1:
            div = (ls.exp() * (ls - lt)).sum(-1)
        else:
            m = torch.logsumexp(torch.stack([ls + math.log(1 - beta), lt + math.log(beta)]), 0)
            div = beta * (lt.exp() * (lt - m)).sum(-1) + (1 - beta) * (ls.exp() * (ls - m)).sum(-1)
        ce = -torch.log_softmax(zs, -1).gather(-1, torch.tensor(c)[:, None])[:, 0]
        total = total + div.sum() + sft_alpha * ce.sum()
        tokens += len(c)
    loss = total / tokens + (coef * aux / routed if coef else 0.0)
    loss.backward()
    return float(loss.detach()), {n: q.grad for n, q in s.named_parameters() if q.grad is not None}


def _float64(model):
    """A float64 copy in eval mode (experts run transformers' eager loop: grouped_mm has no float64 kernel)."""
    m = copy.deepcopy(model).double().eval()
    if adapter_for(m).moe:
        unwrap(m).set_experts_implementation("eager")
    return m


def assert_step_matches(trainer, student, teacher, *, rel: float = 2e-5) -> float:
    """The trainer's first (off-policy) step equals the naive float64 step of ``student`` and ``teacher`` (whole,
    unsharded models with the trainer's initial weights) on the same rows."""
    cfg = trainer.cfg
    ref_loss, ref = naive_step(student, teacher, trainer.data.rows(0), beta=cfg.beta,
                               temperature=cfg.divergence_temperature,
                               sft_alpha=cfg.sft_alpha)
    loss, grads = trainer_step(trainer)
    assert abs(loss - ref_loss) <= rel * abs(ref_loss), f"loss {loss} vs naive float64 {ref_loss}"
    names = set(grads)
    if trainer.par.pp > 1:  # a rank holds its stages' parameters: together the stages hold every one
        import torch.distributed as dist

        held = [None] * trainer.par.pp
        dist.all_gather_object(held, sorted(names), group=trainer.par.pp_group)
        names = set().union(*held)
    assert names == ref.keys(), sorted(names ^ set(ref))
    for name, g in grads.items():
        err = float((g - ref[name]).abs().max())
        scale = float(ref[name].abs().max())  # 0 for LoRA's A at the start (B is zero)
        assert err <= 10 * rel * scale, f"{name}: gradient differs by {err:.3g} (largest {scale:.3g})"
    moved = sum(float(g.abs().max()) > 0 for g in ref.values())
    assert moved >= len(ref) / 2, f"only {moved} of {len(ref)} parameters get a gradient"
    return loss
