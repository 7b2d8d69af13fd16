"""Pipeline parallelism (torchrun, gloo on 127.0.0.1) equals one process, on- and off-policy, alone and with
FSDP, TP and LoRA; checkpoints move between pipeline sizes; mistakes are one line.

The runs share test_distributed's arguments: seed 42, lmbda 0.5, so steps 1 and 3 are off-policy and steps
2 and 4 on-policy (seeded sampling through the stages)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ENV
from gkd.errors import GKDError
from gkd.train.metrics import read_metrics
from test_distributed import LORA, check_resume, final_weights, kill_and_resume, run, torchrun_cmd, train_args

pytestmark = pytest.mark.dist

PP2 = ["--pipeline_model_parallel_size", "2"]
RUNS = {  # name: (processes, flags, the single-process run it must equal)
    "pp2": (2, PP2, "single"),  # launched with gkd's own --nproc_per_node
    "pp2xfsdp2": (4, PP2, "single"),
    "pp2xtp2": (4, [*PP2, "--tensor_model_parallel_size", "2"], "single"),
    "pp2-lora": (2, [*PP2, *LORA], "single-lora"),
    "pp2-interleaved": (2, [*PP2, "--virtual_pipeline_model_parallel_size", "2"], "single-4layers"),
    "pp2-gpipe-hand": (2, [*PP2, "--pipeline_schedule", "gpipe", "--pipeline_layers", "1,3"], "single-4layers"),
}


@pytest.fixture(scope="module")
def student4(tiny):
    from tiny import write_model

    return str(write_model(Path(tiny["root"]) / "student4", layers=4, seed=3))


def args_for(tiny, student4, name, out, *extra):
    args = train_args(tiny, out, *extra)
    if "4layers" in name or "interleaved" in name or "gpipe" in name:
        args[args.index("--model") + 1] = student4
    return args


@pytest.fixture(scope="module")
def runs(tiny, student4, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    done = {}
    for name, flags in (("single", []), ("single-lora", LORA), ("single-4layers", [])):
        done[name] = root / name
        run([sys.executable, "-m", "gkd", *args_for(tiny, student4, name, done[name], *flags)])
    for name, (nproc, flags, _) in RUNS.items():
        done[name] = root / name
        args = args_for(tiny, student4, name, done[name], *flags)
        run([sys.executable, "-m", "gkd", *args, "--nproc_per_node", "2"] if name == "pp2" else torchrun_cmd(nproc, args))
    return done


@pytest.mark.parametrize("name", list(RUNS))
def test_pipeline_equals_the_single_process_run(runs, name):
    single = runs[RUNS[name][2]]
    ref, got = read_metrics(single / "metrics.jsonl"), read_metrics(runs[name] / "metrics.jsonl")
    assert [m["on_policy_share"] for m in ref] == [0.0, 1.0, 0.0, 1.0]  # both kinds of step are compared
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])
        assert a["on_policy_share"] == b["on_policy_share"] and a["completion_length"] == b["completion_length"]
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5  # clipping sees the norm over every stage
    w_ref, w = final_weights(single), final_weights(runs[name])  # the export gathers every stage
    assert w_ref.keys() == w.keys()
    for k in w_ref:
        torch.testing.assert_close(w[k], w_ref[k], rtol=0, atol=1e-5, msg=k)
    assert max(float((w[k] - w_ref[k]).abs().max()) for k in w) < 1e-5
    start = {m["step"]: m["loss"] for m in ref}
    assert start[1] != start[3], "training changed nothing"


def test_each_stage_holds_its_share_of_student_optimizer_and_teacher(runs):
    one = read_metrics(runs["single"] / "metrics.jsonl")[-1]
    pp2 = read_metrics(runs["pp2"] / "metrics.jsonl")[-1]
    both = read_metrics(runs["pp2xfsdp2"] / "metrics.jsonl")[-1]
    for key in ("param_mib_per_rank", "optimizer_mib_per_rank"):
        # stage 0: embedding + layer 0; stage 1: layer 1 + norm + lm_head (the tiny student's halves)
        assert 0.45 <= pp2[key] / one[key] <= 0.55, (key, pp2[key], one[key])
        assert 0.2 <= both[key] / one[key] <= 0.3, (key, both[key], one[key])
    # the 3-layer teacher splits 2 + 1 layers (embedding with the 2, lm_head with the 1): 0.64 on the larger stage
    key = "teacher_mib_per_rank"
    assert 0.55 <= pp2[key] / one[key] <= 0.7, (pp2[key], one[key])
    assert 0.3 <= both[key] / one[key] <= 0.45, (both[key], one[key])


@pytest.mark.parametrize("saved,resumed", [("pp2", "single"), ("single", "pp2"), ("pp2-lora", "single-lora"),
                                           ("pp2xtp2", "pp2")])
def test_resume_across_pipeline_sizes(runs, tiny, tmp_path, saved, resumed):
    check_resume(runs, tiny, tmp_path, saved, None if resumed.startswith("single") else RUNS[resumed][:2])


@pytest.mark.parametrize("kind", ["seq-kd-checkpointing", "remote-teacher"])
def test_teacher_sampling_checkpointing_and_a_teacher_server_under_pipeline(tiny, tmp_path, kind):
    """Sequence-level KD (the teacher samples through its own stages) with gradient checkpointing, and a
    teacher server's top-k rows fetched by the last stage: 2 steps (off-, then on-policy) equal one process."""
    server = None
    if kind == "remote-teacher":
        from serving import start_gkd_serve, stop

        server, url = start_gkd_serve(tiny["teacher"])
        extra = ["--teacher_model_server", url, "--gkd_logits_topk", "8"]
    else:
        extra = ["--seq_kd", "true", "--gradient_checkpointing", "true"]
    try:
        outs = {}
        for name, launch in (("one", []), ("pp2", ["--nproc_per_node", "2", *PP2])):
            outs[name] = tmp_path / name
            args = train_args(tiny, outs[name], *extra, *launch)
            args[args.index("--max_steps") + 1] = "2"
            if kind == "remote-teacher":
                i = args.index("--teacher_model")
                del args[i:i + 2]
            run([sys.executable, "-m", "gkd", *args])
    finally:
        if server is not None:
            stop(server)
    ref, got = read_metrics(outs["one"] / "metrics.jsonl"), read_metrics(outs["pp2"] / "metrics.jsonl")
    assert [m["on_policy_share"] for m in got] == [0.0, 1.0]
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and a["completion_length"] == b["completion_length"], (a, b)


def test_pipelined_sampler_equals_hf_generate_token_for_token(tiny, torchrun):
    proc = torchrun(Path(__file__).parent / "dist" / "pipeline_sampler_worker.py", 2, tiny["student"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rank 1: 12 completions equal" in proc.stdout, proc.stdout


def test_a_killed_stage_ends_the_job_and_the_newest_checkpoint_resumes(tiny, tmp_path):
    kill_and_resume(tiny, tmp_path / "killed", PP2, single_resume=False)  # rank 1 holds the last stage


@pytest.mark.parametrize("mistake,message", [
    (["--nproc_per_node", "3", "--pipeline_model_parallel_size", "3"],
     "3 pipeline stages (--pipeline_model_parallel_size x --virtual_pipeline_model_parallel_size) but --model "),
    ([*PP2, "--virtual_pipeline_model_parallel_size", "2"], "4 pipeline stages"),
    ([*PP2, "--pipeline_layers", "1,2"], "--pipeline_layers 1,2: needs 2 counts of at least 1 layer that add up to "
                                         "the 2 decoder layers of --model"),
    ([*PP2, "--pipeline_layers", "2"], "--pipeline_layers 2: needs 2 counts"),
    ([*PP2, "--use_vllm", "true"], "--use_vllm with --pipeline_model_parallel_size 2 is not supported yet"),
    ([*PP2, "--global_batch_size", "2"], "the 1F1B schedule needs at least --pipeline_model_parallel_size 2 "
                                         "micro-batches per step on a data-parallel rank, got 1"),
    ([*PP2, "--virtual_pipeline_model_parallel_size", "2", "--pipeline_schedule", "gpipe"],
     "--pipeline_schedule gpipe has no virtual stages"),
    (["--nproc_per_node", "1", *PP2], "1 process (launch several with torchrun or --nproc_per_node) cannot be split "
                                      "into --pipeline_model_parallel_size 2"),
])
def test_pipeline_mistakes_are_one_line(tiny, tmp_path, mistake, message):
    args = train_args(tiny, tmp_path / "o", "--nproc_per_node", "2", *mistake)
    proc = subprocess.run([sys.executable, "-m", "gkd", *args], capture_output=True, text=True, timeout=120, env=ENV)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn(" not in ln]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (proc.returncode, proc.stderr[-2000:])
    assert not (tmp_path / "o").exists()


def test_split_layers_and_models_that_cannot_be_split():
    from transformers import GPT2Config, LlamaConfig, Qwen2VLConfig

    from gkd.parallel.pipeline import check_config, split_layers

    assert split_layers(5, 2) == [[0, 1, 2], [3, 4]]
    assert split_layers(7, 4) == [[0, 1], [2, 3], [4, 5], [6]]
    assert split_layers(4, 2, "1,3") == [[0], [1, 2, 3]]
    with pytest.raises(GKDError, match="--pipeline_layers 0,4: needs 2 counts of at least 1 layer"):
        split_layers(4, 2, "0,4")
    llama = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    check_config(LlamaConfig(**llama), 2, "", "m")
    with pytest.raises(GKDError, match="llama \\(m\\) ties its lm_head"):
        check_config(LlamaConfig(**llama, tie_word_embeddings=True), 2, "", "m")
    with pytest.raises(GKDError, match="no pipeline plan for gpt2 \\(m\\)"):
        check_config(GPT2Config(n_layer=2), 2, "", "m")
    vl = Qwen2VLConfig(text_config=dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, vocab_size=96))
    with pytest.raises(GKDError, match="no pipeline plan for qwen2_vl"):
        check_config(vl, 2, "", "m")


def test_generation_configs_the_pipelined_sampler_cannot_follow_are_refused(tiny):
    from gkd.models import load_model
    from gkd.rollout.pipelined import check_generation_config

    model = load_model(tiny["student"])
    check_generation_config(model, "--model m")
    model.generation_config.repetition_penalty = 1.3
    with pytest.raises(GKDError, match="--model m: its generation_config.json sets repetition_penalty = 1.3"):
        check_generation_config(model, "--model m")
