"""--divergence skew_kl / skew_reverse_kl (DistiLLM's skew divergences at --skew_alpha): the library against the
definition in float64, the fused loss on every teacher form, and training steps against the naive float64 step."""

import pytest
import torch

from gkd.config import TrainConfig
from gkd.losses import Skew, fused_linear_gkd_loss, generalized_jsd, topk_generalized_jsd, topk_logprobs
from gkd.models import load_model
from gkd.train.trainer import Trainer
from helpers import assert_one_line_mistake, gkd_in_process, train_args
from naive import assert_steps_match

SKEWS = [Skew("kl", 0.1), Skew("kl", 0.7), Skew("reverse_kl", 0.1), Skew("reverse_kl", 0.5)]


def definition(zs, zt, skew: Skew, temperature: float):
    """Per position, in float64: KL(t || a t + (1-a) s) or KL(s || a s + (1-a) t)."""
    s, t = torch.log_softmax(zs.double() / temperature, -1), torch.log_softmax(zt.double() / temperature, -1)
    own, other = (t, s) if skew.kind == "kl" else (s, t)
    m = torch.log(skew.alpha * own.exp() + (1 - skew.alpha) * other.exp())
    return (own.exp() * (own - m)).sum(-1)


@pytest.mark.parametrize("skew", SKEWS, ids=str)
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_skew_divergences_and_both_gradients_equal_the_definition(skew, temperature):
    """Checked to fail (2026-12-04) with the mixture's second gradient term dropped from ``_skew``."""
    g = torch.Generator().manual_seed(1)
    zs, zt = (torch.randn(4, 9, 61, generator=g, dtype=torch.float64) * 3).requires_grad_(), \
        (torch.randn(4, 9, 61, generator=g, dtype=torch.float64) * 3).requires_grad_()
    ref = definition(zs, zt, skew, temperature)
    got = generalized_jsd(zs, zt, beta=skew, temperature=temperature, reduction="none")
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got.sum(), [zs, zt]), torch.autograd.grad(ref.sum(), [zs, zt])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("skew", SKEWS, ids=str)
@pytest.mark.parametrize("teacher", ["hidden", "hidden-top7", "topk"])
def test_the_fused_loss_with_a_skew_equals_the_definition(skew, teacher, row_blocks):
    g = torch.Generator().manual_seed(2)
    N, H, V = 13, 8, 47
    h = torch.randn(N, H, generator=g, dtype=torch.float64).requires_grad_()
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) / 2).requires_grad_()
    th, tw = torch.randn(N, H + 3, generator=g, dtype=torch.float64), torch.randn(V, H + 3, generator=g,
                                                                                   dtype=torch.float64)
    zt, temperature = th @ tw.T, 0.8
    if teacher == "hidden":
        kw, ref_t = dict(teacher_hidden=th, teacher_lm_head_weight=tw), None
    else:  # top-k: both sides renormalised over the teacher's K ids
        ids, lp = topk_logprobs(zt, 7)
        kw = dict(teacher_hidden=th, teacher_lm_head_weight=tw, teacher_topk=7) if teacher == "hidden-top7" else \
            dict(teacher_topk_ids=ids, teacher_topk_logprobs=lp)
        ref_t = (ids, lp)
    out = fused_linear_gkd_loss(h, w, **kw, beta=skew, temperature=temperature, reduction="sum", chunk_size=4)
    zs = h @ w.T
    if ref_t is None:
        ref = definition(zs, zt, skew, temperature).sum()
    else:
        ids, lp = ref_t
        ref = definition(zs.gather(-1, ids), lp, skew, temperature).sum()
        torch.testing.assert_close(topk_generalized_jsd(zs, ids, lp, beta=skew, temperature=temperature,
                                                        reduction="sum"), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(out.loss, [h, w]), torch.autograd.grad(ref, [h, w])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("divergence", ["skew_kl", "skew_reverse_kl"])
def test_training_steps_with_a_skew_divergence_equal_naive_float64(tiny, tmp_path, divergence):
    cfg = TrainConfig(model=tiny["student"], teacher_model=tiny["teacher"], dataset=[tiny["data"]],
                      output_dir=str(tmp_path / "out"), lmbda=0.5, seed=42, divergence=divergence, skew_alpha=0.2,
                      temperature=0.9, sft_alpha=0.3, micro_batch_size=2, global_batch_size=6, max_steps=2,
                      max_completion_length=4, learning_rate=1e-3, lr_scheduler_type="constant", max_grad_norm=0.0,
                      loss_chunk_size=5, progress_bar=False)
    trainer = Trainer(cfg, log=lambda *_: None)
    assert_steps_match(trainer, load_model(tiny["student"]), load_model(tiny["teacher"]))


@pytest.mark.parametrize("flags,message", [
    (["--divergence", "skew_kl", "--beta", "0.3"], "--beta 0.3 is the generalized JSD's; --divergence skew_kl takes "
                                                   "--skew_alpha (leave --beta unset)"),
    (["--skew_alpha", "0.3"], "--skew_alpha 0.3 is for --divergence skew_kl / skew_reverse_kl"),
    (["--divergence", "skew_reverse_kl", "--skew_alpha", "1"], "--skew_alpha must be in (0, 1), got 1.0"),
], ids=["beta-with-skew", "alpha-without-skew", "alpha-out-of-range"])
def test_skew_mistakes_are_one_line(tiny, tmp_path, flags, message):
    out = tmp_path / "out"
    assert_one_line_mistake(gkd_in_process(*train_args(tiny, out, *flags)), message)
    assert not out.exists()
