"""Several teachers in one run: rows routed per teacher equal each teacher alone on its rows, a mixture
equals a naive float64 mixture (full vocabulary, and top-k over the union with pads), local + remote,
offload, the teacher cache, per-teacher metrics, and the one-line refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from gkd import losses
from gkd.config import TrainConfig
from gkd.data.batch import collate
from gkd.data.rows import load_examples
from gkd.losses import fused_linear_gkd_loss, mixture_topk
from gkd.models import adapter_for, eos_ids, load_model, load_tokenizer
from gkd.teacher.local import LocalTeacher
from gkd.teacher.multi import MixtureTeacher, RoutedTeacher
from gkd.train.step import STATS, TEACHER_STATS, LossArgs, MicroBatch, forward_backward
from helpers import (API_KEY, assert_one_line_error, assert_same_run, declare, gkd_in_process, set_arg,
                     start_gkd_serve, stop, train_args)

T = 1.7  # a loss temperature != 1


@pytest.fixture(scope="module")
def two(tiny, tmp_path_factory):
    """The tiny student, its teacher (a) and a second, differently seeded teacher (b) of the same vocabulary."""
    from tiny import write_model

    root = tmp_path_factory.mktemp("two")
    return {**tiny, "a": tiny["teacher"], "b": str(write_model(root / "b", layers=2, seed=7))}


@pytest.fixture(scope="module")
def rows(two):
    tok = load_tokenizer(two["student"])
    return tok, load_examples([two["data"]], tok, max_length=64, truncation_strategy="left", max_completion_length=16)[:6]


def _teachers(two, topk=0):
    cpu = torch.device("cpu")
    return {n: LocalTeacher(load_model(two[n]), cpu, topk=topk) for n in ("a", "b")}


# --- the mixture in the loss --------------------------------------------------------------------------


def _naive_mixture(h, W, hts, Wts, ws, beta, topk):
    """Generalized JSD to m = sum_i w_i softmax(z_i / T) in float64, by definition: top-k teachers each
    renormalised over their own K (tempered), the student over the union of their ids."""
    ws = [w / sum(ws) for w in ws]
    zs = (h @ W.T) / T
    N, V = zs.shape
    if topk is None:
        m = torch.logsumexp(torch.stack([torch.log_softmax((x @ y.T) / T, -1) + math.log(w)
                                         for x, y, w in zip(hts, Wts, ws)]), 0)
        keep = torch.ones(N, V, dtype=torch.bool)
    else:
        m = torch.full((N, V), -math.inf, dtype=torch.float64)
        for x, y, w, k in zip(hts, Wts, ws, topk):
            val, idx = torch.log_softmax(x @ y.T, -1).topk(k, -1)
            t = val / T
            m = torch.logaddexp(m, torch.full_like(m, -math.inf).scatter(-1, idx, t - torch.logsumexp(t, -1, True) + math.log(w)))
        keep = torch.isfinite(m)
    s = zs - torch.logsumexp(zs.masked_fill(~keep, -math.inf), -1, keepdim=True)
    m = torch.where(keep, m, torch.zeros_like(m))  # (outside the union nothing counts: keep it finite)
    p, q = s.exp() * keep, m.exp() * keep

    def kl(pa, a, b):  # sum over the kept entries of pa (a - b)
        return torch.where(keep, pa * (a - b), torch.zeros_like(a)).sum(-1)

    if beta == 0:
        L = kl(q, m, s)
    elif beta == 1:
        L = kl(p, s, m)
    else:
        mm = torch.log(torch.where(keep, (1 - beta) * p + beta * q, torch.ones_like(p)))
        L = beta * kl(q, m, mm) + (1 - beta) * kl(p, s, mm)
    return L.sum()


@pytest.mark.parametrize("topk", [None, (3, 5)], ids=["full", "topk-union"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_mixture_equals_a_naive_float64_mixture(topk, beta, row_blocks):
    """Loss and gradients (hidden states, head) of the fused mixture equal the definition's; the top-k
    union has pads (ids both teachers give), which count on neither side."""
    g = torch.Generator().manual_seed(0)
    N, H, V = 9, 8, 20
    h = torch.randn(N, H, dtype=torch.float64, generator=g).requires_grad_()
    W = torch.randn(V, H, dtype=torch.float64, generator=g).requires_grad_()
    hts = [torch.randn(N, H, dtype=torch.float64, generator=g) for _ in range(2)]
    Wts = [torch.randn(V, H, dtype=torch.float64, generator=g) for _ in range(2)]
    hts[1][:4] = hts[0][:4]  # the same teacher distribution on some rows: many shared top-k ids, many pads
    Wts[1] = Wts[0] + 0.3 * torch.randn(V, H, dtype=torch.float64, generator=g)
    want = _naive_mixture(h, W, hts, Wts, [1.0, 3.0], beta, topk)
    want_h, want_w = torch.autograd.grad(want, (h, W))
    members = [dict(teacher_hidden=x, teacher_lm_head_weight=y, teacher_topk=None if topk is None else k)
               for x, y, k in zip(hts, Wts, topk or (None, None))]
    out = fused_linear_gkd_loss(h, W, teacher_mixture=members, teacher_mixture_weights=[1.0, 3.0], beta=beta,
                                temperature=T, reduction="sum", chunk_size=4)
    got_h, got_w = torch.autograd.grad(out.loss, (h, W))
    torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_h, want_h, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(got_w, want_w, rtol=1e-9, atol=1e-10)
    if topk is not None:
        ids, _ = mixture_topk([torch.log_softmax(x @ y.T, -1).topk(k, -1)[1] for x, y, k in zip(hts, Wts, topk)],
                              [torch.log_softmax(x @ y.T, -1).topk(k, -1)[0] for x, y, k in zip(hts, Wts, topk)],
                              [0.25, 0.75], T)
        assert bool((ids < 0).any())  # the union had pads


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_pads_count_on_neither_side(beta):
    """Top-k entries marked absent change neither the loss nor the other entries' gradient, get a gradient of
    exactly 0 and no NaN, with logits far apart (where e^d would overflow at a pad set to -inf or -1e4)."""
    g = torch.Generator().manual_seed(1)
    zk = torch.randn(5, 4, dtype=torch.float64, generator=g) * 50
    tk = torch.log_softmax(torch.randn(5, 4, dtype=torch.float64, generator=g) * 50, -1)
    pad = torch.tensor([[False, False, True, True]] * 5)
    pad[0, 1] = False
    zk_pad = zk.clone()
    zk_pad[pad] = 3e4  # whatever the student's logit there is
    tk_pad = tk.clone()
    tk_pad[pad] = -math.inf
    loss, grad = losses._topk_terms(zk_pad, tk_pad, beta, T, True, pad)
    for r in range(5):
        keep = ~pad[r]
        want, want_g = losses._topk_terms(zk[r:r + 1, keep], tk[r:r + 1, keep], beta, T, True)
        torch.testing.assert_close(loss[r:r + 1], want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad[r:r + 1, keep], want_g, rtol=1e-12, atol=1e-12)
    assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(grad).all())
    assert bool((grad[pad] == 0).all())


def test_mixture_weights_must_match_and_be_valid():
    h, W = torch.randn(3, 4), torch.randn(6, 4)
    one = dict(teacher_topk_ids=torch.zeros(3, 2, dtype=torch.long), teacher_topk_logprobs=torch.zeros(3, 2))
    for weights in ([1.0], [1.0, -1.0], [0.0, 0.0]):
        with pytest.raises(Exception, match="teacher_mixture_weights"):
            fused_linear_gkd_loss(h, W, teacher_mixture=[one, one], teacher_mixture_weights=weights)


# --- routed rows in a training step ------------------------------------------------------------------


def _step(student, teacher, batches, normaliser, beta=0.5):
    """forward_backward's STATS row (+ per-teacher stats) and the head's gradient."""
    student.zero_grad()
    args = LossArgs(beta=beta, temperature=T, sft_alpha=0.3, chunk_size=5)
    row = forward_backward(batches, student, adapter_for(student), teacher, args, normaliser, skip_empty=True)
    return row, adapter_for(student).lm_head(student).grad.clone()


@pytest.mark.parametrize("pack", [None, 64], ids=["rows", "packed"])
@pytest.mark.parametrize("topk", [0, 4])
def test_routed_rows_equal_each_teacher_alone_on_its_rows(two, rows, pack, topk):
    """Rows routed to a and b in one micro-batch (packed: sequences of both teachers share rows) give per row
    the loss each teacher alone gives that row, within 1e-6, and their sum's gradient; per-teacher stats
    are each teacher's own rows'."""
    tok, examples = rows
    student = load_model(two["student"])
    teachers = _teachers(two, topk)
    routed = RoutedTeacher(teachers)
    route = ["a", "b", "b", "a", "b", "a"]
    done = [e.completion_ids for e in examples]
    n = float(sum(len(c) for c in done))
    batch = collate([e.prompt_ids for e in examples], done, tok.pad_token_id, pack=pack)
    row, grad = _step(student, routed, [MicroBatch(batch, [False] * 6, route)], n)
    per_teacher = row[len(STATS):].view(2, len(TEACHER_STATS))
    total, grad_sum = 0.0, torch.zeros_like(grad)
    sums = {"a": torch.zeros(len(STATS), dtype=torch.float64), "b": torch.zeros(len(STATS), dtype=torch.float64)}
    for i, (e, name) in enumerate(zip(examples, route)):
        alone = collate([e.prompt_ids], [e.completion_ids], tok.pad_token_id)
        r, g = _step(student, teachers[name], [MicroBatch(alone, [False])], n)
        # the routed step's per-row loss: its row alone in a micro-batch routed the same way
        r_routed, _ = _step(student, routed, [MicroBatch(alone, [False], [name])], n)
        assert abs(float(r_routed[0]) - float(r[0])) < 1e-6
        total += float(r[0])
        grad_sum += g
        sums[name] += r
    assert abs(float(row[0]) - total) < 1e-6
    torch.testing.assert_close(grad, grad_sum, rtol=1e-5, atol=1e-6)
    for k, name in enumerate(("a", "b")):
        assert abs(float(per_teacher[k, 0]) - float(sums[name][1])) < 1e-5  # divergence
        assert int(per_teacher[k, 1]) == int(sums[name][3])  # top-1 agreement
        assert int(per_teacher[k, 2]) == sum(len(e.completion_ids) for e, r in zip(examples, route) if r == name)


def test_a_teacher_with_no_rows_is_not_run(two, rows):
    tok, examples = rows
    student = load_model(two["student"])
    teachers = _teachers(two)
    calls = {"a": 0, "b": 0}
    for name, t in teachers.items():
        real = t.score

        def counted(batch, split=None, name=name, real=real):
            calls[name] += 1
            return real(batch, split)

        t.score = counted
    batch = collate([e.prompt_ids for e in examples[:2]], [e.completion_ids for e in examples[:2]], tok.pad_token_id)
    _step(student, RoutedTeacher(teachers), [MicroBatch(batch, [False, False], ["a", "a"])], 8.0)
    assert calls == {"a": 1, "b": 0}


# --- local + remote, offload, cache, and a whole run -------------------------------------------------


@pytest.mark.slow
def test_local_and_remote_teachers_equal_two_local_ones(two, rows):
    """b served by `gkd serve` (top-K) beside a local a: routed and mixed steps equal those with b local."""
    from gkd.teacher.remote import RemoteTeacher

    tok, examples = rows
    proc, url = start_gkd_serve(two["b"], "--max_model_len", "128", key=API_KEY)
    try:
        student = load_model(two["student"])
        local = _teachers(two, topk=4)
        both = {"a": local["a"], "b": RemoteTeacher(url, 4, api_key=API_KEY).connect(tok)}
        batch = collate([e.prompt_ids for e in examples], [e.completion_ids for e in examples], tok.pad_token_id)
        mb = [MicroBatch(batch, [False] * 6, ["a", "b", "b", "a", "b", "a"])]
        for make in (RoutedTeacher, lambda ts: MixtureTeacher(ts, [0.4, 0.6])):
            want = _step(student, make(local), mb, 20.0)
            got = _step(student, make(both), mb, 20.0)
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
        both["b"].close()
    finally:
        stop(proc)


def _routed_data(two, path: Path) -> str:
    """The tiny dataset with a 'teacher' column naming a on every other row (the rest go by --teacher_route)."""
    lines = Path(two["data"]).read_text().splitlines()
    rows = [dict(json.loads(line), **({"teacher": "a"} if i % 2 == 0 else {})) for i, line in enumerate(lines)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_two_routed_teachers_train_with_offload_and_cache_and_log_each(two, tmp_path):
    """`gkd train` with a (local, offloaded: a no-op on CPU, the path runs) routed by the column and b by
    --teacher_route, each with its own top-K and a teacher cache: per-teacher metrics in the log, cache
    entries written."""
    data = _routed_data(two, tmp_path / "routed.jsonl")
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = train_args(two, out, "--teacher_route", f"{data}=b", "--gkd_logits_topk", "4,6",
                      "--offload_teacher_model", "true", "--teacher_cache", str(cache), "--lmbda", "0")
    args[args.index("--teacher_model") + 1] = f"a={two['a']},b={two['b']}"
    args[args.index("--dataset") + 1] = data
    proc = gkd_in_process(*set_arg(set_arg(args, "--max_steps", "2"), "--save_steps", "0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = metrics[-1]
    for name in ("a", "b"):
        assert last[f"tokens/{name}"] > 0 and last[f"divergence/{name}"] >= 0
        assert 0 <= last[f"top1_agreement/{name}"] <= 1
    assert len(list((cache / "entries").rglob("*.json"))) > 0
    # the same rows again: each teacher's cache gives them all back, none is scored anew
    again = gkd_in_process(*set_arg(set_arg(set_arg(args, "--max_steps", "2"), "--save_steps", "0"), "--output_dir",
                                    str(tmp_path / "again")))
    assert again.returncode == 0, again.stderr[-3000:]
    reused = [line for line in again.stderr.splitlines() if "teacher cache" in line and "rows reused" in line]
    assert len(reused) == 2 and all(", 0 scored" in line and " 0 rows reused" not in line for line in reused), reused


@pytest.mark.parametrize("kind", ["routed", "mixture"])
def test_several_teachers_evaluate_the_student_each_on_its_rows(two, tmp_path, kind):
    """--eval_steps with several teachers: eval_NAME_ metrics per teacher, each what gkd.evaluate gives for the
    final student against that teacher on its held-out rows (routed: the rows routed to it; a mixture's
    members: every row)."""
    from gkd.evaluate import evaluate

    data = _routed_data(two, tmp_path / "routed.jsonl") if kind == "routed" else two["data"]
    out = tmp_path / "out"
    how = ["--teacher_route", f"{data}=b"] if kind == "routed" else ["--teacher_mixture", "1,3"]
    args = train_args(two, out, *how, "--lmbda", "0", "--val_dataset", data, "--eval_steps", "2")
    args[args.index("--teacher_model") + 1] = f"a={two['a']},b={two['b']}"
    args[args.index("--dataset") + 1] = data
    proc = gkd_in_process(*set_arg(set_arg(args, "--max_steps", "2"), "--save_steps", "0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in logged if "eval_a_divergence" in m]
    assert [m["step"] for m in evals] == [2]
    tok = load_tokenizer(two["student"])
    val = load_examples([data], tok, max_length=TrainConfig.max_length, truncation_strategy="left",
                        max_completion_length=6)
    student = load_model(str(out / "final")).eval()
    for name in ("a", "b"):
        mine = [e for e in val if kind == "mixture" or (e.teacher or "b") == name]
        want = evaluate(student, load_model(two[name]).eval(), [e.prompt_ids for e in mine],
                        eos_ids=eos_ids(tok, student), pad_id=tok.pad_token_id, beta=0.5, temperature=TrainConfig.temperature,
                        max_new_tokens=6, device=torch.device("cpu"), batch_size=8).metrics
        for key in ("divergence", "top1_agreement", "student_ppl_on_teacher", "teacher_logprob_of_student"):
            assert abs(evals[0][f"eval_{name}_{key}"] - want[key]) <= 1e-5, (name, key, evals[0], want)


# --- one-line refusals, nothing written --------------------------------------------------------------


def _refused(two, tmp_path, needle, *extra, teachers=None, data=None):
    out = tmp_path / "out"
    args = train_args(two, out, *extra)
    args[args.index("--teacher_model") + 1] = teachers or f"a={two['a']},b={two['b']}"
    if data:
        args[args.index("--dataset") + 1] = data
    proc = gkd_in_process(*args)
    assert_one_line_error(proc, needle)
    assert not out.exists() or not any(out.iterdir())


def test_a_route_naming_no_teacher_is_one_line(two, tmp_path):
    data = tmp_path / "bad.jsonl"
    line = json.loads(Path(two["data"]).read_text().splitlines()[0])
    data.write_text(json.dumps(dict(line, teacher="nobody")) + "\n")
    _refused(two, tmp_path, "teacher 'nobody' is none of the run's teachers", "--teacher_route", "*=a", data=str(data))
    _refused(two, tmp_path, "no teacher is named 'c'", "--teacher_route", "*=c")
    _refused(two, tmp_path, "names no teacher")  # several teachers, rows without a route


def test_bad_mixtures_are_one_line(two, tmp_path):
    from tiny import write_model

    other = write_model(tmp_path / "v128", layers=1, vocab_size=128, seed=3)
    _refused(two, tmp_path, "vocabularies differ", "--teacher_mixture", "1,1", teachers=f"a={two['a']},c={other}")
    _refused(two, tmp_path, "2 weight(s) for 3 teacher(s)", "--teacher_mixture", "1,1",
             teachers=f"a={two['a']},b={two['b']},c={two['a']}")
    _refused(two, tmp_path, ">= 0 and not all 0", "--teacher_mixture", "1,-1")
    _refused(two, tmp_path, "3 values for 2 teacher(s)", "--gkd_logits_topk", "1,2,3", "--teacher_route", "*=a")


def _two_teachers(c) -> dict:
    """The tiny models with a second teacher (b) and rows routed a, a, b, a, b, ... (made once per session)."""
    def make():
        from tiny import write_model

        tiny = c.models("tiny")
        root = c.root / "two-teachers"
        b = write_model(root / "b", layers=2, seed=7)
        lines = Path(tiny["data"]).read_text().splitlines()
        data = root / "routed.jsonl"
        data.write_text("".join(json.dumps(dict(json.loads(line), teacher="b" if i % 3 == 2 else "a")) + "\n"
                                for i, line in enumerate(lines)))
        return {**tiny, "teacher": f"a={tiny['teacher']},b={b}", "routed": str(data)}

    return c.once("two-teachers", make)


def _several(*flags):
    """Rows routed to the two teachers, or (with --teacher_mixture) the plain rows against their mixture."""
    def args(c, out):
        models = _two_teachers(c)
        return train_args(models if "--teacher_mixture" in flags else {**models, "data": models["routed"]}, out,
                          *flags)

    return args


LAYOUTS = {"cp2": ["--context_parallel_size", "2"], "pp2": ["--pipeline_model_parallel_size", "2"]}
for _kind, _flags in (("routed", []), ("mixture", ["--teacher_mixture", "1,3"])):
    declare(f"{_kind}-single", 1, _several(*_flags))
    for _layout, _more in LAYOUTS.items():
        declare(f"{_kind}-{_layout}", 2, _several(*_flags, *_more))


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", ["routed", "mixture"])
def test_several_teachers_under_context_or_pipeline_parallelism_equal_one_process(runs, kind, layout):
    """Context or pipeline parallelism 2 (torchrun, gloo): rows routed to two teachers or scored against their
    mixture give one process's loss at every step (off- and on-policy), final weights and, routed, each teacher's
    divergence and tokens. Under CP each teacher scores the micro-batch under the split (its sequences' positions
    counting); under PP every teacher scores every micro-batch through its own stages and the last stage forms
    each teacher's group."""
    single, other = assert_same_run(runs[f"{kind}-single"], runs[f"{kind}-{layout}"])[:2]
    if kind == "routed":
        for a, b in zip(single, other):
            assert a["tokens/a"] > 0 and a["tokens/b"] > 0
            for key in ("divergence/a", "divergence/b", "tokens/a", "tokens/b"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (key, a["step"])


def test_a_mixture_trains(two, tmp_path):
    """`gkd train --teacher_mixture 1,3` over two full-vocabulary teachers runs its steps (no routing needed)."""
    out = tmp_path / "out"
    args = train_args(two, out, "--teacher_mixture", "1,3", "--lmbda", "0")
    args[args.index("--teacher_model") + 1] = f"a={two['a']},b={two['b']}"
    proc = gkd_in_process(*set_arg(set_arg(args, "--max_steps", "1"), "--save_steps", "0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert math.isfinite(json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["divergence"])


def test_one_teacher_leaves_a_teacher_column_unused(two, tmp_path):
    """One teacher is today's run: a 'teacher' column is only warned about, whatever it says."""
    data = tmp_path / "named.jsonl"
    data.write_text("".join(json.dumps(dict(json.loads(line), teacher="gpt")) + "\n"
                            for line in Path(two["data"]).read_text().splitlines()))
    out = tmp_path / "out"
    args = set_arg(set_arg(set_arg(train_args(two, out, "--lmbda", "0"), "--dataset", str(data)), "--max_steps", "1"),
                   "--save_steps", "0")
    proc = gkd_in_process(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "column 'teacher'" in proc.stderr and "is not used" in proc.stderr


@pytest.mark.slow
@pytest.mark.dist
def test_routed_teachers_over_two_processes_equal_one(two, tmp_path):
    """Two processes (student and teachers sharded over them) give the one-process run's losses and
    per-teacher metrics, with micro-batches where a teacher has rows on one rank and none on the other (it
    still joins the sharded forward there: without that the run hangs)."""
    from helpers import gkd_subprocess

    lines = Path(two["data"]).read_text().splitlines()
    data = tmp_path / "uneven.jsonl"
    data.write_text("".join(json.dumps(dict(json.loads(line), teacher="b" if i % 5 == 0 else "a")) + "\n"
                            for i, line in enumerate(lines)))
    logs = []
    for n in (1, 2):
        args = train_args(two, tmp_path / f"out{n}", "--nproc_per_node", str(n), "--distributed_timeout", "120")
        args = set_arg(set_arg(set_arg(args, "--dataset", str(data)), "--max_steps", "2"), "--save_steps", "0")
        args = set_arg(set_arg(args, "--teacher_model", f"a={two['a']},b={two['b']}"), "--micro_batch_size", "1")
        proc = gkd_subprocess(*args, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs.append([json.loads(line) for line in (tmp_path / f"out{n}" / "metrics.jsonl").read_text().splitlines()])
    for one, two_procs in zip(*logs, strict=True):
        for key in ("loss", "divergence/a", "divergence/b", "tokens/a", "tokens/b"):
            assert abs(one[key] - two_procs[key]) < 1e-5, (key, one[key], two_procs[key])


def test_teacher_lists_from_flags_and_yaml_are_the_same(tmp_path):
    """`--teacher_model a=X,b=Y --gkd_logits_topk 4,6` and YAML lists give the same teachers; one teacher's
    flags and YAML are as they were (named by its source, one K)."""
    from gkd.config import TrainConfig, build_config, parser_for, teacher_specs

    parser = parser_for(TrainConfig, "gkd train", "")
    flags = vars(parser.parse_args(["--model", "m", "--dataset", "d", "--teacher_model", "a=/x/a,b=/x/b",
                                    "--gkd_logits_topk", "4,6"]))
    flags.pop("config")
    yaml = tmp_path / "c.yaml"
    yaml.write_text("teacher_model: [a=/x/a, b=/x/b]\ngkd_logits_topk: [4, 6]\n")
    from_flags = build_config(TrainConfig, flags).validate()
    from_yaml = build_config(TrainConfig, {"model": "m", "dataset": ["d"]}, str(yaml)).validate()
    assert teacher_specs(from_flags) == teacher_specs(from_yaml)
    assert [(s.name, s.source, s.topk) for s in teacher_specs(from_yaml)] == [("a", "/x/a", 4), ("b", "/x/b", 6)]
    yaml.write_text("teacher_model: /x/a\ngkd_logits_topk: 8\n")
    one = build_config(TrainConfig, {"model": "m", "dataset": ["d"]}, str(yaml)).validate()
    assert one.gkd_logits_topk == 8 and [(s.name, s.topk) for s in teacher_specs(one)] == [("/x/a", 8)]
