"""Each family's `gkd train` step at FSDP = 2, and at TP = 2, PP = 2 and EP = 2 where `gkd models` says they work,
equals the naive float64 step of the whole models (torchrun, 2 processes, gloo on 127.0.0.1); under PP the
pipelined sampler gives HF generate's completions too. One launch runs every layout and family in turn."""

from pathlib import Path

import pytest
from conftest import run_torchrun

from families import write_family
from gkd.models import support
from tiny import write_dataset

pytestmark = pytest.mark.dist

WORKER = Path(__file__).parent / "dist" / "families_worker.py"
LAYOUTS = {"fsdp": "FSDP", "tp": "TP", "pp": "PP", "ep": "EP"}  # the worker's layout: the table's column


def _where(column):
    return [r["model_type"] for r in support.rows() if r[column]]


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """The worker's output over every layout; each family written once (pipelines take untied embeddings
    only, so PP gets untied variants: the tiny Llama and SmolLM3 tie theirs)."""
    root = tmp_path_factory.mktemp("families")
    groups = []
    for mode, column in LAYOUTS.items():
        folder = root / ("untied" if mode == "pp" else "models")
        for family in _where(column):
            if not (folder / family).exists():
                extra = {"tie_word_embeddings": False} if mode == "pp" else {}
                write_family(folder / family / "student", family, layers=2, seed=2, **extra)
                write_family(folder / family / "teacher", family, layers=3, seed=1, **extra)
        groups += [mode, str(folder), ",".join(_where(column))]
    data = write_dataset(root / "train.jsonl", n=8, seed=3)
    return run_torchrun(WORKER, 2, str(data), *groups, timeout=1800)


@pytest.mark.parametrize("mode", list(LAYOUTS))
def test_the_step_equals_naive_where_the_table_says_yes(launch, mode):
    families = _where(LAYOUTS[mode])
    missing = [f"{family} rank {rank}" for family in families for rank in (0, 1)
               if f"OK {mode} {family} rank {rank}" not in launch.stdout]
    failures = [line for line in launch.stdout.splitlines() if line.startswith(f"FAIL {mode} ")]
    assert families and not missing, (missing, failures, launch.stderr[-3000:])
