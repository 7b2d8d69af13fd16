"""Fixtures (tiny models, the session's runs), the tiers and how the files are spread over pytest-xdist workers.

Tiers: `slow` marks every test that starts torchrun, a server (`gkd serve`, vLLM) or a vLLM engine, kills or faults
`gkd` runs, or loads the real SmolLM2; `-m "not slow"` is the edit loop's tier (a test there may still run one real
`gkd` command). A test outside the slow tier that starts torchrun or a server fails, naming the marker it lacks."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# One float32 product for every process the tests start and for the tests themselves (gkd.machine.pinned_product):
# the tests compare runs of separate processes, and each would otherwise time torch's against oneDNN's on two
# shared, busy cores, where the timing can flip (a pipeline run on torch's product against one process on oneDNN's
# failed a bound, 2026-12-06). The timing itself has its own tests, which lift the pin.
os.environ.setdefault("GKD_CPU_PRODUCT", "onednn")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import RunContext, Runs  # noqa: E402

pytest_plugins = ["proofs"]  # the `proves` marker and --write-proofs (gkd models' table)

# One thread per pytest process, as every process the tests start has (helpers.ENV): the two workers share two
# cores, and torch's default of a thread per core spends more time synchronising threads than computing on the
# tiny models (tests/test_families.py on one worker: 61 s with two threads, 19 s with one).
torch.set_num_threads(1)

# -------------------------------------------------------------------------------------------------------
# xdist (--dist loadgroup): the slow tests of a file share a worker (and its module fixtures: servers), and
# every test reading the session's runs shares one (and their launches); the other tests go one by one to
# whichever worker is free. The longest groups go first, the single tests last, so that the two workers end
# together. pytest-xdist 3.8 cannot see groups under pytest 9 (it renames items through an attribute pytest 9
# no longer reads), so the workers write each test's group to a file and the scheduler below reads it.
# LENGTH: seconds of a group on this 2-core machine (pytest --durations), roughly.
# -------------------------------------------------------------------------------------------------------

RUNS_GROUP = "runs"
LENGTH = {
    RUNS_GROUP: 260,
    "test_vllm_rollout.py": 215,
    "test_faults.py": 110,
    "test_smollm2.py": 77,
    "test_multimodal.py": 60,
    "test_gpu_check.py": 43,
    "test_serve.py": 40,
    "test_vllm_families.py": 31,
    "test_vllm_teacher.py": 29,
    "test_pipeline.py": 28,
    "test_distributed.py": 24,
    "test_trainer.py": 20,
    "test_teachers.py": 50,
    "test_vllm_tensor_parallel.py": 35,
}
GROUPS = "GKD_TEST_GROUPS"  # the file of {test id: group}, written by the workers


def pytest_runtest_setup(item):
    """A test whose dependency is missing fails and says which and how to install it: a skip would keep the
    suite green while the feature goes untested (scripts/test.sh installs them all)."""
    import importlib.util

    for mark in item.iter_markers("needs_module"):
        name = mark.args[0]
        if importlib.util.find_spec(name) is None:
            pytest.fail(f"{name} is not installed, and this test checks a feature that needs it: run "
                        "scripts/setup_vllm.sh (scripts/test.sh does both installs)", pytrace=False)


def pytest_configure(config):
    # (xdist registers it; without xdist, -p no:xdist, --strict-markers still has to know it)
    config.addinivalue_line("markers", "xdist_group(name): tests that share a pytest-xdist worker")
    if getattr(config.option, "dist", "no") == "loadgroup" and "PYTEST_XDIST_WORKER" not in os.environ:
        os.environ[GROUPS] = str(Path(tempfile.mkdtemp(prefix="gkd-test-groups-")) / "groups.json")


def pytest_unconfigure(config):
    if os.environ.get(GROUPS) and "PYTEST_XDIST_WORKER" not in os.environ:
        shutil.rmtree(Path(os.environ.pop(GROUPS)).parent, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("dist") and not item.get_closest_marker("slow"):
            raise pytest.UsageError(f"{item.nodeid}: marked dist but not slow (every torchrun test is slow)")
        if not any(item.iter_markers("xdist_group")):
            if "runs" in item.fixturenames:
                group = RUNS_GROUP
            elif item.get_closest_marker("slow"):
                group = Path(str(item.fspath)).name
            else:
                group = item.nodeid  # a group of its own
            item.add_marker(pytest.mark.xdist_group(group))
    group = {item: next(item.iter_markers("xdist_group")).args[0] for item in items}
    items.sort(key=lambda item: -LENGTH.get(group[item], 0))  # stable: each file keeps its order
    if os.environ.get(GROUPS) and "PYTEST_XDIST_WORKER" in os.environ:
        path = Path(os.environ[GROUPS])
        partial = path.with_name(f"{os.environ['PYTEST_XDIST_WORKER']}.json")
        partial.write_text(json.dumps({item.nodeid: group[item] for item in items}))
        partial.replace(path)  # whole, whichever worker writes last (they collect the same tests)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.option.dist != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        """xdist's scope scheduling (a group runs on one worker, groups handed out in collection order) over the
        groups the workers wrote."""

        groups: dict | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:
                self.groups = json.loads(Path(os.environ[GROUPS]).read_text())
            return self.groups.get(nodeid) or nodeid.split("::")[0]

    return ByGroup(config, log)


# -------------------------------------------------------------------------------------------------------
# the fast tier stays fast
# -------------------------------------------------------------------------------------------------------

def _starts_something_slow(words: list[str]) -> bool:
    """torchrun (or gkd's own launcher), a batch of runs, `gkd serve`, vLLM's server."""
    return (any(w in ("torch.distributed.run", "--nproc_per_node", "--nnodes") for w in words)
            or any(w.startswith("vllm.entrypoints") or w.endswith("batch_worker.py") for w in words)
            or words[1:4] == ["-m", "gkd", "serve"])


@pytest.fixture(autouse=True)
def _the_fast_tier_stays_fast(request, monkeypatch):
    """Outside the slow tier: no torchrun, no server (watched at subprocess.Popen), no vLLM (an engine makes
    torch.set_num_threads a no-op for the rest of the worker, so importing it is checked after the test)."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    real = subprocess.Popen

    class Guarded(real):
        def __init__(self, args, *a, **kw):
            words = [str(w) for w in (args if isinstance(args, (list, tuple)) else [args])]
            if _starts_something_slow(words):
                pytest.fail(f"{request.node.nodeid} starts {' '.join(words[:6])}...: mark it slow", pytrace=False)
            super().__init__(args, *a, **kw)

    monkeypatch.setattr(subprocess, "Popen", Guarded)
    had_vllm = sys.modules.get("vllm") is not None  # (None: a test hiding vLLM)
    yield
    if not had_vllm and sys.modules.get("vllm") is not None:
        pytest.fail(f"{request.node.nodeid} imports vLLM: mark it slow", pytrace=False)


# -------------------------------------------------------------------------------------------------------
# models and runs
# -------------------------------------------------------------------------------------------------------


@pytest.fixture(params=["whole-chunks", "3-row-blocks"])
def row_blocks(request, monkeypatch):
    """The fused loss's element-wise terms over each chunk at once (a tiny model's rows are far under
    gkd.losses.BLOCK_BYTES), or 3 rows at a time, as a real vocabulary's are: the blocks' results go back together."""
    if request.param == "3-row-blocks":
        import gkd.losses

        monkeypatch.setattr(gkd.losses, "_row_blocks", lambda n, z: [(r, min(r + 3, n)) for r in range(0, n, 3)])


@pytest.fixture
def torchrun():
    from helpers import run_torchrun

    return run_torchrun


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of a tiny teacher, a tiny student (same tokenizer) and a small dataset."""
    from tiny import write_dataset, write_model

    root = tmp_path_factory.mktemp("tiny")
    return {
        "teacher": str(write_model(root / "teacher", layers=3, seed=1)),
        "student": str(write_model(root / "student", layers=2, seed=2)),
        "data": str(write_dataset(root / "train.jsonl", n=16)),
        "prompts": str(write_dataset(root / "prompts.jsonl", n=8, seed=5, prompt_only=True)),
        "root": root,
    }


@pytest.fixture(scope="session")
def tiny4(tiny):
    """The tiny models with a 4-layer student (pipelines with 2 layers a stage, or uneven stages)."""
    from tiny import write_model

    return {**tiny, "student": str(write_model(Path(tiny["root"]) / "student4", layers=4, seed=3))}


@pytest.fixture(scope="session")
def tied(tiny):
    """The tiny models with lm_head tied to the embedding (SmolLM2's layout: pipelines keep a copy per end stage)."""
    from tiny import write_model

    root = Path(tiny["root"])
    return {**tiny, "student": str(write_model(root / "student-tied", layers=2, seed=2, tie=True)),
            "teacher": str(write_model(root / "teacher-tied", layers=3, seed=1, tie=True))}


@pytest.fixture(scope="session")
def moe(tmp_path_factory):
    """Mixture-of-experts models: a Qwen3-MoE student (4 experts, top-2, 2 layers), a Mixtral teacher, a
    3-expert student (EP 2 cannot split it), a dense one, and their data."""
    from tiny import write_dataset, write_model, write_moe

    root = tmp_path_factory.mktemp("moe")
    return {
        "student": str(write_moe(root / "student", "qwen3_moe", seed=2)),
        "teacher": str(write_moe(root / "teacher", "mixtral", layers=3, seed=1)),
        "odd": str(write_moe(root / "odd", "qwen3_moe", experts=3, seed=2)),
        "dense": str(write_model(root / "dense", seed=2)),
        "data": str(write_dataset(root / "train.jsonl", n=16)),
        "root": root,
    }


@pytest.fixture(scope="session")
def vl(tmp_path_factory):
    """Tiny Qwen2-VL, LLaVA, InternVL and Qwen3-VL student / teacher pairs and image rows."""
    from tiny import write_image_dataset, write_internvl, write_llava, write_qwen2vl, write_qwen3vl

    root = tmp_path_factory.mktemp("vl")
    pairs = {
        "qwen2_vl": (write_qwen2vl(root / "qwen-student", seed=2),
                     write_qwen2vl(root / "qwen-teacher", layers=3, seed=1)),
        "llava": (write_llava(root / "llava-student", seed=2), write_llava(root / "llava-teacher", layers=3, seed=1)),
        # tiles per image, <img> ... </img> around their tokens, a tied output head
        "internvl": (write_internvl(root / "internvl-student", seed=2),
                     write_internvl(root / "internvl-teacher", layers=3, seed=1)),
        # DeepStack: vision features added inside the first decoder layers (split with the tokens under CP)
        "qwen3_vl": (write_qwen3vl(root / "qwen3-student", seed=2),
                     write_qwen3vl(root / "qwen3-teacher", layers=3, seed=1)),
    }
    return {"pairs": pairs, "data": write_image_dataset(root / "data" / "train.jsonl", n=8),
            "prompts": write_image_dataset(root / "data" / "prompts.jsonl", n=8, seed=3, prompt_only=True),
            "root": root}


@pytest.fixture(scope="session")
def runs(request, tmp_path_factory):
    """The declared runs (helpers.declare), each started the first time a test reads it (see helpers.Runs)."""
    # the model sets runs may use, made now (a session fixture cannot ask for another once it has returned)
    sets = {name: request.getfixturevalue(name) for name in ("tiny", "tiny4", "tied", "moe", "vl")}
    ctx = RunContext(tmp_path_factory.mktemp("runs"), sets)
    yield Runs(ctx)
    ctx.close()
