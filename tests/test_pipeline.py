"""Pipeline parallelism (torchrun, gloo on 127.0.0.1) equals one process, on- and off-policy, alone and with
FSDP, TP and LoRA; checkpoints move between pipeline sizes; mistakes are one line.

The runs take helpers.train_args: seed 42, lmbda 0.5, so steps 1 and 3 are off-policy and steps 2 and 4
on-policy (seeded sampling through the stages); they are the session's (helpers.Runs), shared with the other
files that compare against the same single-process runs."""

from pathlib import Path

import pytest
from safetensors.torch import load_file

from gkd.errors import GKDError
from gkd.train.metrics import read_metrics
from helpers import (LORA, assert_one_line_mistake, assert_same_run, check_resume, declare, declare_training,
                     gkd_in_process, gkd_subprocess, kill_and_resume, resumed_from, set_arg, train_args)

SLOW = [pytest.mark.slow, pytest.mark.dist]
PP2 = ["--pipeline_model_parallel_size", "2"]
RUNS = {  # name: (processes, flags, the single-process run it must equal, the models)
    "pp2": (2, PP2, "single", "tiny"),
    "pp2xfsdp2": (4, PP2, "single", "tiny"),
    "pp2xtp2": (4, [*PP2, "--tensor_model_parallel_size", "2"], "single", "tiny"),
    "pp2-lora": (2, [*PP2, *LORA], "single-lora", "tiny"),
    # a 4-layer student: 2 virtual stages per rank, and uneven hand-set stages
    "pp2-interleaved": (2, [*PP2, "--virtual_pipeline_model_parallel_size", "2"], "single-4layers", "tiny4"),
    "pp2-gpipe-hand": (2, [*PP2, "--pipeline_schedule", "gpipe", "--pipeline_layers", "1,3"], "single-4layers", "tiny4"),
    # lm_head tied to the embedding: a copy on each end stage, gradients summed, the norm (clipping at 0.1) counts
    # the weight once
    "pp2-tied": (2, [*PP2, "--max_grad_norm", "0.1"], "single-tied", "tied"),
    # packed rows (one to three sequences a row; micro-batches of different row counts, topped up with empty rows):
    # the padded single process's run
    "pp2-packed": (2, [*PP2, "--packing", "true", "--packing_length", "24"], "single", "tiny"),
    # each stage runs its context-parallel rank's tokens; attention gathers the peer's keys
    "pp2xcp2": (4, [*PP2, "--context_parallel_size", "2"], "single", "tiny"),
}
declare_training("single-4layers", 1, models="tiny4")
declare_training("single-tied", 1, ["--max_grad_norm", "0.1"], models="tied")
for _name, (_nproc, _flags, _, _models) in RUNS.items():
    declare_training(_name, _nproc, _flags, models=_models)

RESUMES = [("pp2", "single"), ("single", "pp2"), ("pp2-lora", "single-lora"), ("pp2xtp2", "pp2"),
           ("single-tied", "pp2-tied"), ("pp2-tied", "single-tied")]  # (tied: the copy's optimizer state moves)
for _saved, _on in RESUMES:  # the saved run's step-2 checkpoint, resumed on one process or on 2 stages
    declare(f"resume-{_saved}-on-{_on}", 1 if _on.startswith("single") else RUNS[_on][0],
            resumed_from(_saved, models="tied" if "tied" in _saved else "tiny", lora=LORA if "lora" in _saved else [],
                         flags=RUNS[_on][1] if _on in RUNS else ["--max_grad_norm", "0.1"] if "tied" in _on else []),
            after=(_saved,), mkdir=True)

# --freeze_parameters leaving the first stage (the tiny student's embedding and layer 0) nothing to train
FROZEN = ["--freeze_parameters", "model.embed_tokens", "model.layers.0."]
declare_training("single-frozen", 1, FROZEN)
declare_training("pp2-frozen", 2, [*PP2, *FROZEN])
declare("resume-pp2-frozen", 2, resumed_from("pp2-frozen", flags=[*PP2, *FROZEN]), after=("pp2-frozen",), mkdir=True)


def _teacher_sampling_or_server(kind: str, launch: list[str]):
    """2 steps (off-, then on-policy): sequence-level KD with gradient checkpointing, or a teacher server's top-k
    rows (the session's `gkd serve` of the tiny teacher)."""
    def args(c, out):
        if kind == "remote-teacher":
            extra = ["--teacher_model_server", c.server, "--gkd_logits_topk", "8"]
        else:
            extra = ["--seq_kd", "true", "--gradient_checkpointing", "true"]
        args = set_arg(train_args(c.models("tiny"), out, *extra, *launch), "--max_steps", "2")
        if kind == "remote-teacher":
            i = args.index("--teacher_model")
            del args[i:i + 2]
        return args

    return args


for _kind in ("seq-kd-checkpointing", "remote-teacher"):
    declare(f"{_kind}-single", 1, _teacher_sampling_or_server(_kind, []))
    declare(f"{_kind}-pp2", 2, _teacher_sampling_or_server(_kind, PP2))
declare("pipelined-sampler", 2, lambda c, out: [c.models("tiny")["student"]], call="pipeline_sampler_worker:run")


@pytest.mark.parametrize("name", list(RUNS))
@pytest.mark.slow
@pytest.mark.dist
def test_pipeline_equals_the_single_process_run(runs, name):
    """Every step's loss and gradient norm, and the final weights, equal one process's; and the weights moved
    (by 3e-3 or more, where the runs agree within 1e-5): every one, or with LoRA every adapted projection."""
    single = runs[RUNS[name][2]]
    ref, got, w = assert_same_run(single, runs[name])  # the export gathers every stage
    for a, b in zip(ref, got):
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5  # clipping sees the norm over every stage
    initial = load_file(str(Path(runs.ctx.models(RUNS[name][3])["student"]) / "model.safetensors"))
    trained = [k for k in initial if "lora" not in name or k.endswith("proj.weight")]
    moved = {k: float((w[k] - initial[k]).abs().max()) for k in trained}
    assert trained and min(moved.values()) > 1e-3, {k: d for k, d in moved.items() if d <= 1e-3}  # (unmoved)


@pytest.mark.slow
@pytest.mark.dist
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


@pytest.mark.slow
@pytest.mark.dist
def test_a_wholly_frozen_stage_trains_saves_and_resumes_as_one_process(runs):
    """A stage whose weights are all frozen holds no optimizer state: the run equals one process's step for step,
    the frozen weights end as loaded, the trained ones moved, and its step-2 checkpoint resumes to the same steps."""
    import torch

    _, _, w = assert_same_run(runs["single-frozen"], runs["pp2-frozen"])
    initial = load_file(str(Path(runs.ctx.models("tiny")["student"]) / "model.safetensors"))
    frozen = {k for k in initial if k.startswith(("model.embed_tokens", "model.layers.0."))}
    assert frozen and all(torch.equal(w[k], initial[k]) for k in frozen)
    assert min(float((w[k] - initial[k]).abs().max()) for k in initial.keys() - frozen) > 1e-3
    check_resume(runs["resume-pp2-frozen"], runs["single-frozen"])


@pytest.mark.parametrize("saved,resumed", RESUMES)
@pytest.mark.slow
@pytest.mark.dist
def test_resume_across_pipeline_sizes(runs, saved, resumed):
    reference = "single-lora" if "lora" in saved else "single-tied" if "tied" in saved else "single"
    check_resume(runs[f"resume-{saved}-on-{resumed}"], runs[reference])


@pytest.mark.parametrize("kind", ["seq-kd-checkpointing", "remote-teacher"])
@pytest.mark.slow
@pytest.mark.dist
def test_teacher_sampling_checkpointing_and_a_teacher_server_under_pipeline(runs, kind):
    """Sequence-level KD (the teacher samples through its own stages) with gradient checkpointing, and a
    teacher server's top-k rows fetched by the last stage: 2 steps (off-, then on-policy) equal one process."""
    ref = read_metrics(runs[f"{kind}-single"] / "metrics.jsonl")
    got = read_metrics(runs[f"{kind}-pp2"] / "metrics.jsonl")
    assert [m["on_policy_share"] for m in got] == [0.0, 1.0]
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and a["completion_length"] == b["completion_length"], (a, b)


@pytest.mark.slow
@pytest.mark.dist
def test_pipelined_sampler_equals_hf_generate_token_for_token(runs):
    assert "rank 1: 12 completions equal" in runs.stdout("pipelined-sampler"), runs.output("pipelined-sampler")


@pytest.mark.slow
@pytest.mark.dist
def test_a_killed_stage_ends_the_job_and_the_newest_checkpoint_resumes(tiny, tmp_path):
    kill_and_resume(tiny, tmp_path / "killed", PP2, single_resume=False)  # rank 1 holds the last stage


@pytest.mark.parametrize("mistake,message", [
    pytest.param(["--nproc_per_node", "3", "--pipeline_model_parallel_size", "3"],
                 "3 pipeline stages (--pipeline_model_parallel_size x --virtual_pipeline_model_parallel_size) but "
                 "--model ", marks=SLOW, id="stages-real-command"),
    ([*PP2, "--virtual_pipeline_model_parallel_size", "2"], "4 pipeline stages"),
    ([*PP2, "--pipeline_layers", "1,2"], "--pipeline_layers 1,2: needs 2 counts of at least 1 layer that add up to "
                                         "the 2 decoder layers of --model"),
    ([*PP2, "--pipeline_layers", "2"], "--pipeline_layers 2: needs 2 counts"),
    ([*PP2, "--use_vllm", "true"], "--use_vllm --vllm_mode colocate with --pipeline_model_parallel_size 2: an engine"),
    ([*PP2, "--global_batch_size", "2"], "the 1F1B schedule needs at least --pipeline_model_parallel_size 2 "
                                         "micro-batches per step on a data-parallel rank, got 1"),
    ([*PP2, "--virtual_pipeline_model_parallel_size", "2", "--pipeline_schedule", "gpipe"],
     "--pipeline_schedule gpipe has no virtual stages"),
    (["--nproc_per_node", "1", *PP2], "1 process (launch several with torchrun or --nproc_per_node) cannot be split "
                                      "into --pipeline_model_parallel_size 2"),
])
def test_pipeline_mistakes_are_one_line(tiny, tmp_path, request, mistake, message):
    """Each caught before any process starts: in this process, but for one real command."""
    args = train_args(tiny, tmp_path / "o", "--nproc_per_node", "2", *mistake)
    real = request.node.get_closest_marker("slow") is not None
    assert_one_line_mistake(gkd_subprocess(*args, timeout=120) if real else gkd_in_process(*args), message)
    assert not (tmp_path / "o").exists()


def test_split_layers_and_models_that_cannot_be_split():
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig, Qwen2VLConfig, Qwen3VLConfig

    from gkd.parallel.pipeline import check_config, split_layers

    assert split_layers(5, 2) == [[0, 1, 2], [3, 4]]
    assert split_layers(7, 4) == [[0, 1], [2, 3], [4, 5], [6]]
    assert split_layers(4, 2, "1,3") == [[0], [1, 2, 3]]
    with pytest.raises(GKDError, match="--pipeline_layers 0,4: needs 2 counts of at least 1 layer"):
        split_layers(4, 2, "0,4")
    llama = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    check_config(LlamaConfig(**llama), 2, "", "m")
    check_config(LlamaConfig(**llama, tie_word_embeddings=True), 2, "", "m")  # tied: a copy on each end stage
    with pytest.raises(GKDError, match="no pipeline plan for gpt2 \\(m\\)"):
        check_config(GPT2Config(n_layer=2), 2, "", "m")
    vl = Qwen2VLConfig(text_config=dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, vocab_size=96))
    check_config(vl, 2, "", "m")  # the first stage runs the vision tower; every stage takes the M-RoPE positions
    gemma3 = dict(llama, head_dim=8, num_key_value_heads=4)
    check_config(Gemma3TextConfig(**gemma3), 2, "", "m")
    with pytest.raises(GKDError, match="no pipeline plan for gemma3_text .*use_bidirectional_attention masks"):
        check_config(Gemma3TextConfig(**gemma3, use_bidirectional_attention=True), 2, "", "m")
    # Qwen3-VL: the layers DeepStack adds to (2 here) stay on the first stage, which runs the vision tower
    assert split_layers(3, 2, first=2) == [[0, 1], [2]] and split_layers(6, 3, first=3) == [[0, 1, 2], [3, 4], [5]]
    assert split_layers(6, 2, first=2) == [[0, 1, 2], [3, 4, 5]]  # balanced already holds them
    q3 = Qwen3VLConfig(text_config=dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, vocab_size=96),
                       vision_config=dict(depth=2, deepstack_visual_indexes=[0, 1]))
    check_config(q3, 2, "", "m")
    with pytest.raises(GKDError, match="--pipeline_layers 1,2: the first stage of m must hold its first 2 decoder"):
        check_config(q3, 2, "1,2", "m")
    with pytest.raises(GKDError, match="3 pipeline stages but m has 3 decoder layers, of which the first stage must "
                                       "hold 2"):
        check_config(q3, 3, "", "m")


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_a_vision_language_models_later_stage_holds_no_vision_modules(tmp_path, family):
    """The first stage holds the vision tower and projector (as stage modules: FSDP shards them with it); a later
    stage drops them, still finds its lm_head (transformers looks for it through the dropped embedding) and
    gives FSDP its decoder layers as units."""
    from types import SimpleNamespace

    from families import write_family
    from gkd.models import load_model
    from gkd.models.adapter import adapter_for
    from gkd.parallel.pipeline import split

    folder = write_family(tmp_path / family, family, layers=2, seed=2)
    first, later = (load_model(str(folder), "float32") for _ in range(2))
    adapter = adapter_for(first)
    vision = {id(p) for m in (adapter.vision_tower(first), adapter.aligner(first)) for p in m.parameters()}
    stage = split(first, SimpleNamespace(pp=2, pp_rank=0, pp_group=None)).stages[0]
    assert {id(p) for p in stage.vision.parameters()} == vision
    split(later, SimpleNamespace(pp=2, pp_rank=1, pp_group=None))
    assert adapter.vision_tower(later) is None and adapter.aligner(later) is None
    assert not any(w in n for n, _ in later.named_parameters() for w in ("visual", "vision", "projector"))
    assert adapter.lm_head(later) is later.lm_head.weight
    assert [type(u).__name__ for u in adapter.fsdp_units(later)] == [type(adapter.decoder(later).layers["1"]).__name__]


def test_a_stage_decodes_a_prompt_with_an_image_as_hf_generate(tmp_path):
    """One Qwen2-VL stage holding every layer, fed as the pipelined sampler feeds its stages (the image at the
    prompt, the prompt's M-RoPE positions, then the counted positions plus the image's offset), gives HF
    generate's logits at each new token (an image of 4 tokens spanning 2 positions: an offset of -2)."""
    import torch
    from PIL import Image
    from torch import nn
    from transformers import AutoImageProcessor, DynamicCache

    from families import write_family
    from gkd.models import load_model
    from gkd.models.adapter import adapter_for
    from gkd.parallel.pipeline import Stage
    from gkd.rollout.pipelined import _positions

    folder = write_family(tmp_path / "vl", "qwen2_vl", layers=2, seed=2)
    model = load_model(str(folder), "float32").eval()
    adapter = adapter_for(model)
    image = Image.fromarray(torch.randint(0, 255, (56, 42, 3), dtype=torch.uint8).numpy())
    images = dict(AutoImageProcessor.from_pretrained(str(folder))(images=[image], return_tensors="pt"))
    tok = model.config.image_token_id
    ids = torch.tensor([[0, 27, 28, tok, tok, tok, tok, 29, 30], [31, 32, 33, 34, 35, 36, 37, 38, 39]])
    attention = (ids != 0).long()
    attention[1] = 1
    with torch.no_grad():
        hf = model.generate(**adapter.prepare(model, {"input_ids": ids, "attention_mask": attention, **images}),
                            max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
        prompt, offset = adapter.stage_position_ids(model, ids, attention, images)
        assert offset.tolist() == [[-2], [0]]
        body = adapter.decoder(model)
        body.layers = nn.ModuleDict({str(i): layer for i, layer in enumerate(body.layers)})
        stage = Stage(model, list(range(len(body.layers))), first=True, last=True)
        cache, x = DynamicCache(config=stage.config), ids
        for k in range(3):
            positions = _positions(attention, x.shape[1], prompt if k == 0 else None, offset)
            h = stage(x, attention_mask=attention, position_ids=positions, cache=cache, images=images if k == 0 else None)
            logits = stage.head().through(stage.lm_head, h[:, -1:, :])[:, -1].float()
            assert torch.allclose(logits, hf.logits[k], atol=1e-5), (k, float((logits - hf.logits[k]).abs().max()))
            x = hf.sequences[:, ids.shape[1] + k:][:, :1]
            attention = torch.cat([attention, attention.new_ones(2, 1)], dim=1)


def test_generation_configs_the_pipelined_sampler_cannot_follow_are_refused(tiny):
    from gkd.models import load_model
    from gkd.rollout.pipelined import check_generation_config

    model = load_model(tiny["student"])
    check_generation_config(model, "--model m")
    model.generation_config.repetition_penalty = 1.3
    with pytest.raises(GKDError, match="--model m: its generation_config.json sets repetition_penalty = 1.3"):
        check_generation_config(model, "--model m")
