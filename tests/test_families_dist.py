"""Each family's `gkd train` steps at FSDP = 2, and at TP = 2, PP = 2 and EP = 2 wherever gkd runs them (the proofs
of those columns of `gkd models`),
one off-policy and one on-policy, equal the naive float64 steps of the whole models (torchrun, 2 processes, gloo
on 127.0.0.1); on-policy completions are the whole student's own draws (under PP through the pipelined sampler,
which gives HF generate's completions too); vision-language families train on rows with images. One job of the
session's 2-process launch (tests/dist/families_worker.py) runs every layout and family in turn."""

import pytest

from families import write_family
from gkd.models import support
from helpers import declare
from tiny import write_dataset, write_image_dataset

LAYOUTS = {"fsdp": "FSDP", "tp": "TP", "pp": "PP", "ep": "EP"}  # the worker's layout: the table's column


_where = support.where
# --freeze_parameters on each layout, for a tied text family (its two pipeline copies of the embedding stay frozen
# together), a vision-language one and a mixture of experts (expert parallelism)
FROZEN = {"fsdp-frozen": ["llama", "qwen2_vl"], "tp-frozen": ["llama", "qwen2_vl"], "pp-frozen": ["llama", "qwen2_vl"],
          "ep-frozen": ["qwen3_moe"]}


def _every_layout_and_family(c, out):
    """The worker's arguments; each family written once, as tests/families.py has it (the tiny Llama and SmolLM3
    tie their lm_head to the embedding: under PP the two end stages keep a copy each)."""
    out.mkdir(parents=True)
    groups = []
    folder = out / "models"
    for mode, column in LAYOUTS.items():
        for family in _where(column):
            if not (folder / family).exists():
                write_family(folder / family / "student", family, layers=2, seed=2)
                write_family(folder / family / "teacher", family, layers=3, seed=1)
        groups += [mode, str(folder), ",".join(_where(column))]
    for mode, families in FROZEN.items():  # (written above: these families are in every column)
        groups += [mode, str(folder), ",".join(families)]
    return [str(write_dataset(out / "train.jsonl", n=8, seed=3)),
            str(write_image_dataset(out / "images" / "train.jsonl", n=8, seed=3)), *groups]


declare("families", 2, _every_layout_and_family, call="families_worker:run")


@pytest.mark.parametrize("mode", [pytest.param(m, marks=pytest.mark.proves(c, families=_where(c)))
                                  for m, c in LAYOUTS.items()])
@pytest.mark.slow
@pytest.mark.dist
def test_the_steps_equal_naive_at_2_processes(runs, mode):
    families = _where(LAYOUTS[mode])
    said = runs.stdout("families")
    missing = [f"{family} rank {rank}" for family in families for rank in (0, 1)
               if f"OK {mode} {family} rank {rank}" not in said]
    failures = [line for line in said.splitlines() if line.startswith(f"FAIL {mode} ")]
    assert families and not missing, (missing, failures, runs.output("families")[-3000:])


@pytest.mark.parametrize("mode", FROZEN)
@pytest.mark.slow
@pytest.mark.dist
def test_frozen_parameters_stay_as_loaded_at_2_processes(runs, mode):
    """--freeze_parameters under FSDP, TP, PP and EP: the other weights' steps equal the naive float64 steps of a
    student with the same weights frozen, and the frozen ones (gathered from shards and stages) end as loaded."""
    said = runs.stdout("families")
    missing = [f"{family} rank {rank}" for family in FROZEN[mode] for rank in (0, 1)
               if f"OK {mode} {family} rank {rank}" not in said]
    failures = [line for line in said.splitlines() if line.startswith(f"FAIL {mode} ")]
    assert not missing, (missing, failures, runs.output("families")[-3000:])
