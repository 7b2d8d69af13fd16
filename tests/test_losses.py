"""The divergence library against an independent float64 reference."""

import pytest
import torch

from gkd import GKDError, losses
from gkd.losses import (
    LogitHead,
    _chunk_bounds,
    fused_linear_generalized_jsd,
    fused_linear_gkd_loss,
    generalized_jsd,
    sft_cross_entropy,
    topk_generalized_jsd,
    topk_logprobs,
)

BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]
TEMPS = [0.5, 0.9, 1.0, 2.0]


def reference(zs, zt, beta, temperature):
    """Per-position divergence straight from the definition, in float64."""
    s = torch.log_softmax(zs.double() / temperature, -1)
    t = torch.log_softmax(zt.double() / temperature, -1)
    ps, pt = s.exp(), t.exp()
    if beta == 0:
        return (pt * (t - s)).sum(-1)
    if beta == 1:
        return (ps * (s - t)).sum(-1)
    m = torch.log((1 - beta) * ps + beta * pt)
    return beta * (pt * (t - m)).sum(-1) + (1 - beta) * (ps * (s - m)).sum(-1)


def rel_err(x, ref):
    return float(((x.double() - ref).abs() / ref.abs().clamp_min(1e-30)).max())


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(3, 11, 257, generator=g) * 3
    zt = torch.randn(3, 11, 257, generator=g) * 3
    return zs, zt


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", TEMPS)
def test_matches_float64_reference(logits, beta, temperature):
    zs, zt = logits
    ref = reference(zs, zt, beta, temperature)
    per_pos = generalized_jsd(zs, zt, beta=beta, temperature=temperature, reduction="none")
    assert per_pos.dtype == torch.float32 and per_pos.shape == zs.shape[:-1]
    assert rel_err(per_pos, ref) <= 1e-6
    assert rel_err(generalized_jsd(zs, zt, beta=beta, temperature=temperature, reduction="sum"), ref.sum()) <= 1e-6
    assert rel_err(generalized_jsd(zs, zt, beta=beta, temperature=temperature), ref.mean()) <= 1e-6


@pytest.mark.parametrize("beta", BETAS)
def test_gradients_match_reference(logits, beta):
    zs, zt = (x.double().requires_grad_() for x in logits)
    generalized_jsd(zs, zt, beta=beta, temperature=0.9, reduction="sum").backward()
    zs2, zt2 = (x.detach().clone().requires_grad_() for x in (zs, zt))
    reference(zs2, zt2, beta, 0.9).sum().backward()
    torch.testing.assert_close(zs.grad, zs2.grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(zt.grad, zt2.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_gradcheck_unfused(beta):
    g = torch.Generator().manual_seed(1)
    zs = torch.randn(2, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(2, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    ids = torch.randint(0, 7, (2, 3, 4), generator=g)
    ids = torch.stack([torch.randperm(7, generator=g)[:4] for _ in range(6)]).reshape(2, 3, 4)
    lp = torch.log_softmax(torch.randn(2, 3, 4, generator=g, dtype=torch.float64), -1).requires_grad_()
    labels = torch.randint(0, 7, (2, 3), generator=g)
    for red in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda a, b: generalized_jsd(a, b, beta=beta, temperature=0.7, mask=mask, reduction=red), (zs, zt))
        assert torch.autograd.gradcheck(
            lambda a, b: topk_generalized_jsd(a, ids, b, beta=beta, temperature=1.3, mask=mask, reduction=red), (zs, lp))
        assert torch.autograd.gradcheck(lambda a: sft_cross_entropy(a, labels, mask=mask, reduction=red), (zs,))


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_gradcheck_fused(beta, reduction):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    th = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    tw = torch.randn(9, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 9, (2, 5), generator=g)
    mask = torch.rand(2, 5, generator=g) > 0.3

    def by_hidden(h, w):
        return fused_linear_gkd_loss(h, w, teacher_hidden=th, teacher_lm_head_weight=tw, labels=labels, sft_alpha=0.4,
                                     beta=beta, temperature=0.8, mask=mask, reduction=reduction, chunk_size=3).loss

    ids, lp = topk_logprobs(th @ tw.T, 4)

    def by_topk(h, w):
        return fused_linear_generalized_jsd(h, w, teacher_topk_ids=ids, teacher_topk_logprobs=lp.double(), beta=beta,
                                            temperature=1.2, mask=mask, reduction=reduction, chunk_size=4)

    assert torch.autograd.gradcheck(by_hidden, (h, w))
    assert torch.autograd.gradcheck(by_topk, (h, w))


@pytest.mark.parametrize("beta", BETAS)
def test_topk_with_k_equal_v_is_full(logits, beta):
    zs, zt = logits
    zs = zs.clone().requires_grad_()
    ids, lp = topk_logprobs(zt, zt.shape[-1])
    full = generalized_jsd(zs, zt, beta=beta, temperature=0.9, reduction="none")
    topk = topk_generalized_jsd(zs, ids, lp, beta=beta, temperature=0.9, reduction="none")
    torch.testing.assert_close(topk, full, rtol=2e-6, atol=2e-6)
    (g_full,) = torch.autograd.grad(full.sum(), zs)
    (g_topk,) = torch.autograd.grad(topk.sum(), zs)
    torch.testing.assert_close(g_topk, g_full, rtol=1e-5, atol=1e-6)


def test_topk_renormalises_over_k():
    g = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(5, 40, generator=g), torch.randn(5, 40, generator=g)
    ids, lp = topk_logprobs(zt, 6)
    assert torch.equal(ids, zt.topk(6, -1).indices)
    sub_s = zs.gather(-1, ids)
    ref = reference(sub_s, lp, 0.5, 0.9)  # divergence of the two distributions restricted to the K ids
    got = topk_generalized_jsd(zs, ids, lp, beta=0.5, temperature=0.9, reduction="none")
    assert rel_err(got, ref) <= 1e-6


def _fused_case(dtype=torch.float32, n=(3, 37), hidden=16, vocab=101):
    g = torch.Generator().manual_seed(4)
    h = torch.randn(*n, hidden, generator=g).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(dtype)
    th = torch.randn(*n, hidden + 4, generator=g).to(dtype)
    tw = (torch.randn(vocab, hidden + 4, generator=g) / hidden**0.5).to(dtype)
    mask = torch.rand(*n, generator=g) > 0.25
    labels = torch.randint(0, vocab, n, generator=g)
    return h, w, th, tw, mask, labels


def test_row_blocks_hold_their_bytes_and_cover_the_rows():
    def z(cols, dtype=torch.float32, device="cpu"):
        return torch.empty(0, cols, dtype=dtype, device=device)

    assert losses._row_blocks(10, z(losses.BLOCK_BYTES // 16)) == [(0, 4), (4, 8), (8, 10)]
    assert losses._row_blocks(3, z(losses.BLOCK_BYTES // 2)) == [(0, 1), (1, 2), (2, 3)]  # at least a row
    assert losses._row_blocks(184, z(49152)) == [(r, min(r + 4, 184)) for r in range(0, 184, 4)]  # 768 KiB each
    assert losses._row_blocks(184, z(49152, torch.float64)) == [(r, min(r + 2, 184)) for r in range(0, 184, 2)]
    assert losses._row_blocks(184, z(49152, device="meta")) == [(0, 184)]  # off the CPU: one range
    assert losses._row_blocks(0, z(100)) == []


def test_rowdot_is_the_rows_dot_products_on_small_and_large_blocks():
    g = torch.Generator().manual_seed(0)
    for cols in (50, 2 * losses.BLOCK_BYTES // 8):  # (a product and a sum, and batched products)
        x, y = (torch.randn(3, cols, dtype=torch.float64, generator=g) for _ in range(2))
        torch.testing.assert_close(losses._rowdot(x, y), (x * y).sum(-1), rtol=1e-12, atol=1e-9)


def test_a_short_last_chunk_joins_the_one_before():
    assert _chunk_bounds(184, 170) == [(0, 184)]  # a tail of 14 rows: one chunk
    assert _chunk_bounds(256, 170) == [(0, 170), (170, 256)]  # 86 rows: a chunk of its own
    assert _chunk_bounds(17, 8) == [(0, 8), (8, 17)]
    assert _chunk_bounds(18, 8) == [(0, 8), (8, 16), (16, 18)]  # 2 rows: a quarter of 8
    assert _chunk_bounds(5, 8) == [(0, 5)] and _chunk_bounds(0, 8) == []


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("chunk", [1, 7, 20, 32, 1000])  # 20: the 81 counted rows' last one joins rows 60-79
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_equals_unfused(beta, chunk, reduction, row_blocks):
    h, w, th, tw, mask, labels = _fused_case()
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = fused_linear_gkd_loss(h1, w1, teacher_hidden=th, teacher_lm_head_weight=tw, labels=labels, sft_alpha=0.3,
                                beta=beta, temperature=0.9, mask=mask, reduction=reduction, chunk_size=chunk)
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    zs = h2 @ w2.T
    ref = (generalized_jsd(zs, th @ tw.T, beta=beta, temperature=0.9, mask=mask, reduction=reduction)
           + 0.3 * sft_cross_entropy(zs, labels, mask=mask, reduction=reduction))
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    weights = torch.randn(ref.shape) if reduction == "none" else torch.tensor(1.7)
    (out.loss * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)
    assert out.tokens == int(mask.sum())
    agree = (zs.argmax(-1) == (th @ tw.T).argmax(-1))[mask].sum()
    assert int(out.agree_count) == int(agree)


@pytest.mark.parametrize("faster", [True, False])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])  # (the logits' gradient in a temporary, the student's, the teacher's)
@pytest.mark.parametrize("with_labels", [True, False])
def test_the_vocabulary_products_take_onednn_where_it_was_timed_faster(monkeypatch, faster, beta, with_labels,
                                                                       row_blocks):
    """Per chunk, both heads' logits, the hidden states' gradient and the head's weight gradient go to oneDNN's
    product when this machine's timing picked it (gkd.machine.onednn_faster), to torch's otherwise; the loss and
    gradients are the unfused path's either way, wherever the logits' gradient was formed (the weight gradient's
    product takes its transpose in the teacher's logits' buffer)."""
    import gkd.losses as losses

    calls = []
    real = losses.onednn_linear
    monkeypatch.setattr(losses, "onednn_faster", lambda: faster)
    monkeypatch.setattr(losses, "onednn_linear", lambda x, w: calls.append(tuple(w.shape)) or real(x, w))
    h, w, th, tw, mask, labels = _fused_case()
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = fused_linear_gkd_loss(h1, w1, teacher_hidden=th, teacher_lm_head_weight=tw,
                                labels=labels if with_labels else None, beta=beta, temperature=0.9, mask=mask,
                                chunk_size=1000)
    out.loss.backward()
    V, H = w.shape
    assert calls == ([(V, H), (V, th.shape[-1]), (H, V), (H, int(mask.sum()))] if faster else [])
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = generalized_jsd(h2 @ w2.T, th @ tw.T, beta=beta, temperature=0.9, mask=mask)
    ref.backward()
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_frozen_head_gets_no_weight_gradient_and_the_same_hidden_gradient(reduction):
    """A head weight that does not require grad (--freeze_parameters on a tied embedding): the hidden states'
    gradient is the trained head's, and the [V, H] weight gradient is never formed (no product accumulates it)."""
    h, w, th, tw, mask, labels = _fused_case()
    grads = []
    for trained in (True, False):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_(trained)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = fused_linear_gkd_loss(hh, ww, teacher_hidden=th, teacher_lm_head_weight=tw, labels=labels,
                                        sft_alpha=0.3, beta=0.5, temperature=0.9, mask=mask, reduction=reduction,
                                        chunk_size=7)
            out.loss.sum().backward()
        accumulated = sum(e.count for e in prof.key_averages() if e.key == "aten::addmm_")
        assert (accumulated > 0) == trained, (trained, accumulated)
        assert (ww.grad is not None) == trained
        grads.append(hh.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


@pytest.mark.parametrize("chunk", [5, 64])
def test_fused_topk_equals_unfused(chunk, row_blocks):
    h, w, th, tw, mask, _ = _fused_case()
    ids, lp = topk_logprobs(th @ tw.T, 8)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    a = fused_linear_generalized_jsd(h1, w1, teacher_topk_ids=ids, teacher_topk_logprobs=lp, beta=0.5,
                                     temperature=0.9, mask=mask, chunk_size=chunk)
    # the teacher given as hidden states with teacher_topk must agree with precomputed top-k
    b = fused_linear_generalized_jsd(h, w, teacher_hidden=th, teacher_lm_head_weight=tw, teacher_topk=8, beta=0.5,
                                     temperature=0.9, mask=mask, chunk_size=chunk)
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = topk_generalized_jsd(h2 @ w2.T, ids, lp, beta=0.5, temperature=0.9, mask=mask)
    torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b, ref, rtol=1e-5, atol=1e-6)
    a.backward()
    ref.backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_masked_positions_give_no_value_or_gradient(logits):
    zs, zt = logits
    mask = torch.zeros(zs.shape[:-1], dtype=torch.bool)
    mask[0, :5] = True
    poisoned = zs.clone()
    poisoned[~mask] = float("nan")
    poisoned.requires_grad_()
    out = generalized_jsd(poisoned, zt, mask=mask, reduction="none")
    assert torch.all(out[~mask] == 0) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.all(poisoned.grad[~mask] == 0) and torch.isfinite(poisoned.grad).all()
    clean = generalized_jsd(zs[0, :5], zt[0, :5], reduction="sum")
    torch.testing.assert_close(generalized_jsd(poisoned.detach(), zt, mask=mask, reduction="sum"), clean)


def test_all_masked_is_zero_not_nan():
    h, w, th, tw, _, labels = _fused_case()
    none = torch.zeros(h.shape[:-1], dtype=torch.bool)
    zs = (h @ w.T).requires_grad_()
    for red in ("mean", "sum", "none"):
        for value in (
            generalized_jsd(zs, th @ tw.T, mask=none, reduction=red),
            topk_generalized_jsd(zs, *topk_logprobs(th @ tw.T, 3), mask=none, reduction=red),
            sft_cross_entropy(zs, labels, mask=none, reduction=red),
        ):
            assert torch.all(value == 0)
            (g,) = torch.autograd.grad(value.sum(), zs, allow_unused=True)
            assert g is None or torch.all(g == 0)
        h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = fused_linear_gkd_loss(h1, w1, teacher_hidden=th, teacher_lm_head_weight=tw, labels=labels, sft_alpha=1.0,
                                    mask=none, reduction=red)
        assert torch.all(out.loss == 0)
        out.loss.sum().backward()
        assert torch.all(h1.grad == 0) and torch.all(w1.grad == 0)


@pytest.mark.parametrize("beta", BETAS)
def test_bf16_inputs_give_nonnegative_float32(beta):
    h, w, th, tw, mask, _ = _fused_case(dtype=torch.bfloat16)
    zs, zt = h @ w.T, th @ tw.T
    zt_near = zs + 0.01 * torch.randn_like(zs)  # nearly equal distributions: a tiny divergence
    for teacher in (zt, zt_near, zs):
        per_pos = generalized_jsd(zs, teacher, beta=beta, temperature=0.9, reduction="none")
        assert per_pos.dtype == torch.float32
        assert per_pos.min() >= -1e-6
        ref = reference(zs.float(), teacher.float(), beta, 0.9)
        torch.testing.assert_close(per_pos.double(), ref, rtol=1e-5, atol=1e-6)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fused_linear_generalized_jsd(h1, w1, teacher_hidden=th, teacher_lm_head_weight=tw, beta=beta, mask=mask,
                                        chunk_size=16)
    assert loss.dtype == torch.float32 and loss >= 0
    loss.backward()
    assert h1.grad.dtype == torch.bfloat16 and w1.grad.dtype == torch.bfloat16 and torch.isfinite(w1.grad).all()


def test_sft_cross_entropy_matches_torch(logits):
    zs, _ = logits
    labels = torch.randint(0, zs.shape[-1], zs.shape[:-1])
    labels[0, 0] = -100
    ref = torch.nn.functional.cross_entropy(zs.reshape(-1, zs.shape[-1]).double(), labels.reshape(-1), reduction="sum")
    assert rel_err(sft_cross_entropy(zs, labels, reduction="sum"), ref) <= 1e-6


@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda zs, zt: generalized_jsd(zs, zt, beta=1.5), "beta"),
        (lambda zs, zt: generalized_jsd(zs, zt, beta=-0.1), "beta"),
        (lambda zs, zt: generalized_jsd(zs, zt, temperature=0.0), "temperature"),
        (lambda zs, zt: generalized_jsd(zs, zt, temperature=-1.0), "temperature"),
        (lambda zs, zt: generalized_jsd(zs, zt[..., :-1]), "vocab mismatch"),
        (lambda zs, zt: generalized_jsd(zs, zt, reduction="avg"), "reduction"),
        (lambda zs, zt: generalized_jsd(zs, zt, mask=torch.ones(2, 2, dtype=torch.bool)), "mask shape"),
        (lambda zs, zt: generalized_jsd(zs, zt, mask=torch.ones(zs.shape[:-1])), "mask must be a bool"),
        (lambda zs, zt: topk_generalized_jsd(zs, torch.zeros(*zs.shape[:-1], 300, dtype=torch.long),
                                             torch.zeros(*zs.shape[:-1], 300)), "K=300"),
        (lambda zs, zt: topk_generalized_jsd(zs, torch.full((*zs.shape[:-1], 3), 999), torch.zeros(*zs.shape[:-1], 3)),
         "teacher_topk_ids"),
        (lambda zs, zt: topk_generalized_jsd(zs, torch.zeros(*zs.shape[:-1], 3, dtype=torch.long),
                                             torch.zeros(*zs.shape[:-1], 4)), "teacher_topk_ids shape"),
        (lambda zs, zt: sft_cross_entropy(zs, torch.full(zs.shape[:-1], 500)), "labels"),
        (lambda zs, zt: fused_linear_generalized_jsd(zs[..., :8], torch.randn(5, 9), teacher_hidden=zs[..., :8],
                                                     teacher_lm_head_weight=torch.randn(5, 8)), "student_hidden"),
        (lambda zs, zt: fused_linear_generalized_jsd(zs[..., :8], torch.randn(5, 8), teacher_hidden=zs[..., :8],
                                                     teacher_lm_head_weight=torch.randn(6, 8)), "vocab mismatch"),
        (lambda zs, zt: fused_linear_generalized_jsd(zs[..., :8], torch.randn(5, 8)), "either"),
        (lambda zs, zt: fused_linear_generalized_jsd(zs[..., :8], torch.randn(5, 8), teacher_hidden=zs[..., :8],
                                                     teacher_lm_head_weight=torch.randn(5, 8), chunk_size=0), "chunk_size"),
        (lambda zs, zt: fused_linear_generalized_jsd(zs[..., :8], torch.randn(5, 8), teacher_hidden=zs[..., :8],
                                                     teacher_lm_head_weight=torch.randn(5, 8), teacher_topk=6), "teacher_topk"),
        (lambda zs, zt: fused_linear_generalized_jsd(zs[..., :8], torch.randn(5, 8),
                                                     teacher_hidden=zs[..., :8].clone().requires_grad_(),
                                                     teacher_lm_head_weight=torch.randn(5, 8)), "detach"),
        (lambda zs, zt: fused_linear_generalized_jsd(zs[..., :8], LogitHead(torch.randn(5, 8), torch.randn(6)),
                                                     teacher_hidden=zs[..., :8], teacher_lm_head_weight=torch.randn(5, 8)),
         "bias shape"),
        (lambda zs, zt: fused_linear_generalized_jsd(zs[..., :8], LogitHead(torch.randn(5, 8), softcap=0.0),
                                                     teacher_hidden=zs[..., :8], teacher_lm_head_weight=torch.randn(5, 8)),
         "softcap"),
        (lambda zs, zt: fused_linear_generalized_jsd(zs[..., :8], torch.randn(5, 8), teacher_hidden=zs[..., :8],
                                                     teacher_lm_head_weight=LogitHead(torch.randn(5, 8), scale=0.0)),
         "teacher_lm_head_weight scale"),
    ],
)
def test_bad_arguments_name_the_argument(logits, call, needle):
    zs, zt = logits
    with pytest.raises(GKDError, match=needle):
        call(zs, zt)


# --- logit heads: bias, scale before or after the product, softcap ----------------------------------------


def head_logits(h, w, b=None, scale=1.0, scale_hidden=False, softcap=None):
    """A model's logits, written out: the reference for LogitHead."""
    bias = 0 if b is None else b
    u = (scale * h) @ w.T + bias if scale_hidden else scale * (h @ w.T + bias)
    return u if softcap is None else softcap * torch.tanh(u / softcap)


HEADS = [dict(), dict(scale=0.125), dict(softcap=2.0), dict(bias=True), dict(bias=True, scale=3.0, softcap=1.5),
         dict(bias=True, scale=0.5, scale_hidden=True, softcap=4.0)]


@pytest.mark.parametrize("form", HEADS, ids=lambda f: "-".join(f"{k}{v}" for k, v in f.items()) or "plain")
@pytest.mark.parametrize("teacher", ["hidden", "hidden-top5", "topk"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_fused_logit_head_equals_its_logits_in_float64(form, teacher, beta, row_blocks):
    """Value and gradients (hidden states, weight, bias) through scale and softcap equal autograd on the
    logits the head describes; the teacher's head is applied the same way."""
    g = torch.Generator().manual_seed(4)
    B, T, V, H = 2, 6, 37, 8
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64)
    th, tw, tb = (torch.randn(B, T, H + 1, generator=g, dtype=torch.float64),
                  torch.randn(V, H + 1, generator=g, dtype=torch.float64), torch.randn(V, generator=g, dtype=torch.float64))
    labels, mask = torch.randint(0, V, (B, T), generator=g), torch.rand(B, T, generator=g) > 0.3
    form = dict(form)
    bias = form.pop("bias", False)
    tform = dict(scale=1.7, softcap=3.0, scale_hidden=not form.get("scale_hidden", False)) if form else {}
    zt = head_logits(th, tw, tb if bias else None, **tform)
    if teacher == "hidden":
        tkw = dict(teacher_hidden=th, teacher_lm_head_weight=LogitHead(tw, tb if bias else None, **tform))
    elif teacher == "hidden-top5":
        tkw = dict(teacher_hidden=th, teacher_lm_head_weight=LogitHead(tw, tb if bias else None, **tform), teacher_topk=5)
    else:
        ids, lp = topk_logprobs(zt, 5)
        tkw = dict(teacher_topk_ids=ids, teacher_topk_logprobs=lp)

    xs = [x.clone().requires_grad_() for x in (h, w, b)]
    out = fused_linear_gkd_loss(xs[0], LogitHead(xs[1], xs[2] if bias else None, **form), **tkw, labels=labels,
                                sft_alpha=0.3, beta=beta, temperature=0.8, mask=mask, reduction="sum", chunk_size=4)
    out.loss.backward()

    ys = [x.clone().requires_grad_() for x in (h, w, b)]
    zs = head_logits(ys[0], ys[1], ys[2] if bias else None, **form)
    if teacher == "hidden":
        div = generalized_jsd(zs, zt, beta=beta, temperature=0.8, mask=mask, reduction="sum")
    else:
        ids, lp = topk_logprobs(zt, 5)
        div = topk_generalized_jsd(zs, ids, lp, beta=beta, temperature=0.8, mask=mask, reduction="sum")
    ref = div + 0.3 * sft_cross_entropy(zs, labels, mask=mask, reduction="sum")
    ref.backward()
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-12)
    for x, y in zip(xs, ys):
        assert (x.grad is None) == (y.grad is None)
        if x.grad is not None:
            torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_gradcheck_fused_logit_head(reduction):
    g = torch.Generator().manual_seed(5)
    h = torch.randn(2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    th, tw = torch.randn(2, 4, 3, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 4, generator=g) > 0.2
    for scale_hidden in (False, True):
        def f(h, w, b):
            return fused_linear_gkd_loss(h, LogitHead(w, b, scale=0.7, scale_hidden=scale_hidden, softcap=1.3),
                                         teacher_hidden=th, teacher_lm_head_weight=LogitHead(tw, softcap=2.0), beta=0.4,
                                         mask=mask, reduction=reduction, chunk_size=3).loss
        assert torch.autograd.gradcheck(f, (h, w, b))


def test_logit_head_in_float32_and_a_plain_head_is_a_bare_weight():
    g = torch.Generator().manual_seed(6)
    h, w = torch.randn(3, 5, 16, generator=g), torch.randn(40, 16, generator=g)
    th, tw = torch.randn(3, 5, 16, generator=g), torch.randn(40, 16, generator=g)
    kw = dict(teacher_hidden=th, beta=0.5, temperature=0.9)
    bare = fused_linear_generalized_jsd(h, w, teacher_lm_head_weight=tw, **kw)
    assert torch.equal(fused_linear_generalized_jsd(h, LogitHead(w), teacher_lm_head_weight=LogitHead(tw), **kw), bare)
    capped = fused_linear_generalized_jsd(h, LogitHead(w, softcap=2.0), teacher_lm_head_weight=LogitHead(tw, softcap=2.0),
                                          **kw)
    ref = reference(head_logits(h.double(), w.double(), softcap=2.0), head_logits(th.double(), tw.double(), softcap=2.0),
                    0.5, 0.9).mean()
    assert abs(float(capped) - float(ref)) <= 1e-5 * float(ref) and abs(float(capped) - float(bare)) > 1e-2
