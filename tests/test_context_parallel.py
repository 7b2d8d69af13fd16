"""Context parallelism: sequences split over ranks train exactly like one process (full-vocabulary,
local top-k and remote teachers; with FSDP and TP), resume across CP sizes, and the split itself.

The runs are the session's (helpers.Runs); the full-vocabulary reference is the single-process run the other
layouts compare against too."""

import pytest
import torch

from families import write_family
from helpers import (TESTS, assert_one_line_error, declare, declare_training, final_weights, gkd_in_process, losses,
                     train_args)

TOL = 1e-5
CP2 = ["--context_parallel_size", "2"]
TOPK = ["--gkd_logits_topk", "5"]
REFERENCE = {"full": "single", "topk": "single-topk"}  # one-process runs, by teacher kind
declare_training("single-topk", 1, TOPK)
MESHES = {  # name: (processes, flags, teacher kind)
    "cp2": (2, CP2, "full"),
    "cp2-topk": (2, [*CP2, *TOPK], "topk"),
    "cp2xfsdp2": (4, CP2, "full"),
    "cp2xtp2": (4, [*CP2, "--tensor_model_parallel_size", "2"], "full"),
}
for _name, (_nproc, _flags, _) in MESHES.items():
    declare_training(_name, _nproc, _flags)


def _remote(*flags):
    """Against the session's `gkd serve` of the tiny teacher, its top-5 rows."""
    return lambda c, out: train_args(c.models("tiny"), out, "--teacher_model", "", "--teacher_model_server", c.server,
                                     "--gkd_logits_topk", "5", *flags)


declare("cp-remote-single", 1, _remote())
declare("cp2-remote", 2, _remote(*CP2))
# 2 steps on CP 2, then resumed in the same folder on one process
declare_training("cp2-2-steps", 2, [*CP2, "--max_steps", "2"])
declare("cp2-2-steps-resumed", 1, lambda c, out: train_args(c.models("tiny"), c.out("cp2-2-steps"),
                                                            "--resume_from_checkpoint", "latest"),
        after=("cp2-2-steps",))
# the tiny Llama, Gemma 2, whose soft-capped attention scores take the split attention's masked path, and GPT-OSS,
# whose attention sinks do too
declare("cp-split-2", 2, lambda c, out: [c.models("tiny")["teacher"], str(write_family(out / "gemma2", "gemma2")),
                                         str(write_family(out / "gpt_oss", "gpt_oss"))], call="split_worker:run")


def _mistral(c) -> dict:
    """A Mistral pair of the tiny Llama's sizes, with a 4-token sliding window (which takes the split attention's
    masked path), and the tiny data; written once."""
    from transformers import MistralConfig, MistralForCausalLM

    from tiny import write_tokenizer

    def make():
        pair = {"data": c.models("tiny")["data"]}
        for side, layers, seed in (("student", 2, 2), ("teacher", 3, 1)):
            folder = c.root / "models-mistral" / side
            torch.manual_seed(seed)
            MistralForCausalLM(MistralConfig(
                vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, sliding_window=4, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=4, pad_token_id=0)).save_pretrained(str(folder))
            write_tokenizer(folder)
            pair[side] = str(folder)
        return pair

    return c.once("cp-mistral", make)


declare("cp-mistral-single", 1, lambda c, out: train_args(_mistral(c), out))
declare("cp2-mistral", 2, lambda c, out: train_args(_mistral(c), out, *CP2))


# a mixture-of-experts student (Qwen3-MoE, router loss on): each sequence's routing sums cross the ranks
declare_training("moe-single", 1, models="moe")
declare_training("cp2-moe", 2, CP2, models="moe")


def assert_same(a, b):
    la, lb = losses(a), losses(b)
    assert sorted(la) == [1, 2, 3, 4] and all(abs(la[s] - lb[s]) <= TOL for s in la), (la, lb)
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=TOL, msg=k)


@pytest.mark.parametrize("name", list(MESHES))
@pytest.mark.slow
@pytest.mark.dist
def test_context_parallel_equals_one_process(runs, name):
    assert_same(runs[REFERENCE[MESHES[name][2]]], runs[name])


@pytest.mark.slow
@pytest.mark.dist
def test_context_parallel_equals_one_process_for_another_family(runs):
    """Mistral, whose sliding window takes the split attention's masked path (Llama's takes the CPU flash path)."""
    assert_same(runs["cp-mistral-single"], runs["cp2-mistral"])


@pytest.mark.slow
@pytest.mark.dist
def test_context_parallel_with_a_remote_teacher(runs):
    one, two = runs["cp-remote-single"], runs["cp2-remote"]
    assert_same(one, two)
    la, lt = losses(one), losses(runs["single-topk"])  # the server's rows are the local top-k teacher's
    assert all(abs(la[s] - lt[s]) <= TOL for s in la), (la, lt)


@pytest.mark.slow
@pytest.mark.dist
def test_resume_across_context_parallel_sizes(runs):
    runs["cp2-2-steps-resumed"]
    ref, got = losses(runs["single"]), losses(runs["cp2-2-steps"])
    assert all(abs(got[s] - ref[s]) <= TOL for s in (3, 4)), (got, ref)


@pytest.mark.parametrize("nproc", [2, 3])
@pytest.mark.slow
@pytest.mark.dist
def test_split_attention_equals_whole_sequence_hidden_states(tiny, runs, torchrun, nproc):
    """tests/dist/split_worker.py: on 2 ranks in the session's 2-process launch, on 3 in a launch of its own."""
    if nproc == 2:
        out = runs.stdout("cp-split-2")  # (every rank succeeded)
    else:
        proc = torchrun(TESTS / "dist" / "split_worker.py", nproc, tiny["teacher"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = proc.stdout
    assert out.count("ERR") == nproc * (3 if nproc == 2 else 1)


def test_context_parallel_refuses_what_it_cannot_split(tiny, tmp_path):
    proc = gkd_in_process("train", "--model", tiny["student"], "--teacher_model", tiny["teacher"], "--dataset",
                          tiny["data"], "--output_dir", str(tmp_path / "o"), "--context_parallel_size", "3",
                          "--global_batch_size", "8")
    assert_one_line_error(proc, "cannot be split into --tensor_model_parallel_size 1 x --context_parallel_size 3")
    assert not (tmp_path / "o").exists()


def _recurrent(c, out):
    """families_worker's arguments: Qwen3-Next (Gated DeltaNet beside gated attention) at CP 2."""
    from tiny import write_dataset, write_image_dataset

    for side, layers, seed in (("student", 2, 2), ("teacher", 3, 1)):
        write_family(out / "models" / "qwen3_next" / side, "qwen3_next", layers=layers, seed=seed)
    return [str(write_dataset(out / "train.jsonl", n=8, seed=3)),
            str(write_image_dataset(out / "images" / "train.jsonl", n=8, seed=3)), "cp", str(out / "models"),
            "qwen3_next"]


declare("recurrent-cp2", 2, _recurrent, call="families_worker:run", mkdir=True)


@pytest.mark.slow
@pytest.mark.dist
def test_a_recurrent_family_under_context_parallelism_equals_naive(runs):
    """Qwen3-Next's Gated DeltaNet runs a recurrence (and a causal conv1d) over the sequence, which a split would
    cut: each of its layers runs on the whole sequences gathered from the ranks and keeps this rank's tokens, the
    gated attention layers split as any. An off-policy and an on-policy step at CP 2 equal the naive float64 steps
    of the whole models (student and teacher both of the family)."""
    said = runs.stdout("recurrent-cp2")
    assert all(f"OK cp qwen3_next rank {r}" in said for r in (0, 1)), runs.output("recurrent-cp2")[-3000:]


def test_a_recurrent_family_with_packed_rows_is_refused_under_a_split(tmp_path):
    """Packed rows would need the recurrence run per packed sequence of the gathered whole: one line, not a wrong
    step."""
    from types import SimpleNamespace

    from gkd.errors import GKDError
    from gkd.models import load_model
    from gkd.parallel import context

    model = load_model(str(write_family(tmp_path / "next", "qwen3_next", layers=2, seed=0)))
    context.use_context_parallel_attention(model)
    layer = next(m for m in model.modules() if type(m).__name__ == "Qwen3NextGatedDeltaNet")
    context._active.split = SimpleNamespace(q_seq=torch.zeros(1))
    try:
        with pytest.raises(GKDError, match="--context_parallel_size with --packing: Qwen3NextGatedDeltaNet runs a "
                                           "recurrence per packed sequence"):
            layer(hidden_states=torch.zeros(1, 4, model.config.hidden_size))
    finally:
        context._active.split = None


@pytest.mark.slow
@pytest.mark.dist
def test_context_parallel_equals_one_process_for_a_mixture_of_experts_student(runs):
    """The router load-balancing loss is per whole sequence (gkd.train.step): under CP 2 each rank's per-sequence
    routing sums are summed over the group, gradient included; losses and weights equal one process."""
    assert_same(runs["moe-single"], runs["cp2-moe"])
