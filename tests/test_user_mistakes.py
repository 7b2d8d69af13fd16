"""Mistakes a new user makes, met through the CLI: each ends in one line (exit 2) before any output is
written, or is warned about; nothing passes silently."""

import json
import os
from pathlib import Path

import pytest

from gkd.cli import main
from gkd.config import TrainConfig, build_config


def train_args(tiny, out, *extra):
    return ["train", "--model", tiny["student"], "--teacher_model", tiny["teacher"], "--dataset", tiny["data"],
            "--output_dir", str(out), "--max_completion_length", "6", "--micro_batch_size", "4",
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


# --- layouts and options that do not go together (yet): one line before any process starts -------------

PP2, CP2 = ["--pipeline_model_parallel_size", "2"], ["--context_parallel_size", "2"]
EP2 = ["--expert_model_parallel_size", "2"]


@pytest.mark.parametrize("models,flags,message", [
    pytest.param("moe-odd-teacher", ["--nproc_per_node", "2", *EP2], "--expert_model_parallel_size 2: the teacher "
                 "Qwen3MoeForCausalLM has 3 experts per layer, which 2 does not divide", id="ep-teacher-experts"),
    pytest.param("tiny", ["--nproc_per_node", "2", "--use_vllm", "true", "--vllm_tensor_parallel_size", "2"],
                 "--vllm_tensor_parallel_size 2 must divide --tensor_model_parallel_size 1: the ranks of one vLLM "
                 "engine", id="vllm-tp2-over-tp1"),
    pytest.param("tiny", ["--nproc_per_node", "4", "--tensor_model_parallel_size", "2", "--use_vllm", "true",
                          "--vllm_tensor_parallel_size", "4"],
                 "--vllm_tensor_parallel_size 4 must divide --tensor_model_parallel_size 2", id="vllm-tp4-over-tp2"),
    pytest.param("tiny", ["--teacher_wire", "hidden"], "--teacher_wire hidden needs --teacher_model_server",
                 id="hidden-wire-local-teacher"),
    pytest.param("tiny", ["--teacher_wire_dtype", "bfloat16"], "--teacher_wire_dtype bfloat16 is for --teacher_wire "
                 "hidden", id="bfloat16-top-k-wire"),
    pytest.param("tiny", ["--use_vllm", "true", "--sleep_level", "2"],
                 "--sleep_level must be 0 or 1, got 2 (level 2 drops the weights", id="sleep-level-2"),
    pytest.param("tiny", ["--nproc_per_node", "2", *PP2, "--virtual_pipeline_model_parallel_size", "2",
                          "--global_batch_size", "12"],
                 "needs the micro-batches per step on a data-parallel rank (3) to be a multiple of "
                 "--pipeline_model_parallel_size 2", id="interleaved-micro-batches"),
])
def test_layouts_not_combined_yet_are_one_line_before_any_process(request, tmp_path, capsys, models, flags, message):
    """What docs/parallelism.md, moe.md and vllm.md say is refused, from the flags and the models' configs, before
    a process starts or the output folder is made."""
    sets = {"tiny": "tiny", "moe": "moe", "moe-odd-teacher": "moe"}
    chosen = dict(request.getfixturevalue(sets[models]))
    if models == "moe-odd-teacher":
        chosen["teacher"] = chosen["odd"]
    capsys.readouterr()  # (what making the models printed)
    out = tmp_path / "out"
    err = one_line_error(capsys, *train_args(chosen, out, *flags))
    assert message in err, err
    assert not out.exists()


def test_vllm_cpu_shared_memory_left_or_in_use_is_named(tmp_path):
    """vLLM 0.32 on CPU names a tensor-parallel engine's shared memory after its ranks alone: a segment of the same
    name, left by a killed run or held by another job, is named with its cause before the engine's errno 17."""
    from gkd.errors import GKDError
    from gkd.rollout.vllm_engine import check_cpu_shared_memory

    (tmp_path / "-tp:0-[2-3]-cpushm_0").write_bytes(b"x")  # another engine's ranks
    (tmp_path / "-tp:0-[0-1]-cpushm_0").write_bytes(b"x")  # rank 0's, not rank 1's
    check_cpu_shared_memory(1, 2, tmp_path)
    check_cpu_shared_memory(0, 4, tmp_path)
    with pytest.raises(GKDError, match=r"-cpushm_0 was left by a run that ended without closing its engine \(no "
                                       r"process uses it\).*: rm '"):
        check_cpu_shared_memory(0, 2, tmp_path)
    held = tmp_path / "-tp:0-[2-3]-cpushm_1"
    with open(held, "wb"):
        with pytest.raises(GKDError, match=f"cpushm_1 is in use by process {os.getpid()}: "):
            check_cpu_shared_memory(3, 2, tmp_path)


@pytest.mark.parametrize("layout", [{"tp": 2}, {"pp": 2}, {"ep": 2}], ids=["tp2", "pp2", "ep2"])
def test_offloading_a_teacher_without_fsdp_shards_is_refused(layout):
    """--offload_teacher_model under TP, PP or EP with no FSDP shards of the teacher is one line (on a GPU: on CPU
    the flag is a no-op, so the decision is checked here for a CUDA device, which it only names)."""
    from types import SimpleNamespace

    import torch

    from gkd.errors import GKDError
    from gkd.parallel import teacher_offload

    gpu = torch.device("cuda")
    par = SimpleNamespace(**{"tp": 1, "pp": 1, "ep": 1, "shard_mesh": None, **layout})
    with pytest.raises(GKDError, match="--offload_teacher_model with tensor, pipeline or expert parallelism but no "
                                       "FSDP shards is not supported yet"):
        teacher_offload(par, True, gpu)
    assert teacher_offload(SimpleNamespace(tp=1, pp=1, ep=1, shard_mesh=None), True, gpu) == "move"  # one process


# --- numbers a run cannot use, and YAML read as written -------------------------------------------------


@pytest.mark.parametrize("flag,value", [("--weight_decay", "-1"), ("--seed", "123456789012345678901234"),
                                        ("--seed", "-1"), ("--eval_steps", "1"), ("--eval_steps", "-1")])
def test_numbers_a_run_cannot_use_are_refused(tiny, tmp_path, capsys, flag, value):
    """A negative weight decay or a seed torch cannot take is one line (it was a traceback); so is --eval_steps with
    no held-out data (it never evaluated, silently)."""
    out = tmp_path / "out"
    err = one_line_error(capsys, *train_args(tiny, out, flag, value))
    assert flag in err and value in err, err
    assert not out.exists()


@pytest.mark.parametrize("content,message", [
    (b"beta: 0.5\nlmbda: 0.5\nbeta: 0.9\n", "duplicate key 'beta' at line 3"),
    (b"max-steps: 2\nmax_steps: 3\n", "option 'max_steps' given twice"),
    ("beta: 0.5 # caf\xe9\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset"),
])
def test_yaml_that_is_ambiguous_or_not_text_is_one_line(tiny, tmp_path, capsys, content, message):
    """A key given twice is refused (PyYAML would keep the last silently), and so is a file not in UTF-8."""
    (tmp_path / "c.yaml").write_bytes(content)
    out = tmp_path / "out"
    err = one_line_error(capsys, *train_args(tiny, out, "--config", str(tmp_path / "c.yaml")))
    assert message in err and "c.yaml" in err, err
    assert not out.exists()


@pytest.mark.parametrize("flags,message", [
    (["--lmbda", "3"], "--lmbda must be in [0, 1], got 3.0"), (["--max_steps", "0"], "--max_steps must be >= 1"),
    (["--progress_bar", "maybe"], "expected true or false, got 'maybe'"),
    (["--max_completion_length", "0"], "--max_completion_length must be >= 1"),
    (["--teacher_samples", "3"], "--teacher_samples is for --teacher_completions sampled"),
    (["--teacher_completions", "sampled", "--teacher_samples", "0"], "--teacher_samples must be >= 1, got 0"),
])
def test_demo_options_are_checked_before_any_work(tmp_path, capsys, flags, message):
    """gkd demo refuses its options before the teacher writes completions (and reads no boolean it cannot)."""
    out = tmp_path / "demo"
    err = one_line_error(capsys, "demo", "--output_dir", str(out), *flags)
    assert message in err, err
    assert not out.exists()


def test_demo_keeps_a_teacher_cache_folder_it_did_not_make(tmp_path, capsys):
    """gkd demo clears its earlier teacher cache (every demo scores its rows afresh), never a folder of that name
    that is not one."""
    mine = tmp_path / "demo" / "teacher-cache" / "mine.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("mine\n")
    err = one_line_error(capsys, "demo", "--output_dir", str(tmp_path / "demo"))
    assert f"{mine.parent} exists and is not a teacher cache gkd made" in err, err
    assert mine.read_text() == "mine\n"


@pytest.mark.parametrize("targets", ["lm_head", "q_proj,lm_head"])
def test_lora_on_the_output_layer_is_refused(tiny, tmp_path, capsys, targets):
    """--target_modules lm_head: gkd's loss reads the head's weight directly, so an adapter there gets no gradient
    (alone: 'element 0 of tensors does not require grad'; beside others: never trained, silently). One line."""
    out = tmp_path / "out"
    err = one_line_error(capsys, *train_args(tiny, out, "--train_type", "lora", "--target_modules", targets))
    assert f"--target_modules {targets}: gkd keeps the output layer lm_head out of LoRA" in err, err
    assert not out.exists()


def test_a_frozen_prefix_is_whole_name_components():
    """model.layers.1 freezes layer 1 alone, not layers 10 and 11 (a plain string prefix would)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gkd.models import freeze_parameters

    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=12,
                                         num_attention_heads=2, num_key_value_heads=2))
    freeze_parameters(model, ["model.layers.1"])
    frozen = {n.split(".")[2] for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"1"}, frozen


@pytest.mark.parametrize("flags,message", [
    (["--freeze_parameters", "model.embed_tokens", "model.layers.0"], None),  # real names: the run trains the rest
    (["--freeze_parameters", "model.embed_tokens", "model.layer.0."],
     "--freeze_parameters 'model.layer.0.' names no parameter of --model (whole name components; its modules "
     "include"),
    (["--freeze_parameters", "model.embed"], "--freeze_parameters 'model.embed' names no parameter"),  # (not a prefix)
    (["--freeze_parameters", "model", "lm_head"], "freezes every parameter of --model: nothing to train"),
    (["--freeze_parameters", "model.embed_tokens", "--train_type", "lora"],
     "--freeze_parameters is for --train_type full (LoRA trains its adapters alone)"),
])
def test_freeze_parameters_that_freeze_nothing_or_everything_are_refused(tiny, tmp_path, capsys, flags, message):
    """A typo in a prefix must not train everything, nor a prefix too short leave nothing to train: one line, before
    the output folder exists."""
    out = tmp_path / "out"
    if message is None:
        assert main(train_args(tiny, out, *flags)) == 0
        return
    err = one_line_error(capsys, *train_args(tiny, out, *flags))
    assert message in err, err
    assert not out.exists()


@pytest.mark.parametrize("flags,message", [
    (["--async_generation", "-1"], "--async_generation must be >= 0, got -1"),
    (["--async_generation", "1"], "--async_generation 1 needs --use_vllm true --vllm_mode server"),
    (["--async_generation", "2", "--use_vllm", "true"], "--async_generation 2 needs --use_vllm true --vllm_mode server"),
])
def test_async_generation_without_a_vllm_server_is_refused(tiny, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    err = one_line_error(capsys, *train_args(tiny, out, *flags))
    assert message in err, err
    assert not out.exists()
