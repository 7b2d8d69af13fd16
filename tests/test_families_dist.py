"""Each family's `gkd train` step at FSDP = 2, and at TP = 2, PP = 2 and EP = 2 where `gkd models` says they work,
equals the naive float64 step of the whole models (torchrun, 2 processes, gloo on 127.0.0.1); one launch per
layout runs every family in turn."""

from pathlib import Path

import pytest

from families import write_family
from gkd.models import support
from tiny import write_dataset

WORKER = Path(__file__).parent / "dist" / "families_worker.py"


def _run(torchrun, tmp_path, mode, families, **overrides):
    for family in families:
        write_family(tmp_path / family / "student", family, layers=2, seed=2, **overrides)
        write_family(tmp_path / family / "teacher", family, layers=3, seed=1, **overrides)
    data = write_dataset(tmp_path / "train.jsonl", n=8, seed=3)
    proc = torchrun(WORKER, 2, mode, str(tmp_path), str(data), *families, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for family in families:
        for rank in (0, 1):
            assert f"OK {mode} {family} rank {rank}" in proc.stdout, proc.stdout[-4000:]


def _where(column):
    return [r["model_type"] for r in support.rows() if r[column]]


@pytest.mark.dist
def test_fsdp2_step_equals_naive_for_every_family(torchrun, tmp_path):
    _run(torchrun, tmp_path, "fsdp", _where("FSDP"))


@pytest.mark.dist
def test_tp2_step_equals_naive_where_tp_is_supported(torchrun, tmp_path):
    _run(torchrun, tmp_path, "tp", _where("TP"))


@pytest.mark.dist
def test_pp2_step_and_sampler_equal_one_process_where_pp_is_supported(torchrun, tmp_path):
    # pipelines take untied embeddings only (the tiny Llama and SmolLM3 tie theirs)
    _run(torchrun, tmp_path, "pp", _where("PP"), tie_word_embeddings=False)


@pytest.mark.dist
def test_ep2_step_equals_naive_where_ep_is_supported(torchrun, tmp_path):
    _run(torchrun, tmp_path, "ep", _where("EP"))
