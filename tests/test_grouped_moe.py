"""GLM-4.5 and DeepSeek-V3 (sigmoid, bias-corrected, group-limited routing; shared experts; dense first layers):
what tests/test_families.py's steps do not show by themselves. Their exported weights are the folders' tensors
(per-expert matrices, the routing bias), transformers' routing picks experts by the biased scores (which gkd's
router records), no router loss is added by default, layouts they cannot take are refused in one line, and CP 2,
LoRA under FSDP 2 and under TP 2 train exactly (one job of the session's 2-process launch)."""

import pytest
import torch

from families import write_family
from gkd.errors import GKDError
from gkd.models import adapter_for, load_model
from gkd.models.routing import recording
from helpers import declare

GROUPED = ("glm4_moe", "deepseek_v3")


@pytest.fixture(scope="module", params=GROUPED)
def folder(request, tmp_path_factory):
    return write_family(tmp_path_factory.mktemp(request.param) / "m", request.param, layers=2, seed=2)


def test_export_is_the_folders_tensors(folder):
    """Fused experts [E, ...] leave as the per-expert gate/up/down matrices the folder holds; the dense first
    layer, the shared experts and the routing bias (a buffer) leave as they are."""
    from safetensors.torch import load_file

    from gkd.models.export import export_weights

    disk = load_file(str(folder / "model.safetensors"))
    sent = dict(export_weights(load_model(str(folder))))
    assert sent.keys() == disk.keys()
    assert any(".mlp.experts.3.up_proj." in k for k in sent) and any("e_score_correction_bias" in k for k in sent)
    for k in disk:
        assert torch.equal(sent[k], disk[k]), k


def test_routing_follows_the_bias_and_adds_no_router_loss(folder):
    """The recorded expert ids are the bias-corrected, group-limited choice (not the top-k of the raw scores),
    and the default router loss weight is 0, as transformers trains these families (aux-loss-free balancing)."""
    model = load_model(str(folder))
    adapter = adapter_for(model)
    assert adapter.router_aux_loss_coef(model) == 0.0 and adapter.num_experts(model) == 4
    routers = adapter.routers(model)
    assert len(routers) == 1  # the first layer is dense
    ids = torch.randint(5, 90, (3, 12), generator=torch.Generator().manual_seed(0))
    with recording(routers) as seen, torch.no_grad():
        model(input_ids=ids)
    logits, chosen = seen[0]
    gate = routers[0]
    scores = logits.sigmoid() + gate.e_score_correction_bias
    groups = scores.view(-1, gate.num_group, 4 // gate.num_group).topk(2, dim=-1)[0].sum(-1).argmax(-1)  # top-1
    allowed = torch.zeros_like(scores, dtype=torch.bool).view(-1, gate.num_group, 4 // gate.num_group)
    allowed[torch.arange(len(groups)), groups] = True
    expected = scores.masked_fill(~allowed.view_as(scores), float("-inf")).topk(2, dim=-1)[1]
    assert torch.equal(chosen.sort(-1)[0], expected.sort(-1)[0])
    assert not torch.equal(chosen.sort(-1)[0], logits.topk(2, dim=-1)[1].sort(-1)[0])  # the bias changes choices


def test_layouts_they_cannot_take_are_refused_in_one_line(folder):
    from gkd.parallel.expert import check_folder
    from gkd.parallel.tensor_parallel import check_plan

    name = type(load_model(str(folder))).__name__
    with pytest.raises(GKDError, match=rf"--expert_model_parallel_size 8: {name} has 4 experts per layer, which 8 "
                                       "does not divide"):
        check_folder(str(folder), 8)  # from the config alone, before any weight is read
    with pytest.raises(GKDError, match=rf"--tensor_model_parallel_size 3: {name} has num_attention_heads 4, which 3 "
                                       "does not divide"):
        check_plan(load_model(str(folder)), 3)


# --- CP 2, and LoRA under FSDP 2 and TP 2 (tests/dist/families_worker.py's layouts) ---------------------------

MODES = ("cp", "fsdp-lora", "tp-lora")


def _layouts(c, out):
    """The worker's arguments: both families, written as tests/families.py has them, in each mode."""
    from tiny import write_dataset, write_image_dataset

    out.mkdir(parents=True)
    for family in GROUPED:
        write_family(out / "models" / family / "student", family, layers=2, seed=2)
        write_family(out / "models" / family / "teacher", family, layers=3, seed=1)
    groups = [arg for mode in MODES for arg in (mode, str(out / "models"), ",".join(GROUPED))]
    return [str(write_dataset(out / "train.jsonl", n=8, seed=3)),
            str(write_image_dataset(out / "images" / "train.jsonl", n=8, seed=3)), *groups]


declare("grouped-moe-layouts", 2, _layouts, call="families_worker:run")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.slow
@pytest.mark.dist
def test_the_steps_equal_naive_at_2_processes(runs, mode):
    """--context_parallel_size 2 (MLA's narrower values included; each sequence's routing sums cross the ranks),
    and LoRA (all-linear) under FSDP 2 (the experts' tensors adapted too) and TP 2 (experts frozen; MLA's down
    projections' adapters whole): an off-policy and an on-policy step of each family equal the naive float64
    steps of the whole models."""
    said = runs.stdout("grouped-moe-layouts")
    missing = [f"{f} rank {r}" for f in GROUPED for r in (0, 1) if f"OK {mode} {f} rank {r}" not in said]
    assert not missing, (missing, runs.output("grouped-moe-layouts")[-3000:])
