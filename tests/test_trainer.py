"""The single-process trainer on tiny random models."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gkd.config import TrainConfig
from gkd.data.order import lmbda_draw
from gkd.train.budget import factor
from gkd.train.metrics import read_metrics
from gkd.train.trainer import Trainer
from helpers import ENV, assert_one_line_error, final_weights, gkd_in_process, gkd_subprocess, set_arg


def cfg_for(tiny, out, **kw):
    base = dict(model=tiny["student"], teacher_model=tiny["teacher"], dataset=[tiny["data"]], output_dir=str(out),
                max_completion_length=6, learning_rate=1e-3, lr_scheduler_type="constant", progress_bar=False,
                max_steps=2, micro_batch_size=8, global_batch_size=8, temperature=0.9, sft_alpha=0.3)
    base.update(kw)
    return TrainConfig(**base)


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.student.state_dict().items()}


def test_the_logged_learning_rate_is_the_one_each_step_trained_with(tiny, tmp_path):
    """metrics.jsonl's learning_rate at step N is the rate step N's update used (a linear decay over 2 steps:
    1e-3, then 5e-4), not the one the scheduler moved on to after it (5e-4, then 0)."""
    t = Trainer(cfg_for(tiny, tmp_path / "o", lr_scheduler_type="linear"), log=lambda *_: None)
    t.train()
    assert [m["learning_rate"] for m in read_metrics(t.out / "metrics.jsonl")] == pytest.approx([1e-3, 5e-4])


def test_a_time_budget_ends_the_run_and_sets_each_steps_rate_by_the_time_used(tiny, tmp_path):
    """--max_train_seconds: the run trains until its clock passes the budget (the step before it is under it)
    and every step's logged rate is the cosine-with-warm-up at the share of the budget used when it started;
    the last checkpoint carries the clock for a resume."""
    budget = 2.0
    t = Trainer(cfg_for(tiny, tmp_path / "o", max_steps=0, max_train_seconds=budget, lr_scheduler_type="cosine",
                        warmup_ratio=0.2, micro_batch_size=4, global_batch_size=4, max_completion_length=2),
                log=lambda *_: None)
    t.train()
    logged = read_metrics(t.out / "metrics.jsonl")
    clock = [m["train_seconds"] for m in logged]
    assert len(logged) >= 3 and clock[-1] >= budget > clock[-2] and clock == sorted(clock)
    started = [0.0] + clock[:-1]
    expected = [1e-3 * factor("cosine", 0.2, min(1.0, s / budget)) for s in started]
    assert [m["learning_rate"] for m in logged] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert logged[0]["learning_rate"] == 0.0 and max(expected) > 5e-4  # it warms up, then decays
    info = json.loads(next((t.out).glob("checkpoint-*/gkd_checkpoint.json")).read_text())
    assert info["step"] == len(logged) and info["train_seconds"] == pytest.approx(clock[-1], abs=1e-3)


def test_a_step_bound_ends_a_timed_run_first_and_the_schedule_follows_the_larger_share(tiny, tmp_path):
    t = Trainer(cfg_for(tiny, tmp_path / "o", max_steps=3, max_train_seconds=3600.0, lr_scheduler_type="linear"),
                log=lambda *_: None)
    t.train()
    logged = read_metrics(t.out / "metrics.jsonl")
    assert len(logged) == 3  # the steps' share (1/3 a step) outruns the time's
    assert [m["learning_rate"] for m in logged] == pytest.approx([1e-3, 1e-3 * 2 / 3, 1e-3 / 3], rel=1e-3)


def test_budget_factor_follows_its_definition():
    for p in (0.0, 0.05, 0.1, 0.3, 0.55, 0.99, 1.0):
        warm = p / 0.1 if p < 0.1 else None
        rest = (p - 0.1) / 0.9
        assert factor("cosine", 0.1, p) == pytest.approx(warm if warm is not None else 0.5 * (1 + math.cos(math.pi * rest)))
        assert factor("linear", 0.1, p) == pytest.approx(warm if warm is not None else 1 - rest)
        assert factor("constant", 0.1, p) == pytest.approx(warm if warm is not None else 1.0)


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_micro_batch_split_gives_the_same_update(tiny, tmp_path, lmbda):
    runs = {}
    for mbs in (8, 2):
        t = Trainer(cfg_for(tiny, tmp_path / f"m{mbs}", micro_batch_size=mbs, lmbda=lmbda), log=lambda *_: None)
        t.train()
        runs[mbs] = (weights(t), read_metrics(t.out / "metrics.jsonl"))
    (w8, m8), (w2, m2) = runs[8], runs[2]
    for k in w8:
        torch.testing.assert_close(w2[k], w8[k], rtol=0, atol=1e-5, msg=k)
    for a, b in zip(m8, m2):
        assert abs(a["loss"] - b["loss"]) <= 1e-5
        assert a["on_policy_share"] == b["on_policy_share"] == lmbda
    before = Trainer(cfg_for(tiny, tmp_path / "init", max_steps=1), log=lambda *_: None)
    assert any((before.student.state_dict()[k] - w8[k]).abs().max() > 1e-4 for k in w8), "training changed nothing"


def test_lmbda_zero_never_generates_and_one_always_does(tiny, tmp_path, monkeypatch):
    t = Trainer(cfg_for(tiny, tmp_path / "off", lmbda=0.0, max_steps=3), log=lambda *_: None)
    monkeypatch.setattr(t.sampler, "generate", lambda *a, **k: pytest.fail("generated with lmbda 0"))
    t.train()
    assert all(m["on_policy_share"] == 0.0 for m in read_metrics(t.out / "metrics.jsonl"))
    assert not any("policy_version" in m or "staleness" in m for m in read_metrics(t.out / "metrics.jsonl"))
    calls = []
    t = Trainer(cfg_for(tiny, tmp_path / "on", lmbda=1.0, max_steps=3), log=lambda *_: None)
    real = t.sampler.generate
    monkeypatch.setattr(t.sampler, "generate", lambda *a: calls.append(1) or real(*a))  # (model, prompts, rows)
    t.train()
    assert len(calls) == 3
    metrics = read_metrics(t.out / "metrics.jsonl")
    assert all(m["on_policy_share"] == 1.0 for m in metrics)
    # exact on-policy (no --async_generation): step s (logged as s + 1) samples from the weights after s steps
    assert [(m["policy_version"], m["staleness"]) for m in metrics] == [(0, 0), (1, 0), (2, 0)]


def test_loss_temperature_sets_the_divergence_and_not_sampling(tiny, tmp_path):
    """--loss_temperature tempers the divergence (the step equals the formula at 1.3, loss and gradients),
    --temperature only sampling. The tiny models' logits are nearly uniform (std 0.11 over 96 tokens), where the
    temperature barely matters, so both heads are scaled by 10 (logit std 1.1): the loss at 0.5 is then 21 % above
    the one at 1.3, the untempered one 5 %, against the 2e-5 the step is held to."""
    from gkd.models import load_model
    from naive import assert_step_matches, naive_step

    t = Trainer(cfg_for(tiny, tmp_path / "lt", lmbda=0.0, max_steps=1, temperature=0.5, loss_temperature=1.3,
                        max_grad_norm=0), log=lambda *_: None)  # (the reference's gradient is unclipped)
    assert t.sampler.cfg.temperature == 0.5 and t.loss_args.temperature == 1.3
    student, teacher = load_model(tiny["student"]), load_model(tiny["teacher"])
    with torch.no_grad():
        for model in (t.student, t.teacher.model, student, teacher):
            model.get_output_embeddings().weight.mul_(10)
    loss = assert_step_matches(t, student, teacher)
    # (the cross-entropy term is untempered: the losses below differ by their divergence only)
    at = {temp: naive_step(student, teacher, t.data.rows(0), beta=t.cfg.beta, temperature=temp,
                           sft_alpha=t.cfg.sft_alpha)[0] for temp in (0.5, 1.0)}
    assert abs(loss - at[0.5]) > 0.1 * abs(loss), "the divergence was computed at the sampling temperature"
    assert abs(loss - at[1.0]) > 0.02 * abs(loss), "the divergence was computed untempered"


def test_on_policy_share_follows_lmbda():
    draws = [lmbda_draw(42, s) for s in range(2000)]
    for lmbda in (0.2, 0.5, 0.8):
        share = sum(u < lmbda for u in draws) / len(draws)
        assert abs(share - lmbda) < 0.04
    assert draws == [lmbda_draw(42, s) for s in range(2000)], "the draw is a pure function of (seed, step)"


def _topk_reference(student, teacher, rows, *, k, beta, temperature, sft_alpha) -> tuple[float, float]:
    """(loss, divergence per token) of an off-policy step against the teacher's top-k, naively in float64, row by
    row: the teacher's k most likely ids and their log-probs (at temperature 1), the student's logits at those
    ids, both divided by the temperature and renormalised over the k; cross-entropy over the whole vocabulary."""
    s, t = student.double().eval(), teacher.double().eval()
    div, ce, tokens = 0.0, 0.0, 0
    for e in rows:
        p, c = list(e.prompt_ids), list(e.completion_ids)
        ids, at = torch.tensor([p + c]), slice(len(p) - 1, len(p) + len(c) - 1)  # logits at i predict token i + 1
        with torch.no_grad():
            zs, zt = s(input_ids=ids).logits[0, at], t(input_ids=ids).logits[0, at]
        lps, top = torch.log_softmax(zt, -1).topk(k, -1)
        ls, lt = torch.log_softmax(zs.gather(-1, top) / temperature, -1), torch.log_softmax(lps / temperature, -1)
        m = torch.logsumexp(torch.stack([ls + math.log(1 - beta), lt + math.log(beta)]), 0)
        div += float((beta * (lt.exp() * (lt - m)).sum(-1) + (1 - beta) * (ls.exp() * (ls - m)).sum(-1)).sum())
        ce -= float(torch.log_softmax(zs, -1).gather(-1, torch.tensor(c)[:, None]).sum())
        tokens += len(c)
    return (div + sft_alpha * ce) / tokens, div / tokens


def test_topk_teacher_and_lora_train(tiny, tmp_path):
    """A top-k teacher with a LoRA student: step 1's loss and divergence are the top-k formula's (not the full
    vocabulary's), the adapters train while the base stays frozen, and the merged export is base + scale B A of
    the final adapters."""
    from gkd.models import load_model

    t = Trainer(cfg_for(tiny, tmp_path / "lora", train_type="lora", lora_rank=4, gkd_logits_topk=5, lmbda=0.5,
                        max_steps=3, merge_lora=True, split_dataset_ratio=0.25, eval_steps=3), log=lambda *_: None)
    assert len(t.val_examples) == 4 and len(t.train_examples) == 12
    rows, cfg = t.data.rows(0), t.cfg
    before = weights(t)
    t.train()
    metrics = read_metrics(t.out / "metrics.jsonl")
    first = metrics[0]
    assert first["step"] == 1 and first["on_policy_share"] == 0.0  # the reference is an off-policy step
    kw = {"beta": cfg.beta, "temperature": cfg.divergence_temperature, "sft_alpha": cfg.sft_alpha}
    student, teacher = load_model(tiny["student"]), load_model(tiny["teacher"])
    loss, div = _topk_reference(student, teacher, rows, k=5, **kw)
    _, full = _topk_reference(student, teacher, rows, k=96, **kw)  # all 96 ids: the full distribution's
    assert abs(first["loss"] - loss) <= 1e-5 * loss and abs(first["divergence"] - div) <= 1e-4 * div, (first, loss, div)
    assert abs(full - div) > 0.5 * div, "the top-k divergence is the full vocabulary's"
    evals = [m for m in metrics if "eval_divergence" in m]
    assert len(evals) == 1 and evals[0]["step"] == 3 and evals[0]["eval_divergence"] > 0

    after = weights(t)
    frozen = [n for n in before if "lora_" not in n]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen), "a base weight trained"
    merged, base = final_weights(t.out), load_model(tiny["student"]).state_dict()
    assert merged.keys() == base.keys()  # a plain model after merging
    adapted = {}
    for name, module in t.student.get_base_model().named_modules():
        if hasattr(module, "lora_A"):
            (a,), (b,) = module.lora_A.values(), module.lora_B.values()
            adapted[name + ".weight"] = module.scaling["default"] * b.weight.detach() @ a.weight.detach()
    assert len(adapted) == 7 * 2, sorted(adapted)  # every linear layer of the 2 decoder layers
    for n in base:
        want = base[n] + adapted.get(n, 0)
        torch.testing.assert_close(merged[n], want, rtol=0, atol=1e-6, msg=n)
    moved = {n: float(d.abs().max()) for n, d in adapted.items()}
    assert min(moved.values()) > 1e-4, moved  # every adapter trained (B starts at zero)


def _train_args(tiny, out, *extra):
    return ["train", "--model", tiny["student"], "--teacher_model", tiny["teacher"], "--dataset", tiny["data"],
            "--output_dir", str(out), "--max_completion_length", "6", "--learning_rate", "1e-3",
            "--lr_scheduler_type", "constant", "--micro_batch_size", "4", "--global_batch_size", "8",
            "--progress_bar", "false", "--lmbda", "0.5", *extra]


@pytest.mark.slow
def test_kill_and_resume_reproduces_the_losses(tiny, tmp_path):
    full = gkd_subprocess(*_train_args(tiny, tmp_path / "full", "--max_steps", "6"))
    assert full.returncode == 0, full.stderr[-2000:]
    reference = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "full" / "metrics.jsonl")}

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "gkd", *_train_args(tiny, out, "--max_steps", "100000",
                                                                       "--save_steps", "2")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 240
    while not (out / "checkpoint-2" / "gkd_checkpoint.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoint-2").is_dir()
    resumed = gkd_subprocess(*_train_args(tiny, out, "--max_steps", "6", "--resume_from_checkpoint", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = {m["step"]: m["loss"] for m in read_metrics(out / "metrics.jsonl")}
    start = min(s for s in got if s > 2)
    for step in range(start, 7):
        assert got[step] == reference[step], (step, got[step], reference[step])


def test_interrupted_checkpoint_write_leaves_the_previous_one(tiny, tmp_path):
    """A run killed while saving checkpoint-3 (its temp folder left) or pruning checkpoint-4 (a folder being
    deleted) resumes from checkpoint-2 and gives the uninterrupted run's step 3: its loss and its weights."""
    t = Trainer(cfg_for(tiny, tmp_path / "ck", max_steps=3, save_steps=1), log=lambda *_: None)
    t.train()
    want, want_weights = read_metrics(t.out / "metrics.jsonl")[-1], weights(t)
    # the save of step 3 killed midway (its checkpoint gone), and a prune killed midway (gkd's own names: a
    # checkpoint-N without gkd's marker is another tool's and never deleted, see tests/test_output_dir.py)
    shutil.rmtree(t.out / "checkpoint-3")
    (t.out / ".checkpoint-3.tmp" / "model").mkdir(parents=True)
    (t.out / ".checkpoint-4.deleting" / "model").mkdir(parents=True)
    resumed = Trainer(cfg_for(tiny, tmp_path / "ck", max_steps=3, resume_from_checkpoint="latest"), log=lambda *_: None)
    assert resumed.start_step == 2
    resumed.train()
    got = read_metrics(t.out / "metrics.jsonl")
    assert [m["step"] for m in got] == [1, 2, 3] and got[-1]["loss"] == want["loss"], (got[-1], want)
    after = weights(resumed)
    for k in want_weights:
        torch.testing.assert_close(after[k], want_weights[k], rtol=0, atol=0, msg=k)
    assert not (t.out / ".checkpoint-3.tmp").exists() and not (t.out / ".checkpoint-4.deleting").exists()  # cleaned


def test_nan_loss_skips_the_update_then_stops(tiny, tmp_path):
    t = Trainer(cfg_for(tiny, tmp_path / "nan", max_steps=5, max_bad_steps=2), log=lambda *_: None)
    with torch.no_grad():
        t.teacher.model.get_output_embeddings().weight.fill_(float("nan"))
    before = weights(t)
    from gkd import GKDError

    with pytest.raises(GKDError, match="2 consecutive steps"):
        t.train()
    after = weights(t)
    assert all(torch.equal(before[k], after[k]) for k in before), "a non-finite step must not update"


def test_bad_input_gives_one_line_and_exit_2(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good_row = json.dumps({"prompt": "w1 w2", "completion": "w3"})
    cases = {
        "malformed": (good_row + "\n{not json\n", f"{bad}:2: malformed JSON"),
        "missing": (json.dumps({"text": "w1"}) + "\n", f"{bad}:1: a row needs 'messages' or 'prompt'"),
        "wrong type": (json.dumps({"prompt": 3, "completion": "w1"}) + "\n", "'prompt' must be a string"),
        "empty completion": (json.dumps({"prompt": "w1", "completion": " "}) + "\n", "'completion' is empty"),
        "bad role": (json.dumps({"messages": [{"role": "bot", "content": "w1"}]}) + "\n", "messages[0].role"),
    }
    for i, (name, (text, needle)) in enumerate(cases.items()):
        bad.write_text(text)
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        args = ["train", "--model", tiny["student"], "--teacher_model", tiny["teacher"], "--dataset", str(bad),
                "--output_dir", str(out), "--progress_bar", "false"]
        proc = (gkd_subprocess if i == 0 else gkd_in_process)(*args)  # one real command, then in-process
        assert_one_line_error(proc, needle)
        assert not out.exists(), f"{name}: output folder written"

    bad.write_text(json.dumps({"prompt": "w1 w2 w3 w4 w5 w6 w7 w8 w9", "completion": "w1"}) + "\n")
    assert_one_line_error(gkd_in_process("train", "--model", tiny["student"], "--teacher_model", tiny["teacher"], "--dataset",
                                str(bad), "--output_dir", str(tmp_path / "o"), "--max_length", "4",
                                "--truncation_strategy", "delete"), "exceed --max_length 4")

    base = ["train", "--model", tiny["student"], "--teacher_model", tiny["teacher"], "--dataset", tiny["data"]]
    flag_cases = [
        (["--output_dir", str(tmp_path / "x"), "--no_such_flag", "1"], "unrecognized arguments"),
        (["--output_dir", str(tmp_path / "x"), "--beta", "1.5"], "--beta must be in [0, 1]"),
        (["--output_dir", str(tmp_path / "x"), "--lmbda", "-0.1"], "--lmbda must be in [0, 1]"),
        (["--output_dir", str(tmp_path / "x"), "--temperature", "0"], "--temperature must be > 0"),
        (["--output_dir", str(tmp_path / "x"), "--loss_temperature", "-1"], "--loss_temperature must be > 0"),
        (["--output_dir", str(tmp_path / "x"), "--micro_batch_size", "3", "--global_batch_size", "8"],
         "must be a multiple of --micro_batch_size"),
        (["--output_dir", "/proc/gkd-out"], "not writable"),
        (["--output_dir", str(Path(tiny["data"]) / "sub")], "not writable"),
        (["--output_dir", str(tmp_path / "x"), "--resume_from_checkpoint", str(tmp_path / "nope")], "nope: no such folder"),
        # a local teacher and a server are two teachers (docs/teachers.md); the server's K is missing
        (["--output_dir", str(tmp_path / "x"), "--teacher_model_server", "http://127.0.0.1:9"],
         "needs --gkd_logits_topk K >= 1"),
    ]
    for extra, needle in flag_cases:
        assert_one_line_error(gkd_in_process(*base, *extra), needle)
    remote = ["train", "--model", tiny["student"], "--dataset", tiny["data"], "--output_dir", str(tmp_path / "x"),
              "--teacher_model_server"]
    for extra, needle in [
        (["127.0.0.1:8000", "--gkd_logits_topk", "8"], "must be an http(s):// URL"),
        (["http://127.0.0.1:9"], "needs --gkd_logits_topk"),
        (["http://127.0.0.1:9", "--gkd_logits_topk", "8", "--seq_kd"], "--seq_kd needs"),
    ]:
        assert_one_line_error(gkd_in_process(*remote, *extra), needle)
    proc = gkd_in_process(*remote, "http://127.0.0.1:9", "--gkd_logits_topk", "8", "--teacher_wait", "1")
    last = proc.stderr.strip().splitlines()[-1]  # after one line saying it waits for the server
    assert proc.returncode == 2 and last.startswith("gkd: error: teacher server http://127.0.0.1:9/health not ready")
    assert not (tmp_path / "x").exists()

    from tiny import write_model

    other = write_model(tmp_path / "other-vocab", vocab_size=80)
    assert_one_line_error(gkd_in_process("train", "--model", tiny["student"], "--teacher_model", str(other), "--dataset",
                                tiny["data"], "--output_dir", str(tmp_path / "v")), "vocabularies differ")


def test_a_damaged_checkpoint_or_other_pinned_flags_are_refused_before_loading(tiny, tmp_path):
    """Every file a save wrote carries its sha256: a shard cut in half, 4 KB zeroed inside a shard (same size:
    it used to resume silently), garbage DCP metadata (25 lines of torch's traceback came first), a truncated
    trainer.pt, a deleted rng file, a non-numeric step in the marker; and a resume with another
    --learning_rate / --global_batch_size / --seed / --weight_decay (the checkpoint's optimizer, schedule and
    data order carry the saved ones): one line each, naming the file or the flag."""
    import json

    t = Trainer(cfg_for(tiny, tmp_path / "c", max_steps=1), log=lambda *_: None)
    t.train()
    ck = t.out / "checkpoint-1"
    shard = sorted((ck / "state").glob("*.distcp"))[0]

    def zero_4k(b):
        return b[:1024] + bytes(4096) + b[1024 + 4096:]

    damage = [
        (shard, lambda b: b[: len(b) // 2], f"state/{shard.name} is damaged or missing"),
        (shard, zero_4k, f"state/{shard.name} is damaged or missing"),
        (ck / "state" / ".metadata", lambda b: b"garbage" * 100, "state/.metadata is damaged or missing"),
        (ck / "trainer.pt", lambda b: b[: len(b) // 2], "trainer.pt is damaged or missing"),
        (ck / "rng-0.pt", None, "rng-0.pt is damaged or missing"),
        (ck / "gkd_checkpoint.json", lambda b: b.replace(b'"step": 1', b'"step": "one"'),
         "gkd_checkpoint.json: step must be a whole number >= 0, got 'one'"),
    ]
    resume = _train_args(tiny, t.out, "--max_steps", "2", "--resume_from_checkpoint", str(ck))
    for i, (broken, change, needle) in enumerate(damage):
        saved = broken.read_bytes()
        if change is None:
            broken.unlink()
        else:
            assert change(saved) != saved
            broken.write_bytes(change(saved))
        proc = (gkd_subprocess if i == 2 else gkd_in_process)(*resume)  # the DCP metadata case as the real command
        assert_one_line_error(proc, needle)
        broken.write_bytes(saved)
    info = json.loads((ck / "gkd_checkpoint.json").read_text())
    assert info["settings"]["learning_rate"] == 1e-3 and set(info["sha256"]) >= {"trainer.pt", "rng-0.pt"}
    for flag, value, saved in (("--learning_rate", "0.01", "0.001"), ("--global_batch_size", "4", "8"),
                               ("--seed", "7", "42"), ("--weight_decay", "0.5", "0.0")):
        proc = gkd_in_process(*(set_arg(resume, flag, value) if flag in resume else [*resume, flag, value]))
        assert_one_line_error(proc, f"{flag} {float(value) if '.' in value else int(value)} differs from the "
                                    f"checkpoint's {float(saved) if '.' in saved else int(saved)}")
    proc = gkd_in_process(*resume, "--freeze_parameters", "model.embed_tokens")  # would drop its optimizer state
    assert_one_line_error(proc, "--freeze_parameters model.embed_tokens differs from the checkpoint's None")
    proc = gkd_in_process(*resume)  # and intact, with the same flags: resumes
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = gkd_in_process(*_train_args(tiny, t.out, "--max_steps", "2", "--resume_from_checkpoint",
                                       str(tmp_path / "missing")))
    assert_one_line_error(proc, "no such folder")


def test_yaml_config_and_dash_spelling(tiny, tmp_path):
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text(f"model: {tiny['student']}\nteacher-model: {tiny['teacher']}\ndataset: {tiny['data']}\n"
                       "max_steps: 1\nmicro_batch_size: 4\nglobal_batch_size: 8\nmax_completion_length: 4\n")
    proc = gkd_subprocess("train", "--config", str(cfgfile), "--output-dir", str(tmp_path / "y"), "--progress-bar", "false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "y" / "final" / "config.json").is_file()
    assert (tmp_path / "y" / "loss_curve.png").is_file()
    help_text = gkd_in_process("train", "--help").stdout
    for flag in ("--beta", "--lmbda", "--sft_alpha", "--gkd_logits_topk", "--offload_teacher_model", "--seq_kd"):
        assert flag in help_text


def test_eval_command_writes_json(tiny, tmp_path):
    out = tmp_path / "eval.json"
    proc = gkd_subprocess("eval", "--model", tiny["student"], "--teacher_model", tiny["teacher"], "--dataset", tiny["prompts"],
                "--max_completion_length", "5", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads(out.read_text())
    assert metrics["divergence"] > 0 and 0 <= metrics["top1_agreement"] <= 1 and metrics["student_ppl_on_teacher"] > 1
    assert "divergence" in proc.stdout
    assert len(metrics["rows"]) == metrics["prompts"] == 8 and all(r["samples"] == [] for r in metrics["rows"])
    for key in ("student_repeated_4gram_share", "student_distinct_2", "teacher_repeated_4gram_share",
                "teacher_distinct_2"):
        assert f"\n{key} " in proc.stdout and 0 <= metrics[key] <= 1 and key in metrics["rows"][0], key


def test_eval_samples_and_per_prompt_rows(tiny):
    """Seeded samples per prompt depend on the prompt's row and the seed only; per-prompt rows add up to the
    metrics; the teacher's log-prob of a sample is its own forward's."""
    from gkd.data.batch import collate
    from gkd.data.rows import load_examples
    from gkd.models import load_model, load_tokenizer
    from gkd.evaluate import evaluate

    tok = load_tokenizer(tiny["student"])
    prompts = [e.prompt_ids for e in load_examples([tiny["prompts"]], tok, max_length=64,
                                                           truncation_strategy="left", max_completion_length=6)]
    student, teacher = load_model(tiny["student"]).eval(), load_model(tiny["teacher"]).eval()
    kw = dict(eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, beta=0.5, temperature=1.0, max_new_tokens=6,
              device=torch.device("cpu"), samples=3)
    full = evaluate(student, teacher, prompts, batch_size=3, **kw)
    part = evaluate(student, teacher, prompts[:2], batch_size=2, **kw)
    assert part.samples == full.samples[:2] and len(full.samples[0]) == 3
    assert len({tuple(c) for row in full.samples for c in row}) > len(prompts)  # seeds draw different samples
    m, rows = full.metrics, full.rows
    tokens = sum(r["teacher_tokens"] for r in rows)
    assert tokens == m["teacher_tokens"]
    assert sum(r["top1_agreement"] * r["teacher_tokens"] for r in rows) / tokens == pytest.approx(m["top1_agreement"])
    assert sum(r["divergence"] * r["teacher_tokens"] for r in rows) / tokens == pytest.approx(m["divergence"])
    lengths = [r["sample_completion_length"] * 3 for r in rows]
    assert sum(r["teacher_logprob_of_samples"] * n for r, n in zip(rows, lengths)) / sum(lengths) == pytest.approx(
        m["teacher_logprob_of_samples"])
    # prompt 1's samples scored by the teacher's own forward
    want, count = 0.0, 0
    for c in full.samples[1]:
        b = collate([prompts[1]], [c], tok.pad_token_id)
        with torch.no_grad():
            lp = torch.log_softmax(teacher(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.double(), -1)
        scored = b.loss_mask[0]  # logits at i score token i + 1 (labels are already shifted)
        want += float(lp[0][scored].gather(1, b.labels[0][scored][:, None]).sum())
        count += int(scored.sum())
    assert rows[1]["teacher_logprob_of_samples"] == pytest.approx(want / count, abs=1e-5)


def _by_definition(tokens: list[int]) -> tuple[int, int, int, int]:
    """The repetition counts word for word: 4-grams seen at an earlier position, 4-grams, distinct bigrams,
    bigrams."""
    fours = [tokens[i:i + 4] for i in range(len(tokens) - 3)]
    twos = [tokens[i:i + 2] for i in range(len(tokens) - 1)]
    repeated = sum(1 for i, g in enumerate(fours) if g in fours[:i])
    return repeated, len(fours), len({tuple(g) for g in twos}), len(twos)


def test_repetition_counts_follow_their_definitions():
    import random

    from gkd.evaluate import content, repetition_counts

    # period 4: 9 4-grams, the first 4 new and the 5 after them seen before; 11 bigrams, 4 of them distinct
    assert repetition_counts([1, 2, 3, 4] * 3) == (5, 9, 4, 11)
    assert repetition_counts([7] * 5) == (1, 2, 1, 4)
    assert repetition_counts([1, 2, 3]) == (0, 0, 2, 2)  # under 4 tokens: no 4-grams
    assert repetition_counts([]) == (0, 0, 0, 0)
    assert content([1, 2, 2, 9], eos_ids=[9, 8]) == [1, 2, 2] and content([1, 2], eos_ids=[9]) == [1, 2]
    draw = random.Random(0)
    for _ in range(200):
        tokens = [draw.randrange(3) for _ in range(draw.randrange(16))]
        assert repetition_counts(tokens) == _by_definition(tokens), tokens


def test_repetition_metrics_sum_counts_over_prompts_and_ranks(tiny, monkeypatch):
    """Hand-made greedy completions through evaluate: the shares are the hand-worked counts summed over
    prompts (EOS not counted), and two data-parallel ranks, one padding its share, reduce to the same."""
    import gkd.evaluate as ev
    from gkd.data.rows import load_examples
    from gkd.models import load_model, load_tokenizer

    tok = load_tokenizer(tiny["student"])
    eos = tok.eos_token_id
    prompts = [e.prompt_ids for e in load_examples([tiny["prompts"]], tok, max_length=64,
                                                   truncation_strategy="left", max_completion_length=6)][:3]
    # counts (repeated 4-grams, 4-grams, distinct bigrams, bigrams) worked by hand, EOS left out
    student_says = [[10, 11, 12, 13] * 3 + [eos],  # (5, 9, 4, 11)
                    [14, 15, 16],  # (0, 0, 2, 2)
                    [17] * 5 + [eos]]  # (1, 2, 1, 4)
    teacher_says = [[20, 21, 20, 21, 20, 21],  # (1, 3, 2, 5)
                    [22, 22, eos],  # (0, 0, 1, 1)
                    [23, eos]]  # (0, 0, 0, 0)
    says = {tuple(p): c for p, c in zip(prompts, student_says)}
    monkeypatch.setattr(ev, "greedy", lambda model, prompts, *a, **k: [says[tuple(p)] for p in prompts])
    student, teacher = load_model(tiny["student"]).eval(), load_model(tiny["teacher"]).eval()
    kw = dict(eos_ids=[eos], pad_id=tok.pad_token_id, beta=0.5, temperature=1.0, max_new_tokens=13,
              device=torch.device("cpu"))
    whole = ev.evaluate(student, teacher, prompts, teacher_completions=teacher_says, **kw).metrics
    assert whole["student_repeated_4gram_share"] == 6 / 11 and whole["student_distinct_2"] == 7 / 17
    assert whole["teacher_repeated_4gram_share"] == 1 / 3 and whole["teacher_distinct_2"] == 3 / 6
    # rank 1 holds prompt 2 and pads with it; rank 0 holds prompts 0 and 1 and reduces both ranks' sums
    second = []
    ev.evaluate(student, teacher, [prompts[2]] * 2, teacher_completions=[teacher_says[2]] * 2,
                counted=[True, False], reduce=lambda sums: second.append(sums) or sums, **kw)
    first = ev.evaluate(student, teacher, prompts[:2], teacher_completions=teacher_says[:2], counted=[True, True],
                        reduce=lambda sums: sums + second[0], **kw).metrics
    assert first == pytest.approx(whole, rel=1e-5)  # the forwards' float32 sums differ by batch
    assert all(first[k] == whole[k] for k in whole if "repeated" in k or "distinct" in k)  # the counts are exact


def test_a_run_that_raises_frees_its_folder_without_close(tiny, tmp_path):
    """A library user whose train() raised (a step failing here) may start again at once: the folder's lock
    is dropped when train() ends, however it ends (another process can take it), not at close()."""
    t = Trainer(cfg_for(tiny, tmp_path / "o", max_steps=3, save_steps=1), log=lambda *_: None)
    step = t.train_step
    t.train_step = lambda s, w: step(s, w) if s == 0 else (_ for _ in ()).throw(RuntimeError("step failed"))
    with pytest.raises(RuntimeError, match="step failed"):
        t.train()
    probe = ("import fcntl, os, sys\n"
             "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
             "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n")
    taken = subprocess.run([sys.executable, "-c", probe, str(t.out / ".gkd.lock")], capture_output=True, text=True)
    assert taken.returncode == 0, taken.stderr[-500:]
    t.close()
    again = Trainer(cfg_for(tiny, tmp_path / "o", max_steps=3, save_steps=1, resume_from_checkpoint="latest"),
                    log=lambda *_: None)
    assert again.start_step == 1
    again.train()
    again.close()


def test_the_command_pins_mkls_reduction_order_unless_the_user_set_it():
    """gkd sets MKL_CBWR / MKL_DYNAMIC before torch loads MKL (alignment-dependent kernels and a thread count
    that shrinks under load made a resume differ in the 8th digit on a loaded machine); a user's value wins."""
    probe = "import os, gkd.cli, torch; print(os.environ['MKL_CBWR'], os.environ['MKL_DYNAMIC'])"
    env = {k: v for k, v in ENV.items() if k not in ("MKL_CBWR", "MKL_DYNAMIC")}
    said = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    assert said.stdout.split() == ["AUTO,STRICT", "FALSE"], said.stderr[-500:]
    said = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env={**env, "MKL_CBWR": "COMPATIBLE"})
    assert said.stdout.split() == ["COMPATIBLE", "FALSE"], said.stderr[-500:]
