"""Training on several processes (torchrun, gloo on 127.0.0.1) equals one process, and resumes across meshes.

Each mesh runs `gkd train` itself under torchrun on the same global batch as a single-process run; with
seed 42 and lmbda 0.5 steps 1 and 3 are off-policy, steps 2 and 4 on-policy (seeded sampling)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ENV, free_port
from gkd.train.metrics import read_metrics

pytestmark = pytest.mark.dist

LORA = ["--train_type", "lora", "--lora_rank", "4", "--lora_dropout", "0", "--merge_lora", "true"]
MESHES = {  # name: (processes, flags, the single-process run it must equal)
    "dp2": (2, ["--data_parallel_replicate_size", "2"], "single"),
    "fsdp2": (2, [], "single"),
    "tp2": (2, ["--tensor_model_parallel_size", "2"], "single"),
    "fsdp2xtp2": (4, ["--tensor_model_parallel_size", "2"], "single"),
    "fsdp2-lora": (2, LORA, "single-lora"),
    "hsdp2x2": (4, ["--data_parallel_replicate_size", "2"], "single"),
    # gradients kept whole until the step's last micro-batch, layers gathered per decoded token
    "fsdp2-late-sync": (2, ["--reduce_scatter_every_micro_batch", "false", "--gather_for_generation", "false"], "single"),
}


def train_args(tiny, out, *extra):
    return ["train", "--model", tiny["student"], "--teacher_model", tiny["teacher"], "--dataset", tiny["data"],
            "--output_dir", str(out), "--max_completion_length", "6", "--learning_rate", "1e-3",
            "--lr_scheduler_type", "constant", "--micro_batch_size", "2", "--global_batch_size", "8",
            "--progress_bar", "false", "--lmbda", "0.5", "--sft_alpha", "0.3", "--max_steps", "4",
            "--save_steps", "2", *extra]


def torchrun_cmd(nproc: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
            "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "gkd", *args]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def final_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


def losses(out: Path) -> dict:
    return {m["step"]: m["loss"] for m in read_metrics(out / "metrics.jsonl")}


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    done = {"single": root / "single", "single-lora": root / "single-lora", "tiny": tiny["student"]}
    run([sys.executable, "-m", "gkd", *train_args(tiny, done["single"])])
    run([sys.executable, "-m", "gkd", *train_args(tiny, done["single-lora"], *LORA)])
    for name, (nproc, flags, _) in MESHES.items():
        done[name] = root / name
        if name == "fsdp2":  # the shortcut: gkd runs itself under torchrun; on CPU offloading is a no-op
            proc = run([sys.executable, "-m", "gkd", *train_args(tiny, done[name], "--nproc_per_node", "2",
                                                                 "--offload_teacher_model", "true")])
            done["fsdp2-output"] = proc.stdout + proc.stderr
        else:
            run(torchrun_cmd(nproc, train_args(tiny, done[name], *flags)))
    return done


def assert_same_run(single: Path, other: Path) -> tuple[list, list, dict]:
    """``other``'s loss at every step and final weights equal ``single``'s within 1e-5, on off- and
    on-policy steps; returns (single's metrics, other's metrics, other's final weights)."""
    ref, got = read_metrics(single / "metrics.jsonl"), read_metrics(other / "metrics.jsonl")
    assert [m["on_policy_share"] for m in ref] == [0.0, 1.0, 0.0, 1.0]  # both kinds of step are compared
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])
        assert a["on_policy_share"] == b["on_policy_share"] and a["completion_length"] == b["completion_length"]
    w_ref, w = final_weights(single), final_weights(other)
    assert w_ref.keys() == w.keys()
    for k in w_ref:
        torch.testing.assert_close(w[k], w_ref[k], rtol=0, atol=1e-5, msg=k)
    return ref, got, w


@pytest.mark.parametrize("mesh", list(MESHES))
def test_mesh_equals_the_single_process_run(runs, mesh):
    _, _, w = assert_same_run(runs[MESHES[mesh][2]], runs[mesh])
    from safetensors.torch import load_file

    start = load_file(str(Path(runs["tiny"]) / "model.safetensors"))
    assert max(float((w[k] - start[k]).abs().max()) for k in start) > 1e-4, "training changed nothing"


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


@pytest.mark.parametrize("saved,resumed", [("tp2", "single"), ("fsdp2", "single"), ("single", "tp2"),
                                           ("fsdp2-lora", "single-lora")])
def test_resume_on_another_mesh(runs, tiny, tmp_path, saved, resumed):
    check_resume(runs, tiny, tmp_path, saved, None if resumed.startswith("single") else MESHES[resumed][:2])


def check_resume(runs, tiny, tmp_path, saved: str, mesh: tuple[int, list[str]] | None) -> None:
    """Resuming ``saved``'s step-2 checkpoint on one process (mesh None) or (processes, flags) gives the
    uninterrupted single-process run's losses at steps 3 and 4."""
    out = tmp_path / "resumed"
    out.mkdir()
    lora = LORA if "lora" in saved else []
    args = train_args(tiny, out, "--resume_from_checkpoint", str(runs[saved] / "checkpoint-2"), *lora)
    if mesh is None:
        run([sys.executable, "-m", "gkd", *args])
    else:
        run(torchrun_cmd(mesh[0], args + mesh[1]))
    ref, got = losses(runs["single-lora" if lora else "single"]), losses(out)
    assert sorted(got) == [3, 4]  # step 3 is off-policy, step 4 on-policy
    for step in (3, 4):
        assert abs(got[step] - ref[step]) <= 1e-5, (step, got[step], ref[step])


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(x) for x in (task / "children").read_text().split()]
    return kids


def test_a_killed_rank_ends_the_job_and_leaves_the_last_checkpoint(tiny, tmp_path):
    kill_and_resume(tiny, tmp_path / "killed", [], single_resume=True)


def kill_and_resume(tiny, out: Path, flags: list[str], single_resume: bool) -> None:
    """A 2-process run with ``flags`` loses its rank 1 to SIGKILL after its first checkpoint: the job must
    end non-zero, and the newest checkpoint must resume (on one process, or on the same 2-process mesh)."""
    args = train_args(tiny, out, *flags)
    args[args.index("--max_steps") + 1] = "100000"
    job = subprocess.Popen(torchrun_cmd(2, args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env=ENV)
    deadline = time.time() + 240
    while not list(out.glob("checkpoint-*/gkd_checkpoint.json")) and time.time() < deadline:
        time.sleep(0.05)
    workers = _children(job.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    try:
        job.wait(timeout=90)
    except subprocess.TimeoutExpired:
        job.kill()
        pytest.fail("the job hung after a rank was killed")
    assert job.returncode != 0
    from gkd.train.checkpoint import resolve

    step = int(resolve("latest", out).name.split("-")[1])
    resume = train_args(tiny, out, "--resume_from_checkpoint", "latest", *([] if single_resume else flags))
    resume[resume.index("--max_steps") + 1] = str(step + 1)
    # the newest complete checkpoint loads and training goes on
    run([sys.executable, "-m", "gkd", *resume] if single_resume else torchrun_cmd(2, resume))
    assert max(losses(out)) == step + 1


@pytest.mark.parametrize("mistake,message", [
    (["--global_batch_size", "3"], "--global_batch_size 3 must be a multiple of --micro_batch_size 2 x data-parallel"),
    (["--eval_steps", "2", "--tensor_model_parallel_size", "2"], "--eval_steps with tensor, context or pipeline parallelism"),
    (["--dataset", "/nonexistent/rows.jsonl"], "/nonexistent/rows.jsonl: no such file"),  # found by the workers
])
def test_mistakes_under_several_processes_are_one_line(tiny, tmp_path, mistake, message):
    proc = subprocess.run([sys.executable, "-m", "gkd", *train_args(tiny, tmp_path / "o", "--nproc_per_node", "2",
                                                                    *mistake)],
                          capture_output=True, text=True, timeout=120, env=ENV)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn(" not in ln]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (proc.returncode, proc.stderr[-2000:])
    assert not (tmp_path / "o" / "final").exists()


def test_generation_config_survives_loading_on_several_processes(tiny, tmp_path):
    """Every rank builds its model from rank 0's config: the generation config (a list of EOS ids, a
    sampling default) must reach the skeletons and the export, in bfloat16 too."""
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny["student"], model)
    gen = json.loads((model / "generation_config.json").read_text())
    gen.update(eos_token_id=[4, 2], repetition_penalty=1.3)
    (model / "generation_config.json").write_text(json.dumps(gen))
    args = train_args(tiny, tmp_path / "o", "--nproc_per_node", "2", "--torch_dtype", "bfloat16")
    args[args.index("--model") + 1] = str(model)
    run([sys.executable, "-m", "gkd", *args])
    exported = json.loads((tmp_path / "o" / "final" / "generation_config.json").read_text())
    assert exported["eos_token_id"] == [4, 2] and exported["repetition_penalty"] == 1.3


@pytest.mark.parametrize("fixed_ranks", [False, True])
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


def test_evaluation_during_training_is_sharded_and_equals_one_process(tiny, tmp_path):
    """--eval_steps with FSDP = 2: each rank evaluates its share of the held-out rows (5 rows: one rank
    pads), the sums are reduced, and the metrics equal one process's."""
    evals = {}
    for name, extra in (("one", []), ("two", ["--nproc_per_node", "2"])):
        out = tmp_path / name
        run([sys.executable, "-m", "gkd", *train_args(tiny, out, "--eval_steps", "2", "--split_dataset_ratio", "0.3",
                                                      "--global_batch_size", "4", *extra)])
        evals[name] = [m for m in read_metrics(out / "metrics.jsonl") if "eval_divergence" in m]
    assert [m["step"] for m in evals["one"]] == [2, 4] == [m["step"] for m in evals["two"]]
    for a, b in zip(evals["one"], evals["two"]):
        for key in ("eval_divergence", "eval_top1_agreement", "eval_teacher_logprob_of_student",
                    "eval_student_completion_length"):
            assert abs(a[key] - b[key]) <= 1e-5, (key, a, b)


def test_offloading_the_teacher_on_cpu_says_so_once(runs):
    assert runs["fsdp2-output"].count("--offload_teacher_model: training runs on the CPU") == 1


def test_teacher_shards_offloaded_by_fsdp_score_the_same(tiny, torchrun):
    """The GPU path of --offload_teacher_model under FSDP (shards in CPU memory between uses), run on CPU."""
    proc = torchrun(Path(__file__).parent / "dist" / "offload_worker.py", 2, tiny["teacher"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("OK rank") == 2
