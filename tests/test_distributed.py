"""Training on several processes (torchrun, gloo on 127.0.0.1) equals one process, and resumes across meshes.

Each mesh runs `gkd train` on the same global batch as a single-process run (helpers.train_args: seed 42 and
lmbda 0.5, so steps 1 and 3 are off-policy, steps 2 and 4 on-policy, with seeded sampling); the runs are the
session's (helpers.Runs: every mesh once, many per launch)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gkd.train.metrics import read_metrics
from helpers import (ENV, LORA, assert_one_line_mistake, assert_same_run, check_resume, declare, declare_training,
                     final_weights, free_port, gkd_in_process, gkd_subprocess, kill_and_resume, losses, resumed_from,
                     set_arg, train_args)

SLOW = [pytest.mark.slow, pytest.mark.dist]

MESHES = {  # name: (processes, flags, the single-process run it must equal); 0 processes: its own command
    "dp2": (2, ["--data_parallel_replicate_size", "2"], "single"),
    # the shortcut: gkd runs itself under torchrun; on CPU offloading is a no-op (said once)
    "fsdp2": (0, ["--nproc_per_node", "2", "--offload_teacher_model", "true"], "single"),
    "tp2": (2, ["--tensor_model_parallel_size", "2"], "single"),
    "fsdp2xtp2": (4, ["--tensor_model_parallel_size", "2"], "single"),
    "fsdp2-lora": (2, LORA, "single-lora"),
    "hsdp2x2": (4, ["--data_parallel_replicate_size", "2"], "single"),
    # gradients kept whole until the step's last micro-batch, layers gathered per decoded token
    "fsdp2-late-sync": (2, ["--reduce_scatter_every_micro_batch", "false", "--gather_for_generation", "false"],
                        "single"),
}
for _name, (_nproc, _flags, _) in MESHES.items():
    declare_training(_name, _nproc, _flags)

RESUMES = [("tp2", "single"), ("fsdp2", "single"), ("single", "tp2"), ("fsdp2-lora", "single-lora")]
for _saved, _on in RESUMES:  # the saved run's step-2 checkpoint, resumed on one process or on another mesh
    declare(f"resume-{_saved}-on-{_on}", 1 if _on.startswith("single") else MESHES[_on][0],
            resumed_from(_saved, lora=LORA if "lora" in _saved else [],
                         flags=[] if _on.startswith("single") else MESHES[_on][1]), after=(_saved,), mkdir=True)

# Phi-3 (fused projections regrouped over the TP ranks) and OLMo 2 (q/k norms split with their projections): a
# TP = 2 checkpoint holds their weights and AdamW state in the folders' layout, so one process resumes it
REGROUPED = ("phi3", "olmo2")


def _family_models(c, family: str) -> dict:
    def make():
        from families import write_family

        root = c.root / f"family-{family}"
        return {**c.models("tiny"), "student": str(write_family(root / "student", family, seed=2)),
                "teacher": str(write_family(root / "teacher", family, layers=3, seed=1))}

    return c.once(f"family-{family}", make)


for _family in REGROUPED:
    declare(f"tp2-{_family}", 2, lambda c, out, f=_family: train_args(_family_models(c, f), out,
                                                                      "--tensor_model_parallel_size", "2"))
    declare(f"resume-tp2-{_family}-on-single", 1,
            lambda c, out, f=_family: train_args(_family_models(c, f), out, "--resume_from_checkpoint",
                                                 str(c.out(f"tp2-{f}") / "checkpoint-2")),
            after=(f"tp2-{_family}",), mkdir=True)

# --eval_steps with FSDP = 2 against one process
EVAL = ["--eval_steps", "2", "--split_dataset_ratio", "0.3", "--global_batch_size", "4"]
declare_training("eval-single", 1, EVAL)
declare_training("eval-fsdp2", 2, EVAL)
declare_training("eval-tp2", 2, [*EVAL, "--tensor_model_parallel_size", "2"])  # the heads' vocabulary split
declare_training("eval-cp2", 2, [*EVAL, "--context_parallel_size", "2"])  # peers evaluate the same rows whole
declare_training("eval-pp2", 2, [*EVAL, "--pipeline_model_parallel_size", "2"])  # through the stages, last one counts

# DistiLLM's adaptive schedule: 8 steps, steps 2 fresh and 4, 6, 7 replayed (seed 42's draws at share 0.5); the
# replay buffer holds the global batch's samples, so FSDP = 2 trains on the rows and samples one process does
ADAPTIVE = ["--lmbda_schedule", "adaptive", "--replay_capacity", "8", "--eval_steps", "4", "--split_dataset_ratio",
            "0.3", "--max_steps", "8"]
declare_training("adaptive-single", 1, ADAPTIVE)
declare_training("adaptive-fsdp2", 2, ADAPTIVE)


def _with_generation_config(c, out):
    """A student whose generation config holds a list of EOS ids and a sampling default, in bfloat16."""
    def make():
        model = c.root / "genconfig-student"
        shutil.copytree(c.models("tiny")["student"], model)
        gen = json.loads((model / "generation_config.json").read_text())
        gen.update(eos_token_id=[4, 2], repetition_penalty=1.3)
        (model / "generation_config.json").write_text(json.dumps(gen))
        return str(model)

    return train_args({**c.models("tiny"), "student": c.once("genconfig-student", make)}, out, "--torch_dtype",
                      "bfloat16")


declare("genconfig-fsdp2", 2, _with_generation_config)
declare("offload-worker", 2, lambda c, out: [c.models("tiny")["teacher"]], call="offload_worker:run")
# the same 1-step context-parallel training twice in one pair of processes (a mesh of 5 dimensions + a flattened one)
declare("twice-cp2", 2, lambda c, out: [out, *set_arg(train_args(c.models("tiny"), out, "--context_parallel_size",
                                                                 "2"), "--max_steps", "1")],
        call="repeat_worker:run", mkdir=True)


@pytest.mark.slow
@pytest.mark.dist
def test_a_second_training_in_the_same_processes_makes_no_new_groups(runs):
    """A launcher that keeps one default group over several trainings (as tests/dist/batch_worker.py does) must
    not gain a mesh of process groups, with their threads and sockets, per training."""
    out = runs["twice-cp2"]
    for rank in (0, 1):
        first, second = json.loads((out / f"held.rank-{rank}.json").read_text())
        assert second["groups"] == first["groups"], (rank, first, second)
        assert second["threads"] <= first["threads"], (rank, first, second)
    assert losses(out / "run1") == losses(out / "run2")


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.slow
@pytest.mark.dist
def test_mesh_equals_the_single_process_run(runs, tiny, mesh):
    _, _, w = assert_same_run(runs[MESHES[mesh][2]], runs[mesh])
    from safetensors.torch import load_file

    start = load_file(str(Path(tiny["student"]) / "model.safetensors"))
    assert max(float((w[k] - start[k]).abs().max()) for k in start) > 1e-4, "training changed nothing"


@pytest.mark.slow
@pytest.mark.dist
def test_tensor_parallel_halves_parameter_and_optimizer_memory(runs):
    one, tp = read_metrics(runs["single"] / "metrics.jsonl")[-1], read_metrics(runs["tp2"] / "metrics.jsonl")[-1]
    fsdp = read_metrics(runs["fsdp2"] / "metrics.jsonl")[-1]
    for key in ("param_mib_per_rank", "optimizer_mib_per_rank"):
        # every weight but the norms is split; the norms are a few hundred floats of the tiny model
        assert 0.45 <= tp[key] / one[key] <= 0.6, (key, tp[key], one[key])
        assert 0.45 <= fsdp[key] / one[key] <= 0.6, (key, fsdp[key], one[key])
    # the teacher: TP splits it all; FSDP its layers (embedding and lm_head stay whole), and keeps them
    # split after its forwards
    key = "teacher_mib_per_rank"
    assert 0.45 <= tp[key] / one[key] <= 0.6, (tp[key], one[key])
    assert 0.5 <= fsdp[key] / one[key] <= 0.7, (fsdp[key], one[key])


@pytest.mark.parametrize("saved,resumed", RESUMES)
@pytest.mark.slow
@pytest.mark.dist
def test_resume_on_another_mesh(runs, saved, resumed):
    check_resume(runs[f"resume-{saved}-on-{resumed}"], runs["single-lora" if "lora" in saved else "single"])


@pytest.mark.parametrize("family", REGROUPED)
@pytest.mark.slow
@pytest.mark.dist
def test_a_tp2_checkpoint_of_a_regrouped_family_resumes_on_one_process(runs, family):
    """One process resumes the TP = 2 run's step-2 checkpoint with that run's losses and final weights (whose TP = 2
    steps equal the naive ones: test_families_dist.py)."""
    check_resume(runs[f"resume-tp2-{family}-on-single"], runs[f"tp2-{family}"])


@pytest.mark.slow
@pytest.mark.dist
def test_a_killed_rank_ends_the_job_and_leaves_the_last_checkpoint(tiny, tmp_path):
    kill_and_resume(tiny, tmp_path / "killed", [], single_resume=True)


@pytest.mark.parametrize("mistake,message", [
    pytest.param(["--global_batch_size", "3"], "--global_batch_size 3 must be a multiple of --micro_batch_size 2 x "
                 "data-parallel", marks=SLOW, id="batch-real-command"),
    pytest.param(["--dataset", "/nonexistent/rows.jsonl"], "/nonexistent/rows.jsonl: no such file", marks=SLOW,
                 id="found-by-the-workers"),
])
def test_mistakes_under_several_processes_are_one_line(tiny, tmp_path, request, mistake, message):
    """Caught before any process starts (in this process, but for one real command) or by the workers."""
    args = train_args(tiny, tmp_path / "o", "--nproc_per_node", "2", *mistake)
    real = request.node.get_closest_marker("slow") is not None
    assert_one_line_mistake(gkd_subprocess(*args, timeout=120) if real else gkd_in_process(*args), message)
    assert not (tmp_path / "o" / "final").exists()


@pytest.mark.slow
@pytest.mark.dist
def test_generation_config_survives_loading_on_several_processes(runs):
    """Every rank builds its model from rank 0's config: the generation config (a list of EOS ids, a
    sampling default) must reach the skeletons and the export, in bfloat16 too."""
    exported = json.loads((runs["genconfig-fsdp2"] / "final" / "generation_config.json").read_text())
    assert exported["eos_token_id"] == [4, 2] and exported["repetition_penalty"] == 1.3


@pytest.mark.parametrize("fixed_ranks", [False, True])
@pytest.mark.slow
@pytest.mark.dist
def test_two_nodes_equal_one_process(tiny, runs, tmp_path, fixed_ranks):
    """Two "machines" on 127.0.0.1 (one process each) meet at a rendezvous and train as one job."""
    out = tmp_path / "nodes"
    endpoint = f"127.0.0.1:{free_port()}"
    procs = []
    for node in range(2):
        args = ["--nnodes", "2", "--rdzv_endpoint", endpoint, "--rdzv_id", f"job-{fixed_ranks}"]
        if fixed_ranks:
            args += ["--node_rank", str(node)]
        procs.append(subprocess.Popen([sys.executable, "-m", "gkd", *train_args(tiny, out, *args)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    single = runs["single"]
    la, lb = losses(single), losses(out)
    assert all(abs(la[s] - lb[s]) <= 1e-5 for s in la), (la, lb)
    wa, wb = final_weights(single), final_weights(out)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5, msg=k)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("name", ["eval-fsdp2", "eval-tp2", "eval-cp2", "eval-pp2"])
def test_evaluation_during_training_is_sharded_and_equals_one_process(runs, name):
    """--eval_steps with FSDP = 2: each rank evaluates its share of the held-out rows (5 rows: one rank
    pads), the sums are reduced, and the metrics equal one process's (the repetition shares: ratios of
    summed counts, padding row left out). TP = 2: both ranks evaluate every row with the heads' vocabulary
    split; CP = 2: both evaluate every row whole (generation and scoring are not split); PP = 2: both stages
    sample every row through the pipeline, and the last stage's sums alone count."""
    evals = {n: [m for m in read_metrics(runs[n] / "metrics.jsonl") if "eval_divergence" in m]
             for n in ("eval-single", name)}
    assert [m["step"] for m in evals["eval-single"]] == [2, 4] == [m["step"] for m in evals[name]]
    for a, b in zip(evals["eval-single"], evals[name]):
        for key in ("eval_divergence", "eval_top1_agreement", "eval_teacher_logprob_of_student",
                    "eval_student_completion_length", "eval_student_repeated_4gram_share", "eval_student_distinct_2",
                    "eval_teacher_repeated_4gram_share", "eval_teacher_distinct_2"):
            assert abs(a[key] - b[key]) <= 1e-5, (key, a, b)


@pytest.mark.slow
@pytest.mark.dist
def test_the_adaptive_schedule_replays_the_same_rows_and_samples_on_two_processes(runs):
    ref, got = (read_metrics(runs[n] / "metrics.jsonl") for n in ("adaptive-single", "adaptive-fsdp2"))
    steps = [m for m in ref if "loss" in m]
    assert [m["step"] for m in steps if m.get("replay_share")] == [4, 6, 7]  # replays are compared
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        assert a.keys() == b.keys() and a["step"] == b["step"]
        for key in ("loss", "eval_divergence", "student_data_share", "replay_buffer_rows", "replay_share",
                    "on_policy_share", "completion_length"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-5, (key, a, b)
    w_ref, w = final_weights(runs["adaptive-single"]), final_weights(runs["adaptive-fsdp2"])
    for k in w_ref:
        torch.testing.assert_close(w[k], w_ref[k], rtol=0, atol=1e-5, msg=k)


@pytest.mark.slow
@pytest.mark.dist
def test_offloading_the_teacher_on_cpu_says_so_once(runs):
    assert runs.output("fsdp2").count("--offload_teacher_model: training runs on the CPU") == 1


@pytest.mark.slow
@pytest.mark.dist
def test_teacher_shards_offloaded_by_fsdp_score_the_same(runs):
    """The GPU path of --offload_teacher_model under FSDP (shards in CPU memory between uses), run on CPU."""
    assert runs.stdout("offload-worker").count("OK rank") == 2


_LEFT_THREADS = """
import atexit, gc, glob, sys
def threads_left():
    gc.collect()
    print(sorted(open(task + "/comm").read().strip() for task in glob.glob("/proc/self/task/*")), flush=True)
atexit.register(threads_left)  # registered first: runs last, after gkd's own exit handlers
import gkd.parallel  # what every gkd process imports before it makes a group
from gkd.parallel.groups import made
import torch.distributed as dist
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[1], rank=0, world_size=1)
made(("probe",), lambda: dist.new_group([0]))  # gkd keeps the groups it makes for later trainings
import torch.distributed.nn  # imported once a group exists (transformers does, loading a config)
dist.destroy_process_group()
"""


def test_a_destroyed_group_leaves_no_gloo_threads_to_abort_the_exit():
    """A group its owner destroyed must not reach the interpreter's exit alive: its gloo threads, racing the
    exit, sometimes abort a finished process (SIGABRT after every rank succeeded, as a 3-rank context-parallel
    run did). Neither torch.distributed.nn, which binds the default group into its functions' defaults when
    imported, nor gkd's cache of the groups it made may keep one."""
    proc = subprocess.run([sys.executable, "-c", _LEFT_THREADS, str(free_port())], capture_output=True, text=True,
                          timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    threads = proc.stdout.strip().splitlines()[-1]
    assert "gloo" not in threads, threads
