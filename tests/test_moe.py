"""Mixture-of-experts students and teachers, and expert parallelism.

Tiny random models (the `moe` fixture): a Qwen3-MoE student (4 experts, top-2, 2 layers) and a Mixtral
teacher. The torchrun runs (the session's, helpers.Runs) train the same 4 steps as one process (seed 42,
lmbda 0.5: steps 1 and 3 off-policy, 2 and 4 seeded on-policy) with the router aux loss on (coefficient 0.01
from the config)."""

import re
from pathlib import Path

import pytest
import torch

from gkd.data.batch import collate
from gkd.errors import GKDError
from gkd.models import adapter_for, apply_lora, load_model
from gkd.teacher.local import LocalTeacher
from gkd.train.metrics import read_metrics
from gkd.models.routing import recording, router_stats
from gkd.train.step import LossArgs, MicroBatch, forward_backward
from helpers import (assert_one_line_mistake, assert_same_run, declare, declare_training, final_weights,
                     gkd_in_process, gkd_subprocess, losses, resumed_from, train_args)
from tiny import write_moe

FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")
SLOW = [pytest.mark.slow, pytest.mark.dist]
moe_args = train_args  # the fixture has the same keys (student, teacher, data) as the tiny models'


# --- the router aux loss ----------------------------------------------------------------------------

def test_router_aux_loss_is_transformers_per_sequence_and_token_weighted(moe):
    model = load_model(moe["student"])
    adapter = adapter_for(model)
    assert adapter.moe and len(adapter.routers(model)) == 2 and adapter.router_aux_loss_coef(model) == 0.01
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 90, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    with torch.no_grad(), recording(adapter.routers(model)) as seen:
        model(input_ids=ids, attention_mask=mask)
    total, load = router_stats(seen, torch.where(mask.bool(), torch.arange(2)[:, None], -1))  # sequence = row
    with torch.no_grad():
        per_row = [float(model(input_ids=ids[b:b + 1, :n], output_router_logits=True).aux_loss) for b, n in ((0, 7), (1, 4))]
    assert abs(float(total) - (7 * per_row[0] + 4 * per_row[1])) < 1e-5
    assert load.shape == (2, 4) and load.sum(1).tolist() == [22.0, 22.0]  # 11 tokens x top-2 per layer
    # the two sequences packed in one row (--packing): each still gets its own value
    packed = collate([ids[0, :3].tolist(), ids[1, :2].tolist()], [ids[0, 3:].tolist(), ids[1, 2:4].tolist()], 0,
                     pack=64)
    assert packed.input_ids.shape == (1, 11)
    with torch.no_grad(), recording(adapter.routers(model)) as seen:
        model(**packed.model_inputs(), use_cache=False)  # (a cache turns off transformers' packed masks)
    total_packed, load_packed = router_stats(seen, packed.sequence_index())
    assert abs(float(total_packed) - float(total)) < 1e-5 and torch.equal(load_packed, load)


def _grads(model, teacher, rows, split, routed):
    model.zero_grad()
    adapter = adapter_for(model)
    args = LossArgs(beta=0.5, temperature=0.9, sft_alpha=0.3, chunk_size=None, router_aux_loss_coef=0.5)
    n_tokens = sum(len(c) for _, c in rows)
    micro = [MicroBatch(collate([p for p, _ in part], [c for _, c in part], 0), [False] * len(part))
             for part in (rows[i:i + split] for i in range(0, len(rows), split))]
    stats = forward_backward(micro, model, adapter, teacher, args, float(n_tokens), skip_empty=True, routed=routed)
    return stats, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_the_update_does_not_depend_on_the_micro_batch_split(moe):
    """The aux loss is a token-weighted mean over the step's sequences, so splitting the step into
    micro-batches (or ranks) gives the same gradient; a mean per micro-batch would not."""
    model, teacher = load_model(moe["student"]), LocalTeacher(load_model(moe["teacher"]), torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    rows = [(torch.randint(5, 90, (int(n),), generator=g).tolist(), torch.randint(5, 90, (3,), generator=g).tolist())
            for n in (3, 6, 2, 5)]
    routed = float(sum(len(p) + len(c) for p, c in rows))
    whole, g_whole = _grads(model, teacher, rows, 4, routed)
    split, g_split = _grads(model, teacher, rows, 1, routed)
    assert abs(float(whole[0]) - float(split[0])) < 1e-6 and abs(float(whole[5]) - float(split[5])) < 1e-6
    assert torch.equal(whole[6:], split[6:])  # the expert load counts
    router = [n for n in g_whole if "mlp.gate" in n]
    assert router and g_whole.keys() == g_split.keys()
    for n in g_whole:
        torch.testing.assert_close(g_split[n], g_whole[n], rtol=0, atol=1e-6, msg=n)
    # the aux loss reaches the router: without it its gradient differs
    model.zero_grad()
    args = LossArgs(beta=0.5, temperature=0.9, sft_alpha=0.3, chunk_size=None, router_aux_loss_coef=0.0)
    micro = [MicroBatch(collate([p for p, _ in rows], [c for _, c in rows], 0), [False] * 4)]
    forward_backward(micro, model, adapter_for(model), teacher, args, 12.0, skip_empty=True, routed=routed)
    assert float((model.get_parameter(router[0]).grad - g_whole[router[0]]).abs().max()) > 1e-6


# --- the weights vLLM and the export see --------------------------------------------------------------

@pytest.mark.parametrize("family", [*FAMILIES, "gpt_oss"])
def test_vllm_weights_are_the_folders_tensors(tmp_path, family):
    """The weight sync sends each family's fused expert tensors as the per-expert matrices its folders
    hold (the names vLLM's loader reads; GPT-OSS's folders hold them fused, with their biases and the sinks),
    and LoRA on the experts merged as PEFT merges it."""
    from safetensors.torch import load_file

    from families import write_family
    from gkd.models.export import export_weights

    folder = write_moe(tmp_path / family, family, seed=3) if family in FAMILIES else \
        write_family(tmp_path / family, family, seed=3)
    disk = load_file(str(folder / "model.safetensors"))
    sent = dict(export_weights(load_model(str(folder))))
    assert sent.keys() == disk.keys()
    for k in disk:
        assert torch.equal(sent[k], disk[k]), k
    lora = apply_lora(load_model(str(folder)), 4, 8, 0.0, "all-linear", 0)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    wrapped = any(hasattr(m, "parameter_name") for m in lora.modules())  # PEFT adapts the experts' tensors
    assert wrapped or family in ("qwen2_moe", "gpt_oss")  # (PEFT's all-linear leaves their experts alone)
    sent = dict(export_weights(lora))
    lora.merge_and_unload().save_pretrained(str(tmp_path / "merged"))
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert sent.keys() == merged.keys()
    assert any(not torch.equal(merged[k], disk[k]) for k in disk if ".experts." in k) == wrapped
    for k in merged:
        torch.testing.assert_close(sent[k], merged[k], rtol=1e-6, atol=1e-6, msg=k)


def test_lora_experts_false_keeps_experts_and_router_frozen(moe):
    lora = apply_lora(load_model(moe["student"]), 4, 8, 0.0, "all-linear", 0, experts=False)
    trained = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trained and all("self_attn" in n for n in trained), trained


# --- mistakes ------------------------------------------------------------------------------------------

def test_expert_parallel_checks():
    from gkd.parallel.mesh import expert_size

    with pytest.raises(GKDError, match="needs 2 processes"):
        expert_size(2, 1, 1, 1, 1)
    with pytest.raises(GKDError, match="must divide the data-parallel shard size 3"):
        expert_size(2, 3, 1, 3, 1)
    with pytest.raises(GKDError, match="tensor_model_parallel_size 2 needs EP to take every data- and context-parallel"):
        expert_size(2, 8, 1, 4, 2)
    assert expert_size(2, 4, 1, 2, 2) == 2
    with pytest.raises(GKDError, match="must divide the data-parallel shard size 1"):
        expert_size(2, 2, 2, 1, 1)  # replicas hold whole copies: EP splits the shard ranks
    assert expert_size(2, 4, 1, 4, 1) == 2
    # context-parallel peers are EP ranks too: dp_shard x cp
    assert expert_size(2, 2, 1, 1, 1, cp=2) == 2 and expert_size(4, 4, 1, 2, 1, cp=2) == 4
    with pytest.raises(GKDError, match="must divide the data-parallel shard x context-parallel size 6"):
        expert_size(4, 6, 1, 3, 1, cp=2)


@pytest.mark.parametrize("model,extra,message", [
    pytest.param("dense", [], "--expert_model_parallel_size 2: LlamaForCausalLM has no experts (a dense model)",
                 marks=SLOW, id="dense-real-command"),
    ("odd", [], "--expert_model_parallel_size 2: Qwen3MoeForCausalLM has 3 experts per layer, which 2 does not divide"),
    ("student", ["--train_type", "lora"], "with LoRA on the experts is not supported yet; pass --lora_experts false"),
])
def test_expert_parallel_mistakes_are_one_line(moe, tmp_path, request, model, extra, message):
    """Each caught before any process starts: in this process, but for one real command."""
    args = moe_args(moe, tmp_path / "o", "--nproc_per_node", "2", "--expert_model_parallel_size", "2", *extra)
    args[args.index("--model") + 1] = moe[model]
    real = request.node.get_closest_marker("slow") is not None
    assert_one_line_mistake(gkd_subprocess(*args, timeout=180) if real else gkd_in_process(*args), message)
    assert not (tmp_path / "o" / "final").exists()


# --- expert parallel equals one process ---------------------------------------------------------------

LORA = ["--train_type", "lora", "--lora_rank", "4", "--lora_dropout", "0", "--merge_lora", "true",
        "--lora_experts", "false"]
MESHES = {  # name: (processes, flags, the single-process run it must equal)
    "ep2": (2, ["--expert_model_parallel_size", "2"], "moe-single"),
    "ep2xfsdp2": (4, ["--expert_model_parallel_size", "2", "--micro_batch_size", "1"], "moe-single"),
    "ep2xdp2": (4, ["--expert_model_parallel_size", "2", "--data_parallel_replicate_size", "2", "--micro_batch_size",
                    "1"], "moe-single"),  # HSDP: two replicas of an EP 2 group
    "ep2xtp2": (4, ["--expert_model_parallel_size", "2", "--tensor_model_parallel_size", "2"], "moe-single"),
    "ep2-lora": (2, ["--expert_model_parallel_size", "2", *LORA], "moe-single-lora"),
    # context parallel: the EP group taken from the context-parallel peers (their tokens), and with FSDP 2 beside
    "ep2xcp2": (2, ["--expert_model_parallel_size", "2", "--context_parallel_size", "2"], "moe-single"),
    "ep2xcp2xfsdp2": (4, ["--expert_model_parallel_size", "2", "--context_parallel_size", "2", "--micro_batch_size",
                          "1"], "moe-single"),
}
declare_training("moe-single", 1, models="moe")
declare_training("moe-single-lora", 1, LORA, models="moe")
for _name, (_nproc, _flags, _) in MESHES.items():
    declare_training(_name, _nproc, _flags, models="moe")
declare("resume-ep2-on-single", 1, resumed_from("ep2", models="moe"), after=("ep2",), mkdir=True)
PIPELINES = {  # name: (processes, flags): a layer per stage, alone, with FSDP 2, TP 2 and EP 2
    "pp2": (2, ["--pipeline_model_parallel_size", "2"]),
    "pp2xfsdp2": (4, ["--pipeline_model_parallel_size", "2", "--micro_batch_size", "1"]),
    "pp2xtp2": (4, ["--pipeline_model_parallel_size", "2", "--tensor_model_parallel_size", "2"]),
    "pp2xep2": (4, ["--pipeline_model_parallel_size", "2", "--expert_model_parallel_size", "2", "--micro_batch_size",
                    "1"]),  # each stage's experts split over its two data-parallel ranks
    # packed rows: the routing sums ride per sequence, not per row
    "pp2-packed": (2, ["--pipeline_model_parallel_size", "2", "--packing", "true", "--packing_length", "24"]),
    # each stage's routing sums of its rank's tokens, summed over the context-parallel group on the last stage
    "pp2xcp2": (4, ["--pipeline_model_parallel_size", "2", "--context_parallel_size", "2"]),
}
for _name, (_nproc, _flags) in PIPELINES.items():
    declare_training(f"moe-{_name}", _nproc, _flags, models="moe")
# EP 2 with gradient checkpointing, in the launch of the other EP 2 runs, counting the experts' recomputations
declare("ep2-checkpointing", 2, lambda c, out: train_args(c.models("moe"), out, *MESHES["ep2"][1],
                                                          "--gradient_checkpointing", "true"),
        call="helpers:counting_recomputed_experts")


@pytest.mark.parametrize("layout", list(PIPELINES))
@pytest.mark.slow
@pytest.mark.dist
def test_a_pipeline_equals_one_process_with_the_router_loss_over_its_stages(runs, layout):
    """PP = 2 (a layer per stage), alone and with FSDP 2 or TP 2: each stage adds its layer's routing sums to the
    rows' and the last forms the router aux loss from them, so the losses, weights, router aux loss and expert
    load are one process's."""
    ref, got, _ = assert_same_run(runs["moe-single"], runs[f"moe-{layout}"])
    for a, b in zip(ref, got):
        assert abs(a["router_aux_loss"] - b["router_aux_loss"]) <= 1e-5 and a["expert_load"] == b["expert_load"]


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.slow
@pytest.mark.dist
def test_expert_parallel_equals_one_process(runs, moe, mesh):
    ref, got, w = assert_same_run(runs[MESHES[mesh][2]], runs[mesh])  # losses and final weights within 1e-5
    for a, b in zip(ref, got):
        assert abs(a["router_aux_loss"] - b["router_aux_loss"]) <= 1e-5 and a["expert_load"] == b["expert_load"]
        assert 1.0 <= a["expert_load"] <= 2.0 and 1.9 < a["router_aux_loss"] < 2.5  # top-2 of 4: 2 when balanced
    assert any(".experts.3.down_proj" in k for k in w)  # the export holds every expert
    from safetensors.torch import load_file

    start = load_file(str(Path(moe["student"]) / "model.safetensors"))
    changed = {k for k in start if float((w[k] - start[k]).abs().max()) > 1e-4}
    experts = {k for k in start if ".experts." in k}
    if "lora" in mesh:  # --lora_experts false: the experts stay as loaded, the attention is adapted
        assert changed and not changed & experts
    else:
        assert experts <= changed


@pytest.mark.slow
@pytest.mark.dist
def test_expert_parameters_and_optimizer_state_per_rank_are_split(runs):
    one = read_metrics(runs["moe-single"] / "metrics.jsonl")[-1]
    for mesh, share in (("ep2", 1 / 2), ("ep2xfsdp2", 1 / 4), ("ep2xdp2", 1 / 2), ("ep2xtp2", 1 / 2)):
        m = read_metrics(runs[mesh] / "metrics.jsonl")[-1]
        for key in ("expert_param_mib_per_rank", "expert_optimizer_mib_per_rank"):
            assert 0.9 * share <= m[key] / one[key] <= 1.1 * share, (mesh, key, m[key], one[key])
        assert m["teacher_mib_per_rank"] < 0.75 * one["teacher_mib_per_rank"]


@pytest.mark.slow
@pytest.mark.dist
def test_resume_an_expert_parallel_checkpoint_on_one_process(runs):
    out = runs["resume-ep2-on-single"]
    ref, got = losses(runs["moe-single"]), losses(out)
    assert sorted(got) == [3, 4]  # step 3 is off-policy, step 4 on-policy
    for step in (3, 4):
        assert abs(got[step] - ref[step]) <= 1e-5, (step, got[step], ref[step])
    w_ref, w = final_weights(runs["moe-single"]), final_weights(out)
    for k in w_ref:
        torch.testing.assert_close(w[k], w_ref[k], rtol=0, atol=1e-5, msg=k)


@pytest.mark.slow
@pytest.mark.dist
def test_gradient_checkpointing_under_expert_parallel_changes_nothing(runs):
    """--gradient_checkpointing true at EP = 2: the experts' forwards (their all-to-alls too) run again in backward
    on every rank, and the losses, gradient norms, router aux loss, expert load and final weights equal those of
    the same run without checkpointing."""
    said = re.findall(r"experts recomputed (\d+) of (\d+) forwards", runs.stdout("ep2-checkpointing"))
    assert len(said) == 2 and all(int(n) > 0 for n, _ in said), runs.output("ep2-checkpointing")[-3000:]
    ref, got, _ = assert_same_run(runs["ep2"], runs["ep2-checkpointing"])  # losses and final weights within 1e-5
    for a, b in zip(ref, got):
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 and abs(a["router_aux_loss"] - b["router_aux_loss"]) <= 1e-5
        assert a["expert_load"] == b["expert_load"]
