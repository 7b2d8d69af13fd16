"""A teacher with another tokenizer (--teacher_tokenizer other): the student's own tokenizer given as the
other one reproduces the normal path; byte-level BPEs with other merges align where hand-worked spans say;
a tiny pair with different tokenizers trains off- and on-policy; an un-alignable template is refused."""

import json
from itertools import pairwise
from pathlib import Path

import pytest
import torch

from gkd.config import TrainConfig
from gkd.data.align import Aligner, aligned_pairs, id_bytes, spans, vocab_pairs
from gkd.data.batch import collate
from gkd.data.rows import load_examples
from gkd.errors import GKDError
from gkd.models import load_model, load_tokenizer
from gkd.teacher.cross_tokenizer import CrossTokenizerTeacher
from gkd.teacher.local import LocalTeacher
from gkd.train.metrics import read_metrics
from gkd.train.trainer import Trainer
from gkd.teacher.remote import RemoteTeacher
from helpers import (assert_one_line_error, assert_same_run, declare, gkd_in_process, loss_and_head_grad,
                     start_gkd_serve, stop, train_args)

# --- two byte-level BPEs built by hand: the same bytes, other merges, other ids, other chat templates ----------

STUDENT_MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("o", "r")]
TEACHER_MERGES = [("h", "e"), ("l", "l"), ("Ġ", "w"), ("o", "r"), ("l", "d")]
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def _bpe(folder: Path, merges, specials_first: bool, eos: str, template: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    words = chars + ["".join(m) for m in merges]
    tokens = SPECIALS + words if specials_first else words + SPECIALS
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=eos, pad_token="<pad>",
                                   additional_special_tokens=[s for s in SPECIALS if s not in ("<s>", eos, "<pad>")])
    fast.chat_template = template
    fast.save_pretrained(str(folder))


def _pair(root: Path) -> dict:
    """A tiny student and teacher with the tokenizers above (student: eos <|im_end|>, id 4 as in its config)."""
    from tiny import write_model

    root.mkdir(parents=True, exist_ok=True)
    s, t = root / "student", root / "teacher"
    # (one unused row beyond the tokenizer's 267, as real checkpoints pad theirs: tensor parallelism 2 splits it)
    write_model(s, layers=2, seed=2, vocab_size=256 + len(STUDENT_MERGES) + len(SPECIALS) + 1)
    write_model(t, layers=3, seed=1, vocab_size=256 + len(TEACHER_MERGES) + len(SPECIALS))
    _bpe(s, STUDENT_MERGES, True, "<|im_end|>",
         "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    _bpe(t, TEACHER_MERGES, False, "</s>",
         "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
         "{% if add_generation_prompt %}### assistant: {% endif %}")
    words = ["hello", "world", "or", "hold", "held", "we", "low"]
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(8):
        def pick(n):
            return " ".join(words[int(i)] for i in torch.randint(0, len(words), (n,), generator=g))

        rows.append({"messages": [{"role": "user", "content": pick(3)}, {"role": "assistant", "content": pick(3)}]})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"student": str(s), "teacher": str(t), "data": str(root / "data.jsonl")}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return _pair(tmp_path_factory.mktemp("cross"))


def _cross_run(c, out):
    """train_args (4 steps, off- and on-policy) of the pair with different tokenizers and the span fallback, made
    once per session."""
    return train_args(c.once("cross-pair", lambda: _pair(c.root / "cross-pair")), out, "--teacher_tokenizer", "other",
                      "--cross_tokenizer_fallback", "span_logprob")


declare("cross-single", 1, _cross_run)
declare("cross-fsdp2", 2, _cross_run)
declare("cross-pp2", 2, lambda c, out: [*_cross_run(c, out), "--pipeline_model_parallel_size", "2"])


def _cross_run_without_fallback(c, out):
    args = _cross_run(c, out)
    return args[:args.index("--cross_tokenizer_fallback")]


declare("cross-single-aligned", 1, _cross_run_without_fallback)
declare("cross-cp2", 2, lambda c, out: [*_cross_run_without_fallback(c, out), "--context_parallel_size", "2"])
declare("cross-tp2", 2, lambda c, out: [*_cross_run_without_fallback(c, out), "--tensor_model_parallel_size", "2"])


def test_hand_worked_spans_of_hello_world_align_where_both_cut_alike(pair):
    """'hello world': the student cuts hello|Ġw|or|l|d, the teacher he|ll|o|Ġw|or|ld. Aligned by hand: student
    token 1 (Ġw, chars 5-7) with teacher token 3, student 2 (or, 7-9) with teacher 4; 'hello' (one student
    token, three teacher ones) and l|d against ld are not; the end-of-sequence tokens pair up."""
    stok, ttok = load_tokenizer(pair["student"]), load_tokenizer(pair["teacher"])
    text = "hello world"
    mine = stok(text, add_special_tokens=False)["input_ids"]
    theirs = ttok(text, add_special_tokens=False)["input_ids"]
    assert stok.convert_ids_to_tokens(mine) == ["hello", "Ġw", "or", "l", "d"]
    assert ttok.convert_ids_to_tokens(theirs) == ["he", "ll", "o", "Ġw", "or", "ld"]
    assert spans(stok, mine, text) == [(0, 5), (5, 7), (7, 9), (9, 10), (10, 11)]  # by decoding prefixes
    assert spans(ttok, theirs, text) == [(0, 2), (2, 4), (4, 5), (5, 7), (7, 9), (9, 11)]
    assert spans(stok, mine, text, id_bytes(stok)) == spans(stok, mine, text)  # by the tokens' bytes
    assert spans(ttok, theirs, text, id_bytes(ttok)) == spans(ttok, theirs, text)
    pair_of = dict(vocab_pairs(stok, ttok))
    assert aligned_pairs(spans(stok, mine, text), spans(ttok, theirs, text), mine, theirs, pair_of) == [(1, 3), (2, 4)]
    # the same characters under ids the mapping does not pair are not aligned
    unpaired = {s: t for s, t in pair_of.items() if s != stok.convert_tokens_to_ids("or")}
    assert aligned_pairs(spans(stok, mine, text), spans(ttok, theirs, text), mine, theirs, unpaired) == [(1, 3)]
    ids, pairs, segments = Aligner(stok, ttok).retokenise(mine + [stok.eos_token_id], "test")
    assert ids == theirs + [ttok.eos_token_id] and pairs == [(1, 3), (2, 4), (5, 6)]
    # between the aligned pairs: 'hello' (student 0, teacher 0-2) and 'ld' (student l|d 3-4, teacher 5)
    assert segments == [(0, 1, 0, 3), (3, 5, 5, 6)]
    # the paired vocabulary: the same strings under other ids (specials first in one, last in the other)
    assert pair_of[stok.convert_tokens_to_ids("or")] == ttok.convert_tokens_to_ids("or")
    assert stok.convert_tokens_to_ids("or") != ttok.convert_tokens_to_ids("or")
    assert stok.convert_tokens_to_ids("hello") not in pair_of  # the teacher has no such token
    assert pair_of[stok.eos_token_id] == ttok.eos_token_id


def test_a_sentencepiece_word_marker_pairs_with_a_byte_level_space(pair, tmp_path):
    """'▁world' (SentencePiece's marker) and 'Ġworld' (byte-level BPE's space) are the same string ' world'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, "\u2581world": 2, "\u2581hello": 3, "or": 4}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    sp = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    stok = load_tokenizer(pair["student"])
    bpe_world = len(stok)  # a byte-level ' world' added to the student's vocabulary
    stok.add_tokens(["\u0120world"])
    pairs = dict(vocab_pairs(sp, stok))
    assert pairs[2] == bpe_world and pairs[4] == stok.convert_tokens_to_ids("or") and 3 not in pairs


def test_a_split_multibyte_character_has_byte_spans_only_from_the_tokens_bytes(pair):
    """'é' is two bytes: as two byte tokens, decoding prefixes finds no clean boundary inside the character
    (no span for either); their bytes give each its byte."""
    stok = load_tokenizer(pair["student"])
    ids = stok("é!", add_special_tokens=False)["input_ids"]
    assert len(ids) == 3 and spans(stok, ids, "é!") == [None, None, (2, 3)]
    assert spans(stok, ids, "é!", id_bytes(stok)) == [(0, 1), (1, 2), (2, 3)]


def _batch(examples, tok):
    return collate([e.prompt_ids for e in examples], [e.completion_ids for e in examples], tok.pad_token_id)


def test_the_students_own_tokenizer_as_the_other_one_equals_the_normal_path(tiny):
    """The same tokenizer loaded twice as 'other': every scored position aligned, every id paired, and the loss
    and lm_head gradient those of the plain local teacher (to float32 rounding: the top-K form renormalises
    the teacher's log-probs instead of taking its logits' log-softmax)."""
    tok = load_tokenizer(tiny["student"])
    examples = load_examples([tiny["data"]], tok, max_length=64, truncation_strategy="left", max_completion_length=8)
    batch = _batch(examples[:6], tok)
    student, teacher = load_model(tiny["student"], "float32"), load_model(tiny["teacher"], "float32")
    plain = LocalTeacher(teacher, torch.device("cpu")).score(batch)
    cross = CrossTokenizerTeacher(LocalTeacher(teacher, torch.device("cpu")), tok, load_tokenizer(tiny["teacher"]),
                                  log=lambda *_: None)
    cross.check_rows(examples, 8, False)
    out = cross.score(batch)
    assert out.topk_ids.shape[-1] == len(tok)
    assert bool(out.aligned[batch.loss_mask].all()) and int(out.aligned.sum()) == batch.tokens
    loss_a, grad_a = loss_and_head_grad(student, plain, batch)
    loss_b, grad_b = loss_and_head_grad(student, out, batch)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_training_with_the_students_own_tokenizer_as_the_other_one_ends_at_the_normal_weights(tiny, tmp_path, lmbda):
    """Two steps of the Trainer, off-policy and on-policy (the student's samples decoded and re-tokenised):
    the weights and the logged divergence equal the normal run's, every token aligned."""
    runs = {}
    for flag in ("same", "other"):
        cfg = TrainConfig(model=tiny["student"], teacher_model=tiny["teacher"], dataset=[tiny["data"]],
                          output_dir=str(tmp_path / flag), max_completion_length=6, learning_rate=1e-3,
                          progress_bar=False, max_steps=2, micro_batch_size=4, global_batch_size=8, lmbda=lmbda,
                          sft_alpha=0.3, teacher_tokenizer=flag)
        t = Trainer(cfg, log=lambda *_: None)
        t.train()
        runs[flag] = ({k: v.detach().clone() for k, v in t.student.state_dict().items()},
                      read_metrics(t.out / "metrics.jsonl"))
    (w_same, m_same), (w_other, m_other) = runs["same"], runs["other"]
    assert all(m["aligned_share"] == 1 for m in m_other)
    assert [m["divergence"] for m in m_other] == pytest.approx([m["divergence"] for m in m_same], rel=1e-5)
    for k in w_same:
        torch.testing.assert_close(w_other[k], w_same[k], rtol=1e-5, atol=1e-6)


def test_topk_keeps_the_largest_paired_entries_and_chunks_change_nothing(pair):
    """--gkd_logits_topk 5: at each aligned position the 5 largest of the full paired entries, same ids; the
    teacher's logits formed 3 positions at a time give the same output as all at once (to rounding)."""
    stok, ttok = load_tokenizer(pair["student"]), load_tokenizer(pair["teacher"])
    examples = load_examples([pair["data"]], stok, max_length=64, truncation_strategy="left", max_completion_length=8)
    batch = _batch(examples[:4], stok)
    inner = LocalTeacher(load_model(pair["teacher"], "float32"), torch.device("cpu"))
    full, top5 = (CrossTokenizerTeacher(inner, stok, ttok, topk=k, log=lambda *_: None) for k in (0, 5))
    for t in (full, top5):
        t.check_rows(examples, 8, False)
    a, b = full.score(batch), top5.score(batch)
    at = a.aligned & batch.loss_mask
    values, index = a.topk_logprobs[at].topk(5, -1)
    torch.testing.assert_close(b.topk_logprobs[at], values)
    assert torch.equal(b.topk_ids[at], a.topk_ids[at].gather(-1, index))
    full.chunk_logits = 3 * len(ttok)
    c = full.score(batch)
    assert torch.equal(c.topk_ids, a.topk_ids)
    torch.testing.assert_close(c.topk_logprobs, a.topk_logprobs, rtol=0, atol=1e-6)  # (matmuls of other shapes)


def test_unaligned_positions_give_no_divergence_and_no_gradient(pair):
    """With different tokenizers the unaligned positions add nothing: the loss and gradient equal those of
    the aligned positions alone (the mask cut to them)."""
    stok, ttok = load_tokenizer(pair["student"]), load_tokenizer(pair["teacher"])
    examples = load_examples([pair["data"]], stok, max_length=64, truncation_strategy="left", max_completion_length=8)
    batch = _batch(examples[:4], stok)
    student, teacher = load_model(pair["student"], "float32"), load_model(pair["teacher"], "float32")
    cross = CrossTokenizerTeacher(LocalTeacher(teacher, torch.device("cpu")), stok, ttok, log=lambda *_: None)
    cross.check_rows(examples, 8, False)
    out = cross.score(batch)
    some = int((out.aligned & batch.loss_mask).sum())
    assert 0 < some < batch.tokens  # both kinds present
    # at an aligned position: the teacher's own log-softmax (transformers' forward over its tokens), read at the
    # teacher id of each paired string and placed at the student id of the same string
    tbatch, where = cross.teacher_batch(batch)
    theirs = torch.log_softmax(teacher(**tbatch.model_inputs()).logits.float(), -1)
    pairs = vocab_pairs(stok, ttok)
    for r, (b, s0, t0, aligned, _) in enumerate(where):
        for i, j in aligned:
            assert out.topk_ids[b, s0 + i].tolist() == [s for s, _ in pairs]
            torch.testing.assert_close(out.topk_logprobs[b, s0 + i], theirs[r, t0 + j, [t for _, t in pairs]],
                                       rtol=1e-5, atol=1e-5)
            # the next tokens there are a pair: the same string, or the two end-of-sequence tokens
            assert dict(pairs)[batch.input_ids[b, s0 + i + 1].item()] == tbatch.input_ids[r, t0 + j + 1].item()
    loss, grad = loss_and_head_grad(student, out, batch)
    only = collate([e.prompt_ids for e in examples[:4]], [e.completion_ids for e in examples[:4]], stok.pad_token_id)
    only.loss_mask = batch.loss_mask & out.aligned
    loss_aligned, grad_aligned = loss_and_head_grad(student, out, only)
    # "mean" over counted positions: rescale to sums
    torch.testing.assert_close(loss * batch.tokens, loss_aligned * some, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad * batch.tokens, grad_aligned * some, rtol=1e-4, atol=1e-6)


def _cfg(pair, out, **kw):
    base = {"model": pair["student"], "teacher_model": pair["teacher"], "dataset": [pair["data"]],
            "output_dir": str(out), "max_completion_length": 8, "learning_rate": 3e-3, "lr_scheduler_type": "constant",
            "progress_bar": False, "max_steps": 6, "micro_batch_size": 4, "global_batch_size": 8, "temperature": 1.0,
            "beta": 0.5, "teacher_tokenizer": "other", "logging_steps": 1}
    base.update(kw)
    return TrainConfig(**base)


def test_a_pair_with_different_tokenizers_trains_off_and_on_policy(pair, tmp_path):
    """Off-policy (lmbda 0) the divergence falls at every one of 6 steps and the aligned share is logged; on-policy
    (lmbda 1: the student's samples, decoded and re-tokenised for the teacher) trains too."""
    lines = []
    t = Trainer(_cfg(pair, tmp_path / "off", lmbda=0.0), log=lines.append)
    t.train()
    m = read_metrics(t.out / "metrics.jsonl")
    assert any("token strings are in the teacher's vocabulary" in line for line in lines)
    div = [x["divergence"] for x in m]  # the same 8 rows every step
    assert all(b < a for a, b in pairwise(div)) and div[-1] < 0.5 * div[0]
    assert all(0 < x["aligned_share"] < 1 for x in m)
    t = Trainer(_cfg(pair, tmp_path / "on", lmbda=1.0, max_steps=2), log=lambda *_: None)
    t.train()
    m = read_metrics(t.out / "metrics.jsonl")
    assert all(x["on_policy_share"] == 1 and x["divergence"] > 0 and 0 < x["aligned_share"] <= 1 for x in m)


def test_the_same_tokenizer_without_the_flag_reports_no_aligned_share(tiny, tmp_path):
    """The normal path logs no aligned share (NaN stats, not a 1.0 that would pretend an alignment ran)."""
    t = Trainer(TrainConfig(model=tiny["student"], teacher_model=tiny["teacher"], dataset=[tiny["data"]],
                            output_dir=str(tmp_path / "o"), max_completion_length=4, max_steps=1, micro_batch_size=8,
                            global_batch_size=8, progress_bar=False, lmbda=0.0), log=lambda *_: None)
    t.train()
    assert "aligned_share" not in read_metrics(t.out / "metrics.jsonl")[0]


def test_a_teacher_without_a_chat_template_for_chat_rows_is_one_line_and_nothing_written(pair, tmp_path):
    """The student renders chat rows with its template; a teacher tokenizer without one cannot: one line,
    no output folder. Without the flag the different tokenizers are refused as before; with options it does not
    take yet (the span fallback under tensor parallelism, evaluation during training, a server on the top-K
    wire), one line too."""
    root = tmp_path / "bare"
    bare = Path(pair["teacher"]).parent / "teacher-bare"
    if not bare.exists():
        import shutil

        shutil.copytree(pair["teacher"], bare)
        cfg = json.loads((bare / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
        (bare / "chat_template.jinja").unlink(missing_ok=True)
    args = ["train", "--model", pair["student"], "--teacher_model", str(bare), "--dataset", pair["data"],
            "--output_dir", str(root), "--max_steps", "1", "--progress_bar", "false", "--max_completion_length", "16"]
    assert_one_line_error(gkd_in_process(*args, "--teacher_tokenizer", "other"), "has none; --teacher_tokenizer other")
    assert not root.exists()
    assert_one_line_error(gkd_in_process(*args), "or --teacher_tokenizer other")
    assert not root.exists()
    for extra, needle in [(["--tensor_model_parallel_size", "2", "--cross_tokenizer_fallback", "span_logprob"],
                           "--cross_tokenizer_fallback with --tensor_model_parallel_size > 1 is not supported yet"),
                          (["--eval_steps", "1", "--split_dataset_ratio", "0.25"], "is not supported yet with"),
                          (["--teacher_model", "", "--teacher_model_server", "http://127.0.0.1:9",
                            "--gkd_logits_topk", "4"], "--teacher_model_server needs --teacher_wire hidden")]:
        assert_one_line_error(gkd_in_process(*args, "--teacher_tokenizer", "other", *extra), needle)
        assert not root.exists()
    assert_one_line_error(gkd_in_process(*args, "--cross_tokenizer_fallback", "span_logprob"),
                          "--cross_tokenizer_fallback span_logprob is for --teacher_tokenizer other")
    assert not root.exists()


def test_prompt_only_rows_off_policy_need_the_teacher_to_write_which_it_does_not_yet(tiny, tmp_path):
    """Off-policy steps on prompt-only rows need teacher completions: one line, nothing written."""
    out = tmp_path / "p"
    proc = gkd_in_process("train", "--model", tiny["student"], "--teacher_model", tiny["teacher"], "--dataset",
                          tiny["prompts"], "--output_dir", str(out), "--max_completion_length", "4", "--lmbda", "0.5",
                          "--teacher_tokenizer", "other", "--progress_bar", "false")
    last = proc.stderr.strip().splitlines()[-1]  # (after the line saying how much of the vocabulary is paired)
    assert proc.returncode == 2 and last.startswith("gkd: error: --dataset has prompt-only")
    assert "does not write completions yet" in proc.stderr and not out.exists()


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("name", ["cross-fsdp2", "cross-pp2"])
def test_different_tokenizers_under_fsdp2_or_a_pipeline_equal_one_process(runs, name):
    """Two FSDP ranks (torchrun, gloo), each re-tokenising its own rows for a sharded teacher, with the span
    fallback (its student logits formed from the gathered lm_head, its gradient reduced like the rest); or two
    pipeline stages, the teacher's batches of its own tokens through its own stages: the loss at every step (off-
    and on-policy) and the final weights equal one process's; the aligned share is the same."""
    single, fsdp = assert_same_run(runs["cross-single"], runs[name])[:2]
    assert [m["aligned_share"] for m in fsdp] == pytest.approx([m["aligned_share"] for m in single])
    assert all(0 < m["aligned_share"] < 1 for m in single)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("name", ["cross-cp2", "cross-tp2"])
def test_different_tokenizers_under_context_or_tensor_parallelism_equal_one_process(runs, name):
    """CP 2: each rank of the group scores the whole rows with the teacher (its tokens are not the student's)
    and keeps its positions of the student's. TP 2: the teacher's log-softmax over its vocabulary shards, read at
    the paired ids. The loss at every step, the final weights and the aligned share equal one process's."""
    single, split = assert_same_run(runs["cross-single-aligned"], runs[name])[:2]
    assert [m["aligned_share"] for m in split] == pytest.approx([m["aligned_share"] for m in single])
    assert all(0 < m["aligned_share"] < 1 for m in single)


def test_rows_beyond_the_teachers_context_in_its_own_tokens_are_one_line(pair):
    """The teacher counts its own tokens: a context that holds the student's sequences but not the teacher's
    (its prompt template is longer) is refused, naming the row."""
    stok, ttok = load_tokenizer(pair["student"]), load_tokenizer(pair["teacher"])
    examples = load_examples([pair["data"]], stok, max_length=64, truncation_strategy="left", max_completion_length=8)
    inner = LocalTeacher(load_model(pair["teacher"], "float32"), torch.device("cpu"))
    cross = CrossTokenizerTeacher(inner, stok, ttok, log=lambda *_: None)
    longest = max(len(e.prompt_ids) + len(e.completion_ids) for e in examples)
    inner.context = longest  # every student sequence fits
    with pytest.raises(GKDError, match=r"data.jsonl:\d+: the teacher's tokens reach \d+ .* beyond its context of"):
        cross.check_rows(examples, 8, False)


def _per_row_losses(student, out, examples, tok):
    """The loss of each row alone (the batch's mask cut to it), as sums over its tokens."""
    losses = []
    for r in range(len(examples)):
        batch = _batch(examples, tok)
        batch.loss_mask[:r] = False
        batch.loss_mask[r + 1:] = False
        losses.append(loss_and_head_grad(student, out, batch)[0] * batch.tokens)
    return torch.stack(losses)


@pytest.mark.slow
def test_a_remote_teacher_with_another_tokenizer_equals_the_local_one(pair, tmp_path):
    """`gkd serve` of the teacher (its own tokenizer, declared in /v1/models) on the hidden wire: the client
    loads the declared tokenizer, retokenises the rows and pairs the vocabularies; the loss of every row, the
    span fallback's teacher log-probs and two steps of training with it (off- and on-policy) equal the local
    teacher's (1e-6 / 1e-5). A server whose tokenizer
    differs from the one it declares (here: the declared folder's tokenizer replaced after the server loaded
    its own) is refused in one line."""
    import shutil

    folder = tmp_path / "teacher"
    shutil.copytree(pair["teacher"], folder)
    proc, url = start_gkd_serve(str(folder), "--max_model_len", "64")
    try:
        stok, ttok = load_tokenizer(pair["student"]), load_tokenizer(pair["teacher"])
        examples = load_examples([pair["data"]], stok, max_length=64, truncation_strategy="left",
                                 max_completion_length=8)[:6]
        student = load_model(pair["student"], "float32")
        quiet = dict(log=lambda *_: None)
        remote = RemoteTeacher(url, 0, wire="hidden").connect()
        assert remote.tokenizer.get_vocab() == ttok.get_vocab()
        local = CrossTokenizerTeacher(LocalTeacher(load_model(pair["teacher"], "float32"), torch.device("cpu")),
                                      stok, ttok, fallback="span_logprob", **quiet)
        cross = CrossTokenizerTeacher(remote, stok, remote.tokenizer, fallback="span_logprob", **quiet)
        for t in (local, cross):
            t.check_rows(examples, 8, False)
        batch = _batch(examples, stok)
        want, got = local.score(batch), cross.score(batch)
        assert torch.equal(got.aligned, want.aligned) and torch.equal(got.topk_ids, want.topk_ids)
        at = want.aligned & batch.loss_mask
        assert 0 < int(at.sum()) < batch.tokens
        torch.testing.assert_close(got.topk_logprobs[at], want.topk_logprobs[at], rtol=0, atol=1e-6)
        assert torch.equal(got.spans.index, want.spans.index) and len(want.spans.teacher_logprobs) > 0
        torch.testing.assert_close(got.spans.teacher_logprobs, want.spans.teacher_logprobs, rtol=1e-6, atol=1e-5)
        rows_want = _per_row_losses(student, want, examples, stok)
        rows_got = _per_row_losses(student, got, examples, stok)
        assert bool(rows_want.gt(0).all())
        torch.testing.assert_close(rows_got, rows_want, rtol=0, atol=1e-6)
        # the server's max_model_len (less the position it keeps free) bounds the teacher's tokens of each row
        short = RemoteTeacher(url, 0, wire="hidden").connect()
        short.max_model_len = 21
        with pytest.raises(GKDError, match=r"data.jsonl:\d+: the teacher's tokens reach \d+ .* context of 20 positions"):
            CrossTokenizerTeacher(short, stok, short.tokenizer, **quiet).check_rows(examples, 8, False)
        # the whole path (config, build, Trainer), off- and on-policy
        runs = {}
        for name, kw in {"local": {}, "remote": dict(teacher_model="", teacher_model_server=url,
                                                     teacher_wire="hidden")}.items():
            t = Trainer(_cfg(pair, tmp_path / name, max_steps=2, lmbda=0.5, cross_tokenizer_fallback="span_logprob",
                             **kw), **quiet)
            t.train()
            runs[name] = read_metrics(t.out / "metrics.jsonl")
        assert [m["on_policy_share"] for m in runs["remote"]] == [0, 1]  # (the seed's lmbda draws)
        for key in ("divergence", "aligned_share", "loss", "on_policy_share"):
            assert [m[key] for m in runs["remote"]] == pytest.approx([m[key] for m in runs["local"]], rel=1e-5)
        # the declared tokenizer is no longer the server's
        for f in folder.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
                f.unlink()
        for f in Path(pair["student"]).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
                shutil.copy(f, folder / f.name)
        with pytest.raises(GKDError, match=r"^teacher server .* as .*, the tokenizer it declares \(.*teacher\) as "
                                           r".*; the server's tokenizer differs from the one it declares$"):
            RemoteTeacher(url, 0, wire="hidden").connect()
    finally:
        stop(proc)


def _hello_world(pair, tmp_path):
    """One row whose completion is 'hello world' (the hand-worked cut above), its teacher and batch."""
    path = tmp_path / "hello.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello world"}]}) + "\n")
    stok, ttok = load_tokenizer(pair["student"]), load_tokenizer(pair["teacher"])
    examples = load_examples([str(path)], stok, max_length=64, truncation_strategy="left", max_completion_length=8)
    return stok, ttok, examples, _batch(examples, stok)


def test_span_fallback_equals_a_float64_reference_on_hand_worked_spans(pair, tmp_path):
    """--cross_tokenizer_fallback span_logprob on 'hello world': the unaligned spans are 'hello' (student token
    0; teacher he|ll|o) and 'ld' (student l|d; teacher ld). The term, 1/2 sum over spans of (log p_s(span) -
    log p_t(span))^2, and its lm_head gradient equal a float64 reference built from both models' own forwards
    (transformers' logits, log-softmax, the tokens picked by hand)."""
    stok, ttok, examples, batch = _hello_world(pair, tmp_path)
    student, teacher = load_model(pair["student"], "float32"), load_model(pair["teacher"], "float32")
    cross = CrossTokenizerTeacher(LocalTeacher(teacher, torch.device("cpu")), stok, ttok, log=lambda *_: None,
                                  fallback="span_logprob")
    cross.check_rows(examples, 8, False)
    out = cross.score(batch)
    s0 = len(examples[0].prompt_ids) - 1  # the position predicting the completion's first token
    assert out.spans.index[0, s0:s0 + 6].tolist() == [0, -1, -1, 1, 1, -1]  # hello | Ġw | or | l d | eos
    from gkd.models import adapter_for
    from gkd.teacher.cross_tokenizer import span_divergence

    adapter = adapter_for(student)
    hidden = adapter.final_hidden(student, batch.model_inputs())
    got = span_divergence(hidden, adapter.logit_head(student), out.spans, batch.loss_mask)
    got.backward()
    grad = adapter.lm_head(student).grad.clone()
    # the reference: float64 copies, whole-sequence forwards, tokens picked by hand
    s64, t64 = load_model(pair["student"]).double(), load_model(pair["teacher"]).double()
    mine = torch.log_softmax(s64(input_ids=batch.input_ids).logits[0], -1)
    sid = batch.input_ids[0].tolist()
    ls = [mine[s0, sid[s0 + 1]], mine[s0 + 3, sid[s0 + 4]] + mine[s0 + 4, sid[s0 + 5]]]
    prompt_t = ttok(ttok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                             tokenize=False), add_special_tokens=False)["input_ids"]
    tid = prompt_t + ttok("hello world", add_special_tokens=False)["input_ids"] + [ttok.eos_token_id]
    assert ttok.convert_ids_to_tokens(tid[len(prompt_t):]) == ["he", "ll", "o", "Ġw", "or", "ld", "</s>"]
    theirs = torch.log_softmax(t64(input_ids=torch.tensor([tid])).logits[0].detach(), -1)
    t0 = len(prompt_t) - 1
    lt = [sum(theirs[t0 + j, tid[t0 + j + 1]] for j in range(3)), theirs[t0 + 5, tid[t0 + 6]]]
    want = 0.5 * sum((a - b) ** 2 for a, b in zip(ls, lt))
    want.backward()
    torch.testing.assert_close(out.spans.teacher_logprobs, torch.stack(lt), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.double(), s64.get_output_embeddings().weight.grad, rtol=1e-4, atol=1e-6)
    assert float(want.detach()) > 1e-3  # not a trivially zero comparison


def test_span_fallback_trains_a_pair_and_adds_its_term_to_the_divergence(pair, tmp_path):
    """Off-policy, 6 steps on the same rows with --cross_tokenizer_fallback span_logprob: the divergence (the
    token-level term + the span term over the step's tokens) falls at every step; at step 1 (the same weights)
    it exceeds the run without the fallback by the span term."""
    div = {}
    for fallback in ("none", "span_logprob"):
        t = Trainer(_cfg(pair, tmp_path / fallback, lmbda=0.0, cross_tokenizer_fallback=fallback), log=lambda *_: None)
        t.train()
        div[fallback] = [x["divergence"] for x in read_metrics(t.out / "metrics.jsonl")]
    with_spans = div["span_logprob"]
    assert all(b < a for a, b in pairwise(with_spans)) and with_spans[-1] < 0.6 * with_spans[0]
    assert with_spans[0] > 1.5 * div["none"][0]  # the span term is there (and larger than the token-level one)
