"""Context parallelism: sequences split over ranks train exactly like one process (full-vocabulary,
local top-k and remote teachers; with FSDP and TP), resume across CP sizes, and the split itself."""

import pytest
import torch

from serving import start_gkd_serve, stop
from test_distributed import final_weights, losses, run, torchrun_cmd, train_args

pytestmark = pytest.mark.dist
TOL = 1e-5


@pytest.fixture(scope="module")
def single(tiny, tmp_path_factory):
    """One-process references, by teacher kind."""
    root = tmp_path_factory.mktemp("cp-single")
    runs = {}
    for name, extra in (("full", []), ("topk", ["--gkd_logits_topk", "5"])):
        out = root / name
        run([*torchrun_cmd(1, train_args(tiny, out, *extra))])
        runs[name] = out
    return runs


def assert_same(a, b):
    la, lb = losses(a), losses(b)
    assert sorted(la) == [1, 2, 3, 4] and all(abs(la[s] - lb[s]) <= TOL for s in la), (la, lb)
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=TOL, msg=k)


@pytest.mark.parametrize("name,nproc,flags,teacher", [
    ("cp2", 2, ["--context_parallel_size", "2"], "full"),
    ("cp2-topk", 2, ["--context_parallel_size", "2", "--gkd_logits_topk", "5"], "topk"),
    ("cp2xfsdp2", 4, ["--context_parallel_size", "2"], "full"),
    ("cp2xtp2", 4, ["--context_parallel_size", "2", "--tensor_model_parallel_size", "2"], "full"),
])
def test_context_parallel_equals_one_process(tiny, single, tmp_path, name, nproc, flags, teacher):
    out = tmp_path / name
    run(torchrun_cmd(nproc, train_args(tiny, out, *flags)), timeout=600)
    assert_same(single[teacher], out)


def test_context_parallel_with_a_remote_teacher(tiny, single, tmp_path):
    proc, url = start_gkd_serve(tiny["teacher"])
    try:
        remote = ["--teacher_model", "", "--teacher_model_server", url, "--gkd_logits_topk", "5"]
        one, two = tmp_path / "one", tmp_path / "two"
        run(torchrun_cmd(1, train_args(tiny, one, *remote)))
        run(torchrun_cmd(2, train_args(tiny, two, *remote, "--context_parallel_size", "2")), timeout=600)
    finally:
        stop(proc)
    assert_same(one, two)
    la, lt = losses(one), losses(single["topk"])  # the server's rows are the local top-k teacher's
    assert all(abs(la[s] - lt[s]) <= TOL for s in la), (la, lt)


def test_resume_across_context_parallel_sizes(tiny, single, tmp_path):
    out = tmp_path / "resumed"
    run(torchrun_cmd(2, train_args(tiny, out, "--context_parallel_size", "2", "--max_steps", "2")), timeout=600)
    run(torchrun_cmd(1, train_args(tiny, out, "--resume_from_checkpoint", "latest")))
    ref, got = losses(single["full"]), losses(out)
    assert all(abs(got[s] - ref[s]) <= TOL for s in (3, 4)), (got, ref)


SPLIT_WORKER = r'''
import sys, torch, torch.distributed as dist
sys.path.insert(0, "tests")
from gkd.data.batch import collate
from gkd.parallel.context import ContextSplit, use_context_parallel_attention
from gkd.models import adapter_for, load_model
dist.init_process_group("gloo")
rank, size = dist.get_rank(), dist.get_world_size()
model = load_model(sys.argv[1])
torch.manual_seed(0)
prompts = [torch.randint(5, 90, (n,)).tolist() for n in (7, 3, 12)]
completions = [torch.randint(5, 90, (n,)).tolist() for n in (5, 9, 1)]
batch = collate(prompts, completions, 0)
adapter = adapter_for(model)
whole = adapter.final_hidden(model, batch.model_inputs())
use_context_parallel_attention(model)
split = ContextSplit(batch, dist.group.WORLD, rank, size)
assert split.length % (2 * size) == 0 and split.length >= batch.input_ids.shape[1]
with split.active():
    mine = adapter.final_hidden(model, split.model_inputs())
    mine.sum().backward()
ref = split.local(whole.detach())
valid = split.local(batch.attention_mask, 0).bool()
err = float((mine - ref).abs()[valid].max())
print("ERR", rank, err)
# the positions of all ranks cover the padded length exactly once, and each rank holds head + mirrored tail
owned = split.owned.flatten().sort().values
assert torch.equal(owned, torch.arange(split.length)), owned
assert err < 1e-5, err
dist.destroy_process_group()
'''


@pytest.mark.parametrize("nproc", [2, 3])
def test_split_attention_equals_whole_sequence_hidden_states(tiny, tmp_path, torchrun, nproc):
    script = tmp_path / "split_worker.py"
    script.write_text(SPLIT_WORKER)
    proc = torchrun(script, nproc, tiny["teacher"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ERR") == nproc


def test_context_parallel_refuses_what_it_cannot_split(tiny, tmp_path):
    from conftest import gkd_subprocess
    from test_trainer import _assert_one_line_error

    proc = gkd_subprocess("train", "--model", tiny["student"], "--teacher_model", tiny["teacher"], "--dataset", tiny["data"],
                          "--output_dir", str(tmp_path / "o"), "--context_parallel_size", "3", "--global_batch_size", "8")
    _assert_one_line_error(proc, "cannot be split into --tensor_model_parallel_size 1 x --context_parallel_size 3")
    assert not (tmp_path / "o").exists()
