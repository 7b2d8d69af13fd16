"""Every supported family trains on its true distribution: two `gkd train` steps (full and LoRA), one off-policy
and one on-policy, each equal a naive float64 computation from the models' own logits at the weights AdamW left,
on-policy completions are the student's own draws, and vision-language families train on rows with images; a
family gkd cannot describe is refused in one line."""

import subprocess
import sys

import pytest
import torch

from families import ALL, VISION, family_config, frozen_prefixes, write_family
from gkd.config import TrainConfig
from gkd.errors import GKDError
from gkd.models import adapter_for, apply_lora, freeze_parameters, load_model, support, unwrap
from gkd.models.adapter import check_head
from gkd.train.trainer import Trainer
from naive import assert_steps_match, under
from tiny import write_dataset, write_image_dataset, write_tokenizer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(write_dataset(tmp_path_factory.mktemp("fam") / "train.jsonl", n=8, seed=3))


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    """Rows with images (two of every three) and without, for the vision-language families."""
    return str(write_image_dataset(tmp_path_factory.mktemp("fam-images") / "train.jsonl", n=8, seed=3))


def _pair(root, family):
    return (str(write_family(root / "student", family, layers=2, seed=2)),
            str(write_family(root / "teacher", family, layers=3, seed=1)))


def _trainer(student, teacher, data, out, **kw):
    # three micro-batches of two rows each: padding and the step-wide normaliser are in play; seed 42 and lmbda
    # 0.5 make step 1 off-policy and step 2 on-policy (assert_steps_match checks that both kinds ran)
    cfg = TrainConfig(model=student, teacher_model=teacher, dataset=[data], output_dir=str(out), lmbda=0.5, seed=42,
                      beta=0.5, temperature=0.9, sft_alpha=0.3, micro_batch_size=2, global_batch_size=6, max_steps=2,
                      max_completion_length=4, learning_rate=1e-3, lr_scheduler_type="constant", max_grad_norm=0.0,
                      loss_chunk_size=5, progress_bar=False, **kw)
    return Trainer(cfg, log=lambda *_: None)


def _data(family, data, image_data):
    return image_data if family in VISION else data


@pytest.mark.parametrize("family", ALL)
@pytest.mark.proves("full")
def test_full_training_steps_equal_naive_float64(family, data, image_data, tmp_path):
    """Full training: an off-policy and an on-policy step each equal the naive float64 step (a vision-language
    student's tower and projector train too, on rows with images), and the update between them is AdamW's."""
    student, teacher = _pair(tmp_path, family)
    t = _trainer(student, teacher, _data(family, data, image_data), tmp_path / "out",
                 **({"freeze_vit": False, "freeze_aligner": False} if family in VISION else {}))
    assert_steps_match(t, load_model(student), load_model(teacher))


@pytest.mark.parametrize("family", support.where("packing"))
@pytest.mark.proves("packing")
def test_packed_steps_equal_naive_float64(family, data, image_data, tmp_path):
    """--packing: each micro-batch's two sequences share one row (positions restarting, attention kept inside
    each; mixture-of-experts routing per sequence; M-RoPE positions and images per sequence): an off-policy and
    an on-policy step equal the naive float64 step of the sequences one by one."""
    student, teacher = _pair(tmp_path, family)
    t = _trainer(student, teacher, _data(family, data, image_data), tmp_path / "out", packing=True,
                 **({"freeze_vit": False, "freeze_aligner": False} if family in VISION else {}))
    assert_steps_match(t, load_model(student), load_model(teacher))


@pytest.mark.parametrize("family", ALL)
def test_frozen_parameters_stay_as_loaded_and_the_rest_steps_as_naive(family, data, image_data, tmp_path):
    """--freeze_parameters (the input embedding, with it a tied lm_head, and the first decoder layer): an off-policy
    and an on-policy step of the other weights equal the naive float64 steps of a student with the same weights
    frozen, and the frozen ones end the run bit for bit as loaded."""
    student, teacher = _pair(tmp_path, family)
    reference = load_model(student)
    prefixes = frozen_prefixes(reference)
    left = freeze_parameters(reference, prefixes)
    t = _trainer(student, teacher, _data(family, data, image_data), tmp_path / "out", freeze_parameters=prefixes,
                 **({"freeze_vit": False, "freeze_aligner": False} if family in VISION else {}))
    assert 0 < sum(p.numel() for p in t.params) == left < sum(p.numel() for p in reference.parameters())
    assert_steps_match(t, reference, load_model(teacher))
    loaded = dict(unwrap(load_model(student)).named_parameters(remove_duplicate=False))
    frozen = {n: p for n, p in unwrap(t.student).named_parameters(remove_duplicate=False)
              if under(n, prefixes)}
    assert frozen and all(torch.equal(p, loaded[n]) for n, p in frozen.items()), "a frozen weight moved"
    assert all(p.grad is None for p in frozen.values())


@pytest.mark.parametrize("family", ALL)
@pytest.mark.proves("LoRA")
def test_lora_finds_every_projection_and_its_steps_equal_naive(family, data, image_data, tmp_path):
    """LoRA wraps every linear projection of each decoder layer, and an off-policy and an on-policy LoRA step
    each equal the naive float64 step (vision-language rows with images)."""
    from peft.tuners.lora import LoraLayer

    student, teacher = _pair(tmp_path, family)
    model = load_model(student)
    adapter = adapter_for(model)
    experts = {id(m) for m in [*adapter.experts(model), *adapter.routers(model)]}  # (3D tensors, not linears)
    linears, moe = ([{n for n, m in layer.named_modules() if pick(m)} for layer in adapter.decoder(model).layers]
                    for pick in (lambda m: isinstance(m, torch.nn.Linear), lambda m: id(m) in experts))
    assert all(any("attn" in n for n in ls) and any("mlp" in n for n in ls | e) for ls, e in zip(linears, moe)), linears
    model = apply_lora(model, 4, 8, 0.0, "all-linear", 0)
    for ls, e, layer in zip(linears, moe, adapter.decoder(model).layers):
        wrapped = {n for n, m in layer.named_modules() if isinstance(m, LoraLayer) and not n.endswith(".base_layer")}
        # every linear; PEFT's target_parameters adds the experts and router (of Qwen3-MoE, Mixtral, OLMoE)
        assert ls <= wrapped <= ls | e, f"{family}: LoRA on {sorted(wrapped)}, the layer's linears are {sorted(ls)}"
    assert not isinstance(unwrap(model).get_output_embeddings(), LoraLayer)
    t = _trainer(student, teacher, _data(family, data, image_data), tmp_path / "out", train_type="lora",
                 lora_rank=4, lora_alpha=8, lora_dropout=0.0)  # dropout would make the step random
    # the reference is the trainer's own LoRA model before its step (same adapters, same initialisation)
    import copy

    assert_steps_match(t, copy.deepcopy(t.student), load_model(teacher))


def _saved(model, folder):
    model.save_pretrained(str(folder))
    write_tokenizer(folder, 96)
    return str(folder)


def test_an_unknown_family_is_refused_in_one_line(tmp_path, data):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = _saved(GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=2)), tmp_path / "gpt2")
    with pytest.raises(GKDError, match=r"the gpt2 family \(GPT2LMHeadModel\) is not supported.*llama.*gemma2"):
        load_model(gpt2)
    proc = subprocess.run([sys.executable, "-m", "gkd", "train", "--model", gpt2, "--teacher_model", gpt2, "--dataset",
                           data, "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "gpt2 family" in lines[0] and "not supported" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_an_unknown_logit_attribute_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM

    config = family_config("llama")
    config.output_logit_multiplier = 3.0  # something a future family might add to its head
    folder = _saved(AutoModelForCausalLM.from_config(config), tmp_path / "m")
    with pytest.raises(GKDError, match=r"llama \(LlamaForCausalLM\) has output_logit_multiplier = 3.0, a logit "
                                       r"transform gkd's llama adapter does not describe"):
        load_model(folder)


def test_a_forward_that_transforms_its_logits_is_refused():
    from transformers import GraniteForCausalLM, LlamaForCausalLM

    class Sharpened(LlamaForCausalLM):  # a subclass whose forward does something the adapter cannot know
        def forward(self, *a, **k):
            out = super().forward(*a, **k)
            out.logits = out.logits * 3
            return out

    torch.manual_seed(0)
    with pytest.raises(GKDError, match=r"llama \(Sharpened\) computes logits its adapter's head description does "
                                       r"not give \(max difference .*\).*wrong distribution"):
        check_head(Sharpened(family_config("llama")), "m")
    check_head(LlamaForCausalLM(family_config("llama")), "m")  # the plain class passes
    check_head(GraniteForCausalLM(family_config("granite")), "m")  # and so does a described transform


def test_every_family_in_the_table_is_tested_here():
    """The per-family tests above (and in test_families_dist.py, test_vllm_families.py) run over every row (what
    each proves is checked in test_table.py)."""
    assert sorted(r["model_type"] for r in support.implemented()) == sorted(ALL)


@pytest.mark.parametrize("family", [r["model_type"] for r in support.implemented()
                                    if not r["TP"] or not r["vLLM sync"] or not r["PP"] or not r["packing"]])
def test_what_the_table_says_no_to_is_refused_in_one_line(family, tmp_path):
    from gkd.models.adapter import check_packing, check_vllm
    from gkd.parallel.pipeline import check_config
    from gkd.parallel.tensor_parallel import check_plan

    row = next(r for r in support.implemented() if r["model_type"] == family)
    model = load_model(str(write_family(tmp_path / "m", family)))
    if not row["PP"]:  # (read from the config before any process starts; what is missing is named)
        with pytest.raises(GKDError, match=rf"--pipeline_model_parallel_size: no pipeline plan for {family} "
                                           rf"\({type(model).__name__}, --model m\): \w.*; pipelines exist for .*\bllama\b"):
            check_config(model.config, 2, "", "--model m")
    if not row["TP"]:
        with pytest.raises(GKDError, match=rf"--tensor_model_parallel_size 2: no tensor-parallel plan for "
                                           rf"{type(model).__name__}"):
            check_plan(model, 2)
    if not row["vLLM sync"]:
        with pytest.raises(GKDError, match=rf"--use_vllm: weight sync into vLLM is not verified for {family}"):
            check_vllm(model)
    if not row["packing"]:
        with pytest.raises(GKDError, match=rf"--packing: packed rows are not supported for {family} "):
            check_packing(model)


@pytest.mark.parametrize("family", ["granite", "gemma2", "cohere"])
def test_serve_and_eval_apply_the_family_head(family, tmp_path):
    """gkd serve's log-probs and gkd eval's teacher log-probs are the model's own (scaled, soft-capped) ones."""
    from gkd.data.batch import collate
    from gkd.teacher.serve import Scorer, _Job
    from gkd.evaluate import _token_logprobs

    model = load_model(str(write_family(tmp_path / "m", family))).eval()
    seq = [3, 92, 7, 8, 4, 3, 93, 11, 12, 13]
    with torch.no_grad():
        own = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].double(), -1)
    scorer = Scorer(model, max_batch_tokens=4096, wait_s=0.0)
    try:
        ids, lps, actual, _ = scorer._score([_Job(seq, 5)])[0]
    finally:
        scorer.stop()
    top_lp, top_id = own.topk(5, -1)
    assert torch.equal(ids, top_id)
    torch.testing.assert_close(lps.double(), top_lp, rtol=0, atol=2e-6)
    torch.testing.assert_close(actual.double(), own[:-1].gather(1, torch.tensor(seq[1:])[:, None])[:, 0],
                               rtol=0, atol=2e-6)
    batch = collate([seq[:6]], [seq[6:]], 0)
    assert float(_token_logprobs(model, batch).sum()) == pytest.approx(float(sum(own[i, seq[i + 1]] for i in range(5, 9))),
                                                             abs=1e-5)


def test_gemma2_attention_scores_are_soft_capped_on_every_path(tmp_path):
    """Gemma 2 caps its attention scores (attn_logit_softcapping), which transformers' default SDPA attention
    drops: the student and teacher (load_model), the meta skeleton that sharded loads, pipeline stages and the
    export build from, and context parallelism's attention outside a split (generation) all give transformers'
    eager Gemma 2 (the fixture's cap changes log-probs by far more than the tolerance)."""
    from transformers import AutoModelForCausalLM

    from gkd.parallel.context import use_context_parallel_attention
    from gkd.parallel.loading import meta_skeleton

    folder = str(write_family(tmp_path / "m", "gemma2"))
    ids = torch.tensor([[3, 92, 7, 8, 4, 3, 93, 11, 12, 13, 14, 15], [3, 40, 41, 42, 43, 44, 45, 46, 0, 0, 0, 0]])
    mask = (ids != 0).long()

    def logprobs(model):
        with torch.no_grad():
            return torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.double(), -1)[mask.bool()]

    eager = logprobs(AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager"))
    plain = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
    assert (logprobs(plain) - eager).abs().max() > 0.1  # the cap matters on this fixture
    torch.testing.assert_close(logprobs(load_model(folder)), eager, rtol=0, atol=1e-5)
    skeleton = meta_skeleton(type(plain), plain.config, plain.generation_config)
    skeleton.load_state_dict(plain.state_dict(), assign=True)
    for name, buf in plain.named_buffers():
        owner, _, attr = name.rpartition(".")
        setattr(skeleton.get_submodule(owner), attr, buf)
    torch.testing.assert_close(logprobs(skeleton), eager, rtol=0, atol=1e-5)
    cp = load_model(folder)
    use_context_parallel_attention(cp)
    torch.testing.assert_close(logprobs(cp), eager, rtol=0, atol=1e-5)
