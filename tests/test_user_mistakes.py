"""Mistakes a new user makes, met through the CLI: each ends in one line (exit 2) before any output is
written, or is warned about; nothing passes silently."""

import json
from pathlib import Path

import pytest

from gkd.cli import main
from gkd.config import TrainConfig, build_config


def train_args(tiny, out, *extra):
    return ["train", "--model", tiny["student"], "--teacher_model", tiny["teacher"], "--dataset", tiny["data"],
            "--output_dir", str(out), "--max_completion_length", "4", "--micro_batch_size", "4",
            "--global_batch_size", "8", "--max_steps", "1", "--progress_bar", "false", *extra]


def one_line_error(capsys, *args) -> str:
    rc = main(list(args))
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("gkd: error: "), err
    return err


# --- YAML is checked exactly as the flags are -------------------------------------------------------


@pytest.mark.parametrize("yaml_line,value", [
    ('beta: "0.5"', ("beta", 0.5)), ('max_steps: "2"', ("max_steps", 2)), ('progress_bar: "false"', ("progress_bar", False)),
    ('use_vllm: "no"', ("use_vllm", False)), ("progress_bar: off", ("progress_bar", False)), ("lmbda: 1", ("lmbda", 1.0)),
])
def test_yaml_text_values_are_parsed_as_flags_parse_them(tmp_path, yaml_line, value):
    (tmp_path / "c.yaml").write_text(yaml_line + "\n")
    cfg = build_config(TrainConfig, {}, str(tmp_path / "c.yaml"))
    assert getattr(cfg, value[0]) == value[1] and type(getattr(cfg, value[0])) is type(value[1])


@pytest.mark.parametrize("yaml_line,message", [
    ("lmbda: null", "lmbda must be a number"), ("dataset: 5", "dataset must be text"),
    ("micro_batch_size: 1.0", "micro_batch_size must be an integer"), ('beta: "half"', "beta must be a number"),
    ("torch_dtype: float16", "torch_dtype must be one of"), ('use_vllm: "maybe"', "use_vllm must be true or false"),
    ("max_steps: true", "max_steps must be an integer"),
])
def test_yaml_type_mistakes_are_one_line_before_any_output(tiny, tmp_path, capsys, yaml_line, message):
    (tmp_path / "c.yaml").write_text(yaml_line + "\n")
    out = tmp_path / "out"
    err = one_line_error(capsys, *train_args(tiny, out, "--config", str(tmp_path / "c.yaml")))
    assert message in err and "c.yaml" in err, err
    assert not out.exists()


@pytest.mark.parametrize("flag,value", [("--temperature", "inf"), ("--learning_rate", "inf"), ("--sft_alpha", "inf"),
                                        ("--num_train_epochs", "inf"), ("--beta", "nan")])
def test_non_finite_numbers_are_refused(tiny, tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    err = one_line_error(capsys, *train_args(tiny, out, flag, value))
    assert flag in err, err
    assert not out.exists()


def test_topk_beyond_the_vocabulary_names_the_flag_before_any_output(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    err = one_line_error(capsys, *train_args(tiny, out, "--gkd_logits_topk", "100000"))
    assert "--gkd_logits_topk 100000" in err and "96" in err, err
    assert not (out / "metrics.jsonl").exists()


def test_sequences_beyond_the_models_context_are_refused_before_any_work(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    err = one_line_error(capsys, *train_args(tiny, out, "--max_completion_length", "100000000", "--lmbda", "1"))
    assert "context of 256" in err and "--max_completion_length" in err, err
    assert not (out / "metrics.jsonl").exists()
    err = one_line_error(capsys, "eval", "--model", tiny["student"], "--teacher_model", tiny["teacher"], "--dataset",
                         tiny["prompts"], "--max_completion_length", "1000")
    assert "context of 256" in err, err


@pytest.mark.parametrize("flag", ["--batch_size", "--max_completion_length"])
def test_eval_refuses_zero_sizes(tiny, capsys, flag):
    err = one_line_error(capsys, "eval", "--model", tiny["student"], "--teacher_model", tiny["teacher"], "--dataset",
                         tiny["prompts"], flag, "0")
    assert flag in err, err


def test_resume_from_a_folder_that_is_not_a_checkpoint_names_it(tiny, tmp_path, capsys):
    out = tmp_path / "missing-out"
    err = one_line_error(capsys, *train_args(tiny, out, "--resume_from_checkpoint", tiny["student"]))
    assert f"--resume_from_checkpoint {tiny['student']}" in err and "not a checkpoint" in err, err
    assert "does not exist" not in err and not out.exists()


# --- data files ---------------------------------------------------------------------------------------


def _bad_files(root: Path) -> dict:
    root.mkdir(exist_ok=True)
    files = {}
    files["latin1.jsonl"] = '{"prompt": "caf\xe9", "completion": "w1"}\n'.encode("latin-1")
    files["latin1.json"] = '[{"prompt": "caf\xe9", "completion": "w1"}]'.encode("latin-1")
    files["corrupt.parquet"] = b"PAR1" + b"\x00garbage" * 20 + b"PAR1"
    files["deep.json"] = ("[" * 100000 + "]" * 100000).encode()
    files["deep.jsonl"] = ('{"prompt": ' + "[" * 100000 + "]" * 100000 + "}\n").encode()
    files["dupkey.jsonl"] = b'{"prompt": "w1", "prompt": "w2", "completion": "w3"}\n'
    files["dupkey.json"] = b'[\n  {"prompt": "w1",\n   "completion": "w3", "completion": "w4"}\n]\n'
    files["nouser.jsonl"] = b'{"messages": [{"role": "system", "content": "w1"}, {"role": "assistant", "content": "w2"}]}\n'
    files["torn.jsonl"] = b'{"prompt": "w1", "completion": "w2"}\n{"prompt": "unterminated\n'
    for name, data in files.items():
        (root / name).write_bytes(data)
    return {name: root / name for name in files}


@pytest.mark.parametrize("name,message", [
    ("latin1.jsonl", "not UTF-8 text (byte 0xe9 at offset"), ("latin1.json", "not UTF-8 text (byte 0xe9"),
    ("corrupt.parquet", "not a readable Parquet file"), ("deep.json", "nested too deeply"),
    ("deep.jsonl", "nested too deeply"), ("dupkey.jsonl", "duplicate key 'prompt'"),
    ("dupkey.json", "duplicate key 'completion'"), ("nouser.jsonl", "no user turn"),
    ("torn.jsonl", "torn.jsonl:2: malformed JSON, line 1 column"),
])
def test_unreadable_or_ambiguous_data_is_one_line(tiny, tmp_path, capsys, name, message):
    path = _bad_files(tmp_path / "data")[name]
    out = tmp_path / "out"
    args = train_args(tiny, out)
    args[args.index("--dataset") + 1] = str(path)
    err = one_line_error(capsys, *args)
    assert message in err and str(path) in err, err
    assert " at at " not in err
    assert not out.exists()


def test_cut_prompts_and_unused_columns_are_warned_about(tiny, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    rows = [{"prompt": " ".join(f"w{i}" for i in range(30)), "completion": "w1", "id": 7, "source": "x"},
            {"prompt": "w1 w2", "completion": "w3"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = train_args(tiny, tmp_path / "out", "--max_length", "8", "--global_batch_size", "4")
    args[args.index("--dataset") + 1] = str(data)
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "cut 1 prompt(s) longer than --max_length 8" in err and f"{data}:1" in err, err
    assert "'id', 'source' are not used" in err, err
