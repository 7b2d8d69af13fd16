"""--packing: a micro-batch's sequences packed into rows (positions restarting at 0 for each, attention kept
inside each) train exactly like padded rows: the layout itself, the loss and gradients of one step with every
kind of teacher (full, top-k, cached; the remote one in test_serve.py, gkd cache in test_teacher_cache.py),
mixed dataset and sampled completions, mixture-of-experts routing (test_moe.py), every family against the naive
float64 step, vision-language ones with their images and M-RoPE positions (test_families.py), and whole runs under
FSDP 2, TP 2 and CP 2 against one padded process (PP 2: test_pipeline.py, test_moe.py, test_multimodal.py)."""

import pytest
import torch

from gkd.data.batch import collate
from gkd.data.rows import load_examples
from gkd.models import adapter_for, load_model, load_tokenizer
from gkd.teacher.local import LocalTeacher
from gkd.train.step import LossArgs, MicroBatch, forward_backward
from helpers import assert_one_line_error, assert_same_run, declare_training, gkd_in_process

PACK = ["--packing", "true", "--packing_length", "24"]  # the tiny rows: one to three sequences per packed row
declare_training("fsdp2-packed", 2, PACK)
declare_training("tp2-packed", 2, [*PACK, "--tensor_model_parallel_size", "2"])
declare_training("cp2-packed", 2, [*PACK, "--context_parallel_size", "2"])

PROMPTS = [[3, 4, 5], [6, 7], [8, 9, 10, 11], [12]]
COMPLETIONS = [[20, 21], [22, 23, 24], [25], [26, 27]]


def test_collate_packs_sequences_in_order_and_keeps_each_ones_targets():
    padded = collate(PROMPTS, COMPLETIONS, 0)
    packed = collate(PROMPTS, COMPLETIONS, 0, pack=10)
    assert packed.input_ids.shape == (2, 10)  # 5 + 5 tokens, then 5 + 3 and two of padding
    assert packed.sequences() == [(0, 0, 5), (0, 5, 10), (1, 0, 5), (1, 5, 8)]
    assert padded.sequences() == [(0, 0, 5), (1, 0, 5), (2, 0, 5), (3, 0, 3)]
    for (b, start, end), (row, _, n) in zip(packed.sequences(), padded.sequences()):
        assert end - start == n
        for name in ("input_ids", "loss_mask", "labels"):
            assert torch.equal(getattr(packed, name)[b, start:end], getattr(padded, name)[row, :n]), name
        assert packed.position_ids[b, start:end].tolist() == list(range(n))
    assert packed.attention_mask[1].tolist() == [1] * 8 + [0, 0] and packed.tokens == padded.tokens
    assert packed.sequence_index().tolist() == [[0] * 5 + [1] * 5, [2] * 5 + [3] * 3 + [-1] * 2]
    assert "attention_mask" not in packed.model_inputs() and "position_ids" in packed.model_inputs()
    # a sequence longer than the limit gets a row of its own
    assert [b for b, _, _ in collate(PROMPTS, COMPLETIONS, 0, pack=4).sequences()] == [0, 1, 2, 3]


def _step(student, teacher, batches, sampled):
    """Loss and gradients of one step over ``batches`` (micro-batches), as the trainer accumulates them."""
    student.zero_grad()
    micro = [MicroBatch(b, s) for b, s in zip(batches, sampled)]
    args = LossArgs(beta=0.5, temperature=0.9, sft_alpha=0.3, chunk_size=7)
    tokens = sum(b.tokens for b in batches)
    stats = forward_backward(micro, student, adapter_for(student), teacher, args, float(tokens), skip_empty=True)
    return stats, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def rows(tiny):
    tok = load_tokenizer(tiny["student"])
    return load_examples([tiny["data"]], tok, max_length=64, truncation_strategy="left", max_completion_length=8)[:6]


@pytest.mark.parametrize("teacher_kind", ["full", "topk", "cached"])
def test_a_packed_step_equals_the_padded_step(tiny, rows, teacher_kind, tmp_path):
    """Two micro-batches of three sequences (dataset completions and sampled ones mixed, so the cross-entropy
    skips some of them), packed into rows of at most 24 tokens: the same loss, statistics and gradients."""
    student = load_model(tiny["student"])
    teacher = LocalTeacher(load_model(tiny["teacher"]), torch.device("cpu"), topk=5 if teacher_kind != "full" else 0)
    if teacher_kind == "cached":
        from gkd.teacher.cache import CachedTeacher, TeacherCache

        store = TeacherCache(str(tmp_path / "cache"), {"kind": "local", "fingerprint": "t"}, 5, 0.9, log=lambda m: None)
        teacher = CachedTeacher(teacher, store, log=lambda *_: None)
    sampled = [[False, True, False], [True, False, False]]
    parts = [rows[:3], rows[3:]]

    def batches(pack):
        return [collate([r.prompt_ids for r in part], [r.completion_ids for r in part], 0, pack=pack) for part in parts]

    padded = _step(student, teacher, batches(None), sampled)
    packed_batches = batches(24)
    assert any(len(b.sequences()) > b.input_ids.shape[0] > 0 for b in packed_batches)  # some rows hold several
    packed = _step(student, teacher, packed_batches, sampled)
    torch.testing.assert_close(packed[0], padded[0], rtol=0, atol=1e-6)
    assert packed[1].keys() == padded[1].keys()
    for name in padded[1]:
        torch.testing.assert_close(packed[1][name], padded[1][name], rtol=0, atol=1e-6, msg=name)
    if teacher_kind == "cached":  # the padded step stored every row; the packed one took them from the cache
        assert teacher.cache.hits == 6 and teacher.cache.misses == 6


def test_a_packed_step_with_gradient_checkpointing_equals_the_padded_step(tiny, rows):
    """The recomputation in backward attends per sequence too (the packed attention spans the backward)."""
    teacher = LocalTeacher(load_model(tiny["teacher"]), torch.device("cpu"))
    grads = []
    for pack in (None, 64):
        student = load_model(tiny["student"])
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student.train()
        grads.append(_step(student, teacher, [collate([r.prompt_ids for r in rows[:4]],
                                                      [r.completion_ids for r in rows[:4]], 0, pack=pack)],
                           [[False] * 4])[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("name", ["fsdp2-packed", "tp2-packed", "cp2-packed"])
def test_packed_runs_equal_one_padded_process(runs, name):
    """4 steps (off- and on-policy) packed under FSDP 2, tensor parallelism 2 (each rank's heads attend per
    sequence) and context parallelism 2 (the packed rows are what CP splits; its attention keeps to each
    sequence) equal the single padded process."""
    assert_same_run(runs["single"], runs[name])


def test_packing_length_without_packing_is_one_line(tiny, tmp_path):
    proc = gkd_in_process("train", "--model", tiny["student"], "--teacher_model", tiny["teacher"], "--dataset",
                          tiny["data"], "--output_dir", str(tmp_path / "a"), "--packing_length", "32")
    assert_one_line_error(proc, "--packing_length 32 needs --packing true")
    assert not (tmp_path / "a").exists()
