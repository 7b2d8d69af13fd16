"""A tied embedding's lookup adds its gradient into the weight's .grad in place (gkd.models.tied): the same gradient
as PyTorch's dense embedding backward, without the [V, H] zero-filled buffer that backward allocates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gkd.config import TrainConfig
from gkd.models import load_model
from gkd.models.tied import add_lookup_grads_in_place
from gkd.train.stats import Window
from gkd.train.trainer import Trainer


def _dense_backward_calls(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::embedding_dense_backward")


def _ids(model):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (3, 11), generator=g)
    ids[0, :3] = model.config.pad_token_id  # the padding row gets no gradient from the lookup
    ids[1, 2:7] = 7  # a repeated id: its rows are summed before they reach the weight
    return ids


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_the_gradient_is_the_dense_backwards_and_no_dense_buffer_is_made(tied, micro_batches):
    plain, mine = load_model(tied["student"]), load_model(tied["student"])
    assert mine.get_input_embeddings().weight is mine.get_output_embeddings().weight
    assert add_lookup_grads_in_place(mine)
    ids = _ids(mine)

    def backward(model):
        for mb in range(micro_batches):
            rows = ids[mb: mb + 2]
            model(input_ids=rows, labels=rows).loss.backward()

    assert _dense_backward_calls(lambda: backward(plain)) == micro_batches
    assert _dense_backward_calls(lambda: backward(mine)) == 0
    for (name, a), (_, b) in zip(plain.named_parameters(), mine.named_parameters()):
        if micro_batches == 1:  # the same sums: head + (rows of each id, summed in order)
            assert torch.equal(a.grad, b.grad), name
        else:  # over micro-batches (grad + head) + rows instead of grad + (head + rows)
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-7)


def test_a_lookup_without_grad_or_without_a_head_gradient(tied):
    model = load_model(tied["student"])
    add_lookup_grads_in_place(model)
    emb = model.get_input_embeddings()
    ids = _ids(model)
    with torch.no_grad():  # sampling and evaluation: the module's own output
        assert torch.equal(emb(ids), nn.functional.embedding(ids, emb.weight, emb.padding_idx))
    emb(ids).sum().backward()  # the lookup alone: its rows into a .grad of zeros
    want = torch.zeros_like(emb.weight).index_add_(0, ids.reshape(-1), torch.ones(ids.numel(), emb.weight.shape[1]))
    want[emb.padding_idx] = 0
    assert torch.equal(emb.weight.grad, want)


def test_a_bfloat16_weights_repeated_rows_are_rounded_once(tied):
    model = load_model(tied["student"]).to(torch.bfloat16)
    add_lookup_grads_in_place(model)
    emb = model.get_input_embeddings()
    ids = torch.full((64,), 5)
    grad = torch.randn(64, emb.weight.shape[1], generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    emb(ids).backward(grad)
    assert torch.equal(emb.weight.grad[5], grad.float().sum(0).to(torch.bfloat16))  # once rounded, not 64 times


def test_it_applies_only_where_it_is_the_same_sum(tiny, tied):
    untied = load_model(tiny["student"])
    assert untied.get_input_embeddings().weight is not untied.get_output_embeddings().weight
    assert not add_lookup_grads_in_place(untied)
    frozen = load_model(tied["student"])
    frozen.get_input_embeddings().weight.requires_grad_(False)
    assert not add_lookup_grads_in_place(frozen)

    class Scaled(nn.Embedding):  # a family's embedding that transforms its rows (Gemma's scaled embedding)
        def forward(self, ids):
            return super().forward(ids) * 2.0

    scaled = load_model(tied["student"])
    old = scaled.get_input_embeddings()
    new = Scaled(old.num_embeddings, old.embedding_dim, old.padding_idx)
    new.weight = old.weight
    scaled.set_input_embeddings(new)
    assert not add_lookup_grads_in_place(scaled)

    class Stage(nn.Module):  # a later pipeline stage of a multimodal model: transformers cannot find its embedding
        def get_input_embeddings(self):
            raise NotImplementedError("get_input_embeddings not auto-handled")

    assert not add_lookup_grads_in_place(Stage())


@pytest.mark.parametrize("applied", [True, False])
def test_the_trainers_tied_student_makes_no_dense_embedding_buffer(tied, tmp_path, monkeypatch, applied):
    if not applied:  # the same step as PyTorch runs it: the dense buffer, once per micro-batch
        monkeypatch.setattr("gkd.train.build.add_lookup_grads_in_place", lambda model: False)
    cfg = TrainConfig(model=tied["student"], teacher_model=tied["teacher"], dataset=[tied["data"]],
                      output_dir=str(tmp_path / "o"), lmbda=0.0, max_completion_length=4, micro_batch_size=2,
                      global_batch_size=4, max_steps=1, progress_bar=False)
    trainer = Trainer(cfg, log=lambda *_: None)
    try:
        assert _dense_backward_calls(lambda: trainer.train_step(0, Window())) == (0 if applied else 2)
    finally:
        trainer.close()
