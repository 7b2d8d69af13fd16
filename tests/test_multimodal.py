"""Vision-language GKD on tiny random Qwen2-VL and LLaVA fixtures: image rows, exact micro-batch
invariance, images that matter, the remote teacher with images, FSDP, resume, LoRA with a frozen
vision tower, and one-line errors for bad image input."""

import json
import math
import signal
import subprocess
import sys
import time
import types

import pytest
import torch
from safetensors.torch import load_file

from gkd.config import TrainConfig
from gkd.data.batch import collate
from gkd.data.rows import load_examples
from gkd.errors import GKDError
from gkd.losses import fused_linear_gkd_loss
from gkd.models import adapter_for, load_image_processing, load_model, load_tokenizer
from gkd.teacher.local import LocalTeacher
from gkd.teacher.remote import RemoteTeacher
from gkd.train.metrics import read_metrics
from gkd.train.trainer import Trainer
from helpers import (ENV, assert_one_line_error, declare, final_weights, gkd_in_process, gkd_subprocess, http,
                     start_gkd_serve, stop)
from tiny import write_image, write_model, write_qwen2vl

FAMILIES = ("qwen2_vl", "llava", "internvl", "qwen3_vl")


def cfg_for(vl, family, out, **kw):
    student, teacher = vl["pairs"][family]
    base = dict(model=str(student), teacher_model=str(teacher), dataset=[str(vl["data"])], output_dir=str(out),
                max_completion_length=4, learning_rate=1e-3, lr_scheduler_type="constant", progress_bar=False,
                max_steps=2, micro_batch_size=4, global_batch_size=4, temperature=0.9, sft_alpha=0.3,
                freeze_vit=False, freeze_aligner=False)
    base.update(kw)
    return TrainConfig(**base)


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.student.state_dict().items()}


def quiet(*_a, **_k):
    pass


def test_rows_of_both_forms_expand_images_as_the_processor_does(vl):
    from transformers import AutoProcessor

    student = vl["pairs"]["llava"][0]
    tok = load_tokenizer(str(student))
    images = load_image_processing(str(student), tok)
    rows = load_examples([str(vl["data"])], tok, max_length=512, truncation_strategy="left", max_completion_length=8,
                         images=images)
    processor = AutoProcessor.from_pretrained(str(student))  # LLaVA's builds here: compare with its own expansion
    raw = [json.loads(line) for line in vl["data"].read_text().splitlines()]
    assert [len(r.images) for r in rows] == [0 if i % 3 == 2 else 1 for i in range(8)]
    for row, example in zip(raw, rows):
        messages = _typed(row["messages"][:1], bool(example.images))
        rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        theirs = processor(text=[rendered], images=example.images or None, return_tensors="pt")
        assert theirs["input_ids"][0].tolist() == example.prompt_ids
        if example.images:
            torch.testing.assert_close(theirs["pixel_values"], images(example.images)["pixel_values"])


def test_internvl_rows_expand_images_into_tiles_as_its_processor_does(vl):
    """InternVL's processor cannot be built here (its video processor needs torchvision): its own expansion
    (InternVLProcessor.replace_image_token: <img>, 4 tokens per tile, </img>) is applied by hand to the text its
    chat template renders, with the tiles its image processor cuts; gkd's rows hold the same ids and pixels."""
    from transformers import InternVLProcessor

    student = vl["pairs"]["internvl"][0]
    tok = load_tokenizer(str(student))
    images = load_image_processing(str(student), tok)
    rows = load_examples([str(vl["data"])], tok, max_length=512, truncation_strategy="left", max_completion_length=8,
                         images=images)
    theirs = types.SimpleNamespace(start_image_token="<img>", end_image_token="</img>", image_token="<IMG_CONTEXT>",
                                   image_seq_length=4)
    raw = [json.loads(line) for line in vl["data"].read_text().splitlines()]
    tiles = []
    for row, example in zip(raw, rows):
        rendered = tok.apply_chat_template(_typed(row["messages"][:1], bool(example.images)), add_generation_prompt=True,
                                           tokenize=False)
        if example.images:
            processed = images.image_processor(images=example.images, return_tensors="pt")
            torch.testing.assert_close(processed["pixel_values"], images(example.images)["pixel_values"])
            tiles += processed["num_patches"].tolist()
            parts = rendered.split("<IMG_CONTEXT>")
            assert len(parts) == len(example.images) + 1
            rendered = parts[0] + "".join(InternVLProcessor.replace_image_token(
                theirs, {"num_patches": processed["num_patches"].tolist()}, k) + rest for k, rest in enumerate(parts[1:]))
        assert tok(rendered, add_special_tokens=False)["input_ids"] == example.prompt_ids
    assert len(set(tiles)) > 1  # images of several tile counts (a thumbnail beside the tiles) are compared


def _typed(messages: list[dict], has_image: bool) -> list[dict]:
    """A row's first message as Hugging Face's typed parts (an ms-swift <image> tag as an image part)."""
    if not has_image:
        return messages
    text = messages[0]["content"]
    parts = text if isinstance(text, list) else [{"type": "image"}, {"type": "text", "text": text[8:]}]
    return [{"role": "user", "content": [{"type": p["type"], **({"text": p["text"]} if "text" in p else {})}
                                         for p in parts]}]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_micro_batch_split_gives_the_same_update(vl, tmp_path, family, lmbda):
    runs = {}
    for mbs in (4, 2):
        t = Trainer(cfg_for(vl, family, tmp_path / f"m{mbs}", micro_batch_size=mbs, lmbda=lmbda), log=quiet)
        t.train()
        runs[mbs] = (weights(t), read_metrics(t.out / "metrics.jsonl"))
    (w4, m4), (w2, m2) = runs[4], runs[2]
    # AdamW divides each gradient by its own RMS, so an element whose gradient is a near-cancelling sum
    # carries float32 rounding into its update: on a 2-core AVX2 machine one element moved 1.2e-5, 1.2 % of
    # the 1e-3 step. Dropping a micro-batch moved weights by up to 4e-3 (tried on this test).
    for k in w4:
        torch.testing.assert_close(w2[k], w4[k], rtol=0, atol=1e-4, msg=k)
    for a, b in zip(m4, m2):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and a["on_policy_share"] == b["on_policy_share"] == lmbda
    initial = weights(Trainer(cfg_for(vl, family, tmp_path / "init"), log=quiet))
    vision = [k for k in w4 if ("visual" in k or "vision_tower" in k) and "weight" in k]
    assert any((initial[k] - w4[k]).abs().max() > 1e-6 for k in vision), "the vision tower did not train"


@pytest.mark.parametrize("family", FAMILIES)
def test_swapping_the_images_changes_the_loss(vl, tmp_path, family):
    rows = [json.loads(line) for line in vl["data"].read_text().splitlines()]
    swapped = vl["root"] / "data" / "swapped.jsonl"
    first, second = rows[0]["images"][0], rows[4]["images"][0]
    rows[0]["images"], rows[4]["images"] = [second], [first]
    swapped.write_text("".join(json.dumps(r) + "\n" for r in rows))
    losses = {}
    for name, data in (("original", vl["data"]), ("swapped", swapped)):
        t = Trainer(cfg_for(vl, family, tmp_path / name, dataset=[str(data)], max_steps=1, global_batch_size=8,
                            micro_batch_size=8, lmbda=0.0), log=quiet)
        losses[name] = t.train()["loss"]
    assert abs(losses["original"] - losses["swapped"]) > 1e-6, losses


@pytest.fixture(scope="module")
def qwen_server(vl):
    proc, url = start_gkd_serve(str(vl["pairs"]["qwen2_vl"][1]), "--max_model_len", "256")
    yield url
    stop(proc)


@pytest.mark.slow
def test_server_teacher_with_images_equals_local_topk_teacher(vl, qwen_server):
    student_dir, teacher_dir = vl["pairs"]["qwen2_vl"]
    tok = load_tokenizer(str(student_dir))
    images = load_image_processing(str(student_dir), tok)
    rows = load_examples([str(vl["data"])], tok, max_length=512, truncation_strategy="left", max_completion_length=8,
                         images=images)
    batch = collate([r.prompt_ids for r in rows], [r.completion_ids for r in rows], tok.pad_token_id,
                    [images(r.images) for r in rows], images=[r.images for r in rows])
    assert batch.images is not None and "pixel_values" in batch.inputs
    student = load_model(str(student_dir))
    adapter = adapter_for(student)
    local = LocalTeacher(load_model(str(teacher_dir)), torch.device("cpu"), topk=8)
    remote = RemoteTeacher(qwen_server, 8).connect(tok)
    remote.check_images()
    results = []
    for teacher in (local, remote):
        student.zero_grad()
        scored = teacher.score(batch)
        if teacher is local:  # the local top-k rows, as a server would send them
            from gkd.losses import topk_logprobs
            logits = scored.head.to(torch.float32).logits(scored.hidden.float())
            ids, lps = topk_logprobs(logits, 8)
            kwargs = dict(teacher_topk_ids=ids, teacher_topk_logprobs=lps)
        else:
            kwargs = scored.loss_kwargs()
        out = fused_linear_gkd_loss(adapter.final_hidden(student, batch.model_inputs()), adapter.lm_head(student),
                                    **kwargs, beta=0.5, temperature=0.9, mask=batch.loss_mask)
        out.loss.backward()
        results.append((out.loss.detach(), adapter.lm_head(student).grad.clone()))
    remote.close()
    (l_loc, g_loc), (l_rem, g_rem) = results
    torch.testing.assert_close(l_rem, l_loc, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_rem, g_loc, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_server_refuses_ids_whose_image_tokens_do_not_match(vl, qwen_server):
    tok = load_tokenizer(str(vl["pairs"]["qwen2_vl"][0]))
    ids = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w1"}]}],
                                  add_generation_prompt=True, tokenize=True, return_dict=False)  # one placeholder, unexpanded
    from PIL import Image

    from gkd.data.imagefiles import to_base64_png

    image = Image.open(write_image(vl["root"] / "probe.png", 7, size=(56, 56))).convert("RGB")
    code, body = http("POST", qwen_server + "/v1/completions", {"prompt": [list(ids)], "prompt_logprobs": 2,
                                                               "max_tokens": 1, "gkd_images": [[to_base64_png(image)]]})
    assert code == 400 and "1 image tokens in the ids from position" in body["error"]["message"], body


@pytest.mark.slow
def test_training_against_a_server_teacher_with_images(vl, qwen_server, tmp_path):
    """2 steps (off-, then on-policy) against `gkd serve` of the Qwen2-VL teacher, which gets the rows' images,
    give the run against the local teacher's top-8: each step's loss and divergence, and the trained weights."""
    done = {}
    for name, teacher in (("remote", {"teacher_model": "", "teacher_model_server": qwen_server}), ("local", {})):
        t = Trainer(cfg_for(vl, "qwen2_vl", tmp_path / name, gkd_logits_topk=8, lmbda=0.5, max_steps=2, **teacher),
                    log=quiet)
        initial = weights(t)
        t.train()
        done[name] = read_metrics(t.out / "metrics.jsonl"), weights(t)
    (remote, w_remote), (local, w_local) = done["remote"], done["local"]
    assert [m["on_policy_share"] for m in remote] == [0.0, 1.0]  # both kinds of step
    for a, b in zip(remote, local):  # (measured: 2e-9 apart, on a divergence of 1.8e-3 per token)
        assert a["completion_length"] == b["completion_length"], (a, b)
        assert abs(a["loss"] - b["loss"]) <= 1e-6 and abs(a["divergence"] - b["divergence"]) <= 1e-4 * b["divergence"]
    # every tensor moved by 1.7e-3 or more; the runs' weights by at most 9e-6, in the merger: AdamW divides each
    # gradient by its own RMS, so a near-zero gradient carries float32 rounding into its update (as in
    # test_micro_batch_split_gives_the_same_update)
    assert min(float((w_local[k] - initial[k]).abs().max()) for k in w_local) > 1e-3, "a tensor did not train"
    for k in w_local:
        torch.testing.assert_close(w_remote[k], w_local[k], rtol=0, atol=1e-4, msg=k)
    # the exported student is a whole vision-language folder: model, tokenizer and image processor
    exported = tmp_path / "remote" / "final"
    assert load_image_processing(str(exported), load_tokenizer(str(exported))) is not None
    assert type(load_model(str(exported))).__name__ == "Qwen2VLForConditionalGeneration"


def _naive_first_step_loss(t, student, teacher) -> float:
    """The loss of the trainer's first (off-policy) step computed naively in float64, as tests/naive.py does for
    text: each row alone with its own images (Qwen2-VL's inputs), the models' own logits at the completion's
    positions, the divergence's formula at the trainer's temperature plus sft_alpha x cross-entropy, over the
    step's tokens."""
    cfg = t.cfg
    beta, temperature = cfg.beta, cfg.divergence_temperature
    s, te = student.double().eval(), teacher.double().eval()
    total, tokens = 0.0, 0
    for r in t.data.rows(0):
        b = collate([r.prompt_ids], [r.completion_ids], t.tokenizer.pad_token_id, [t.images(r.images)])
        inputs = {k: v.double() if v.is_floating_point() else v for k, v in b.model_inputs().items()}
        inputs["mm_token_type_ids"] = (b.input_ids == s.config.image_token_id).int()  # as Qwen2-VL's processor
        at, labels = b.loss_mask[0], b.labels[0][b.loss_mask[0]]
        with torch.no_grad():
            zs, zt = s(**inputs).logits[0, at], te(**inputs).logits[0, at]
        ls, lt = torch.log_softmax(zs / temperature, -1), torch.log_softmax(zt / temperature, -1)
        m = torch.logsumexp(torch.stack([ls + math.log(1 - beta), lt + math.log(beta)]), 0)
        div = beta * (lt.exp() * (lt - m)).sum(-1) + (1 - beta) * (ls.exp() * (ls - m)).sum(-1)
        ce = -torch.log_softmax(zs, -1).gather(-1, labels[:, None])
        total += float(div.sum() + cfg.sft_alpha * ce.sum())
        tokens += len(labels)
    return total / tokens


def test_lora_keeps_a_frozen_vision_tower_untouched(vl, tmp_path):
    """LoRA with --freeze_vit and --freeze_aligner: no adapter in the vision model, every base weight (the tower
    and the merger among them) untouched, every adapter trained, and step 1's loss (adapters still zero) is the
    naive float64 loss of the image rows; full training with --freeze_vit alone trains the merger, not the tower."""
    student, teacher = vl["pairs"]["qwen2_vl"]
    t = Trainer(cfg_for(vl, "qwen2_vl", tmp_path / "lora", train_type="lora", lora_rank=4, freeze_vit=True,
                        freeze_aligner=True, lmbda=0.5, split_dataset_ratio=0.25, eval_steps=2), log=quiet)
    names = [n for n, _ in t.student.named_modules() if n.endswith("lora_A")]
    assert names and not any("visual" in n for n in names), names
    assert any(r.images for r in t.data.rows(0))
    before = weights(t)
    t.train()
    after = weights(t)
    base = [k for k in before if "lora_" not in k]
    assert any("visual.blocks" in k for k in base) and any("visual.merger" in k for k in base)
    assert not [k for k in base if not torch.equal(before[k], after[k])], "a base weight trained"
    adapters = [k for k in before if "lora_B" in k]  # (B starts at zero)
    moved = {k: float(after[k].abs().max()) for k in adapters}
    assert len(adapters) == len(names) and min(moved.values()) > 1e-4, moved
    metrics = read_metrics(t.out / "metrics.jsonl")
    assert metrics[0]["on_policy_share"] == 0.0
    want = _naive_first_step_loss(t, load_model(str(student)), load_model(str(teacher)))
    assert abs(metrics[0]["loss"] - want) <= 2e-5 * want, (metrics[0]["loss"], want)  # (measured 1e-7; no images: 8e-4)
    evals = [m for m in metrics if "eval_divergence" in m]
    assert evals and evals[-1]["eval_divergence"] > 0  # held-out image rows evaluated during training
    full = Trainer(cfg_for(vl, "qwen2_vl", tmp_path / "frozen", freeze_vit=True, freeze_aligner=False), log=quiet)
    before = weights(full)
    full.train()
    after = weights(full)
    tower = [k for k in before if "visual" in k and "merger" not in k]
    merger = [k for k in before if "visual.merger" in k]
    assert tower and all(torch.equal(before[k], after[k]) for k in tower), "--freeze_vit trained the tower"
    assert any(not torch.equal(before[k], after[k]) for k in merger), "the aligner did not train"


def _args(vl, family, out, *extra):
    student, teacher = vl["pairs"][family]
    return ["train", "--model", str(student), "--teacher_model", str(teacher), "--dataset", str(vl["data"]),
            "--output_dir", str(out), "--max_completion_length", "4", "--learning_rate", "1e-3",
            "--lr_scheduler_type", "constant", "--micro_batch_size", "2", "--global_batch_size", "4",
            "--progress_bar", "false", "--lmbda", "0.5", "--sft_alpha", "0.3", "--freeze_vit", "false", *extra]


def _losses(out):
    return {m["step"]: m["loss"] for m in read_metrics(out / "metrics.jsonl")}


# the session's runs (helpers.Runs): 4 steps of Qwen2-VL on one process and on FSDP 2; 2 steps of each family on
# FSDP 2 where one rank's micro-batch has an image and the other's has none
declare("vl-single", 1, lambda c, out: _args(c.models("vl"), "qwen2_vl", out, "--max_steps", "4"))
declare("vl-fsdp2", 2, lambda c, out: _args(c.models("vl"), "qwen2_vl", out, "--max_steps", "4"))
# --packing: each rank's two sequences (images, M-RoPE positions per sequence) in one row
declare("vl-fsdp2-packed", 2, lambda c, out: _args(c.models("vl"), "qwen2_vl", out, "--max_steps", "4",
                                                   "--packing", "true"))
# --context_parallel_size 2: each rank runs the vision tower on the micro-batch's images and keeps its tokens
CP2 = ["--context_parallel_size", "2"]
declare("vl-cp2", 2, lambda c, out: _args(c.models("vl"), "qwen2_vl", out, "--max_steps", "4", *CP2))
declare("vl-cp2-packed", 2, lambda c, out: _args(c.models("vl"), "qwen2_vl", out, "--max_steps", "4", *CP2,
                                                 "--packing", "true"))
# --pipeline_model_parallel_size 2 with packed rows: every stage makes each sequence's M-RoPE positions
declare("vl-pp2-packed", 2, lambda c, out: _args(c.models("vl"), "qwen2_vl", out, "--max_steps", "4", "--packing",
                                                 "true", "--pipeline_model_parallel_size", "2"))
# PP 2 x CP 2: the first stage merges the images into whole sequences and keeps its rank's tokens
declare("vl-pp2xcp2", 4, lambda c, out: _args(c.models("vl"), "qwen2_vl", out, "--max_steps", "4", *CP2,
                                              "--pipeline_model_parallel_size", "2"))


def _one_image_row_and_one_text_row(family, *flags):
    def args(c, out):
        vl = c.models("vl")

        def make():
            rows = [json.loads(line) for line in vl["data"].read_text().splitlines()]
            mixed = vl["root"] / "data" / "mixed.jsonl"
            mixed.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[2]) + "\n")  # an image row, a text row
            return str(mixed)

        args = _args(vl, family, out, "--max_steps", "2", "--micro_batch_size", "1", "--global_batch_size", "2", *flags)
        args[args.index("--dataset") + 1] = c.once("vl-mixed-data", make)
        return args

    return args


for _family in FAMILIES:
    declare(f"vl-mixed-{_family}", 2, _one_image_row_and_one_text_row(_family))
    declare(f"vl-mixed-{_family}-single", 1, _one_image_row_and_one_text_row(_family))  # what it must equal
    # context parallel: both ranks hold parts of the image row, then of the text row (a blank image reaches the tower)
    declare(f"vl-mixed-{_family}-cp2", 2, _one_image_row_and_one_text_row(_family, *CP2))


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("name", ["vl-fsdp2", "vl-fsdp2-packed", "vl-cp2", "vl-cp2-packed", "vl-pp2-packed",
                                  "vl-pp2xcp2"])
def test_fsdp2_context_and_pipeline_parallel_equal_one_process(runs, name):
    a, b = _losses(runs["vl-single"]), _losses(runs[name])
    assert sorted(a) == [1, 2, 3, 4] and all(abs(a[s] - b[s]) <= 1e-5 for s in a), (a, b)
    wa, wb = final_weights(runs["vl-single"]), final_weights(runs[name])
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5, msg=k)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("layout", ["fsdp2", "cp2"])
def test_one_image_row_and_one_text_row_on_two_processes(runs, layout):
    """FSDP 2: one rank's micro-batch has an image, the other's has none: the vision tower must not be a sharded
    unit of its own (its gathers would run on one rank only). CP 2: both ranks hold parts of the image row's
    tokens (the tower runs on every rank, the language model on its tokens; M-RoPE positions of whole sequences),
    then of the text row. Either run equals one process's, for each family: the loss of an off- and an on-policy
    step, and the final weights, the vision tower's among them. Checked to fail (2026-12-04) with CP's language-
    model hook giving 1D positions in place of M-RoPE's."""
    for family in FAMILIES:
        one = runs[f"vl-mixed-{family}-single"]
        two = runs[f"vl-mixed-{family}" + ("-cp2" if layout == "cp2" else "")]
        a, b = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
        assert [m["on_policy_share"] for m in a] == [0.0, 1.0] and [m["step"] for m in b] == [1, 2], (family, a, b)
        for x, y in zip(a, b):
            assert abs(x["loss"] - y["loss"]) <= 1e-5 and x["completion_length"] == y["completion_length"], (x, y)
        wa, wb = final_weights(one), final_weights(two)
        assert wa.keys() == wb.keys()
        # FSDP: measured equal to the bit. CP sums the ranks' partial gradients in another order, and AdamW's
        # normalised step turns the rounding of a near-zero gradient element into weight: measured up to 1.1e-5
        # (LLaVA, 2 steps at lr 1e-3, 2026-12-04), the losses within 5e-10
        atol = 1e-5 if layout == "fsdp2" else 3e-5
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=atol, msg=f"{family}: {k}")
        initial = load_file(str(runs.ctx.models("vl")["pairs"][family][0] / "model.safetensors"))
        vision = [k for k in initial if "visual" in k or "vision_tower" in k]
        assert max(float((wa[k] - initial[k]).abs().max()) for k in vision) > 1e-3, f"{family}: the tower did not train"


@pytest.mark.slow
def test_kill_and_resume_reproduces_the_losses(vl, tmp_path):
    full = gkd_subprocess(*_args(vl, "llava", tmp_path / "full", "--max_steps", "5"))
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "gkd", *_args(vl, "llava", out, "--max_steps", "100000",
                                                                 "--save_steps", "2")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 240
    while not (out / "checkpoint-2" / "gkd_checkpoint.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = gkd_subprocess(*_args(vl, "llava", out, "--max_steps", "5", "--resume_from_checkpoint", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got, want = _losses(out), _losses(tmp_path / "full")
    start = min(s for s in got if s > 2)
    assert start <= 5 and all(got[s] == want[s] for s in range(start, 6)), (got, want)


def test_eval_command_with_images(vl, tmp_path):
    student, teacher = vl["pairs"]["qwen2_vl"]
    out = tmp_path / "eval.json"
    proc = gkd_in_process("eval", "--model", str(student), "--teacher_model", str(teacher), "--dataset",
                          str(vl["prompts"]), "--max_completion_length", "3", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(out.read_text())
    assert metrics["prompts"] == 8 and metrics["teacher_tokens"] > 0


def test_bad_image_input_gives_one_line_and_exit_2(vl, tmp_path):
    folder = tmp_path / "data"
    write_image(folder / "ok.png", 1)
    (folder / "broken.png").write_bytes(b"not a png")
    text_only = write_model(tmp_path / "text-model", seed=3)
    other = write_qwen2vl(tmp_path / "qwen-other", layers=3, seed=4, max_pixels=28 * 28)  # one token per image

    def row(content, images=None):
        r = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "w1"}]}
        return r if images is None else {**r, "images": images}

    cases = {  # name: (rows, needle, extra flags)
        "missing image": ([row("<image> w1", ["nope.png"])], f"{folder / 'rows.jsonl'}:1: image {folder / 'nope.png'}: no such file", {}),
        "unreadable image": ([row("<image> w1", ["broken.png"])], "broken.png: unreadable", {}),
        "too few placeholders": ([row("w1 w2", ["ok.png"])], "0 image placeholder(s)", {}),
        "too many placeholders": ([row("<image> <image> w1", ["ok.png"])], "2 image placeholder(s)", {}),
        "text-only model": ([row("<image> w1", ["ok.png"])], "the model is text-only", {"model": str(text_only)}),
        "text-only teacher": ([row("<image> w1", ["ok.png"])], "is text-only but the student", {"teacher": str(text_only)}),
        "token counts differ": ([row("<image> w1", ["ok.png"])], "they must agree token for token", {"teacher": str(other)}),
        "image in the completion": ([{"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": [
            {"type": "image", "image": "ok.png"}, {"type": "text", "text": "w2"}]}]}], "the completion (last assistant turn) has an image", {}),
    }
    student, teacher = vl["pairs"]["qwen2_vl"]
    for name, (rows, needle, flags) in cases.items():
        data = folder / "rows.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        args = ["train", "--model", flags.get("model", str(student)), "--teacher_model", flags.get("teacher", str(teacher)),
                "--dataset", str(data), "--output_dir", str(out), "--max_steps", "1", "--global_batch_size", "1"]
        proc = gkd_subprocess(*args) if name == "missing image" else gkd_in_process(*args)  # one real command, then in-process
        assert_one_line_error(proc, needle)
        assert not out.exists(), f"{name}: wrote {out}"


def test_vllm_and_image_rows_refused(vl, tmp_path):
    with pytest.raises(GKDError, match="--use_vllm with image rows is not supported yet"):
        Trainer(cfg_for(vl, "qwen2_vl", tmp_path / "v", use_vllm=True), log=quiet)
