"""`gkd serve` and the remote-teacher client: equality with a local top-k teacher, security, bad input,
faults with retries, and a training run that resumes after its teacher server comes back."""

import json
import queue
import signal
import socket
import threading

import pytest
import torch

from gkd.data.batch import collate
from gkd.data.rows import load_examples
from gkd.errors import GKDError
from gkd.models import load_model, load_tokenizer
from gkd.teacher.local import LocalTeacher
from gkd.teacher.remote import RemoteTeacher
from gkd.teacher.serve import Scorer, _Job
from helpers import API_KEY as KEY  # what the module's server and the training runs use
from helpers import (FaultyProxy, assert_same_run, declare, http, loss_and_head_grad, server_output, start_gkd_serve,
                     stop, train_against_server, train_args)

K = 8


@pytest.fixture(scope="module")
def server(tiny):
    proc, url = start_gkd_serve(tiny["teacher"], "--max_request_bytes", "200000", "--max_model_len", "128",
                                "--max_logprob_entries", "5000", key=KEY)
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def setup(tiny):
    tok = load_tokenizer(tiny["student"])
    rows = load_examples([tiny["data"]], tok, max_length=64, truncation_strategy="left", max_completion_length=16)[:6]
    batch = collate([r.prompt_ids for r in rows], [r.completion_ids for r in rows], tok.pad_token_id)
    return tok, batch


@pytest.mark.slow
@pytest.mark.parametrize("dtype,topk", [("float32", 0), ("float32", K), ("bfloat16", 0)])
def test_hidden_wire_equals_the_local_teacher(tiny, server, setup, dtype, topk):
    """--teacher_wire hidden: the server's final hidden states and the teacher's head (fetched in slices the
    server's limit allows) give the local teacher's loss and gradient, over the full vocabulary or its top-K;
    requests are cut to the server's --max_logprob_entries (5000 here: H x rows)."""
    tok, batch = setup
    student = load_model(tiny["student"])
    local = LocalTeacher(load_model(tiny["teacher"]), torch.device("cpu"), topk=topk)
    remote = RemoteTeacher(server, topk, api_key=KEY, wire="hidden", wire_dtype=dtype).connect(tok)
    assert torch.equal(remote.head.weight, local.model.get_output_embeddings().weight)
    tol = dict(rtol=0, atol=1e-6) if dtype == "float32" else dict(rtol=1e-2, atol=1e-5)  # (the loss is ~4e-3)
    for beta, temperature in [(0.5, 0.9), (0.0, 1.0), (1.0, 0.7)]:
        want = loss_and_head_grad(student, local.score(batch), batch, beta, temperature)
        got = loss_and_head_grad(student, remote.score(batch), batch, beta, temperature)
        torch.testing.assert_close(got[0], want[0], **tol)
        torch.testing.assert_close(got[1], want[1], **tol)


def _hidden_wire(*flags):
    """Against the session's `gkd serve` of the tiny teacher, its hidden states: the full vocabulary."""
    return lambda c, out: train_args(c.models("tiny"), out, "--teacher_model", "", "--teacher_model_server", c.server,
                                     "--teacher_wire", "hidden", *flags)


declare("hidden-wire", 1, _hidden_wire())
declare("hidden-wire-cp2", 2, _hidden_wire("--context_parallel_size", "2"))
declare("hidden-wire-tp2", 2, _hidden_wire("--tensor_model_parallel_size", "2"))


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("name", ["hidden-wire", "hidden-wire-cp2", "hidden-wire-tp2"])
def test_training_on_the_hidden_wire_equals_the_local_full_vocabulary_teacher(runs, name):
    """4 steps (off- and on-policy) with a remote teacher on the hidden wire, on one process, on context
    parallelism 2 (rank 0 asks, the group splits the rows) and on tensor parallelism 2 (each rank takes its
    vocabulary shard of the teacher's head), equal the local full-vocabulary teacher's run."""
    assert_same_run(runs["single"], runs[name])


@pytest.mark.slow
def test_server_teacher_scores_packed_rows_like_padded_ones(tiny, server, setup):
    """--packing: each packed sequence goes to the server alone and its rows land at its place in the pack."""
    tok, padded = setup
    rows = load_examples([tiny["data"]], tok, max_length=64, truncation_strategy="left", max_completion_length=16)[:6]
    packed = collate([r.prompt_ids for r in rows], [r.completion_ids for r in rows], tok.pad_token_id, pack=40)
    assert len(packed.sequences()) == 6 > packed.input_ids.shape[0]
    remote = RemoteTeacher(server, K, api_key=KEY).connect(tok)
    want, got = remote.score(padded), remote.score(packed)
    for (b, start, end), (row, _, n) in zip(packed.sequences(), padded.sequences()):
        assert torch.equal(got.topk_ids[b, start:end], want.topk_ids[row, :n])
        torch.testing.assert_close(got.topk_logprobs[b, start:end], want.topk_logprobs[row, :n], rtol=0, atol=1e-6)
    assert bool(got.topk_logprobs[packed.loss_mask].ne(0).all())


@pytest.mark.slow
@pytest.mark.parametrize("wire", ["compact-float32", "vllm-json", "compact-float16"])
def test_server_teacher_equals_local_topk_teacher(tiny, server, setup, wire):
    tok, batch = setup
    student = load_model(tiny["student"])
    local = LocalTeacher(load_model(tiny["teacher"]), torch.device("cpu"), topk=K)
    remote = RemoteTeacher(server, K, api_key=KEY, wire_dtype=wire.rsplit("-", 1)[-1] if "compact" in wire else "float32")
    remote.connect(tok)
    assert remote.compact  # gkd serve advertises the compact form
    remote.compact = wire.startswith("compact")
    tol = dict(rtol=2e-3, atol=2e-3) if wire.endswith("16") else dict(rtol=1e-5, atol=1e-6)
    for beta, temperature in [(0.5, 0.9), (0.0, 1.0), (1.0, 0.7)]:
        want = loss_and_head_grad(student, local.score(batch), batch, beta, temperature)
        got = loss_and_head_grad(student, remote.score(batch), batch, beta, temperature)
        torch.testing.assert_close(got[0], want[0], **tol)
        torch.testing.assert_close(got[1], want[1], **tol)


@pytest.mark.slow
def test_client_checks_before_training(tiny, server, setup, tmp_path):
    tok, _ = setup
    with pytest.raises(GKDError, match="401"):
        RemoteTeacher(server, K, api_key="wrong", wait=5).connect(tok)
    with pytest.raises(GKDError, match="not ready after"):
        RemoteTeacher("http://127.0.0.1:9", K, wait=1).connect(tok)
    with pytest.raises(GKDError, match="at most 127 tokens, training can make 200"):
        RemoteTeacher(server, K, api_key=KEY).connect(tok).check_fits(200)
    with pytest.raises(GKDError, match="gkd_logits_topk 200"):
        RemoteTeacher(server, 200, api_key=KEY).connect(tok)  # tiny vocabulary is 96
    # a student whose tokenizer differs from the served one
    from tiny import write_model

    other = write_model(tmp_path / "other", layers=1, vocab_size=80)
    with pytest.raises(GKDError, match="tokenizes"):
        RemoteTeacher(server, K, api_key=KEY).connect(load_tokenizer(str(other)))


@pytest.mark.slow
def test_security_limits_and_bad_input(server):
    ok = {"prompt": [5, 6, 7], "max_tokens": 1, "prompt_logprobs": 4}
    for method, path, body in [("GET", "/health", None), ("GET", "/v1/models", None), ("POST", "/v1/completions", ok)]:
        assert http(method, server + path, body)[0] == 401
        assert http(method, server + path, body, key="nope")[0] == 401
    status, answer = http("POST", server + "/v1/completions", ok, key=KEY)
    assert status == 200 and len(answer["choices"][0]["prompt_logprobs"]) == 3
    cases = [
        ({**ok, "prompt_logprobs": 97}, "prompt_logprobs 97 exceeds"),
        ({**ok, "prompt_logprobs": -1}, "prompt_logprobs must be"),
        ({**ok, "prompt": [5, 96]}, "outside the vocabulary"),
        ({**ok, "prompt": [5, -1]}, "outside the vocabulary"),
        ({**ok, "prompt": list(range(5, 90)) * 2}, "limit is 128"),
        ({**ok, "prompt": []}, "prompt must be"),
        ({**ok, "prompt": [[5, 6], ["x"]]}, "prompt[1]"),
        ({**ok, "max_tokens": 5}, "max_tokens"),
        ({**ok, "gkd_wire": {"format": "zip"}}, "gkd_wire"),
        ({**ok, "gkd_wire": {"format": "compact", "rows_from": 3}}, "rows_from"),
        ({**ok, "prompt": list(range(5, 90)), "prompt_logprobs": 96}, "log-probs requested"),
    ]
    for body, words in cases:
        status, answer = http("POST", server + "/v1/completions", body, key=KEY)
        assert status == 400 and words in answer["error"]["message"], (body, answer)
    for raw, words in [(b"{not json", "malformed JSON"), (b"[1, 2]", "JSON object"),
                       (json.dumps({"prompt": [5] * 80000}).encode(), "exceeds the limit")]:
        status, answer = http("POST", server + "/v1/completions", raw=raw, key=KEY)
        assert status == 400 and words in answer["error"]["message"]
    assert http("POST", server + "/nowhere", {}, key=KEY)[0] == 404
    host, port = server.removeprefix("http://").split(":")
    for length in ("-1", "abc"):  # never an unbounded read
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                         f"Content-Length: {length}\r\n\r\n".encode())
            assert sock.recv(4096).split(b"\r\n")[0].endswith(b"400 Bad Request")
    assert http("GET", server + "/health", key=KEY)[0] == 200  # still up after all of it


@pytest.mark.slow
def test_tokenize_and_models(server, setup):
    tok, _ = setup
    status, answer = http("POST", server + "/tokenize", {"prompt": "w1 w2 w3", "add_special_tokens": False}, key=KEY)
    assert status == 200 and answer["tokens"] == tok("w1 w2 w3", add_special_tokens=False)["input_ids"]
    status, answer = http("POST", server + "/tokenize", {"messages": [{"role": "user", "content": "w1"}]}, key=KEY)
    assert answer["tokens"] == tok.apply_chat_template([{"role": "user", "content": "w1"}], add_generation_prompt=True,
                                                       tokenize=True)["input_ids"]
    status, models = http("GET", server + "/v1/models", key=KEY)
    assert models["data"][0]["max_model_len"] == 128 and "compact" in models["data"][0]["gkd"]["wire"]


def test_scorer_batches_concurrent_sequences_and_padding_changes_nothing(tiny, monkeypatch):
    """Sequences that arrive while the first one's batch gathers join it: one padded forward, each sequence
    scored as if alone. Events, not a clock, order it: the others are sent once the scorer waits for them, the
    wait (600 s) outlasts any slow submission, and stop() ends it."""
    gathering = threading.Event()

    class Watched(queue.Queue):
        def get(self, block=True, timeout=None):
            if timeout is not None:  # the loop holds a batch and waits for more
                gathering.set()
            return super().get(block, timeout)

    model = load_model(tiny["teacher"]).eval()
    with monkeypatch.context() as m:
        m.setattr(queue, "Queue", Watched)
        scorer = Scorer(model, max_batch_tokens=4096, wait_s=600)
    calls = []
    inner = scorer._score
    scorer._score = lambda jobs: calls.append(len(jobs)) or inner(jobs)
    seqs = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15]]
    futures = [scorer.submit(seqs[0], 4)]
    assert gathering.wait(30)
    futures += [scorer.submit(s, 4) for s in seqs[1:]]
    scorer.stop()  # the batch is scored, then the loop ends
    batched = [f.result(timeout=30) for f in futures]
    assert calls == [3]  # one forward for the three
    for s, got in zip(seqs, batched):
        alone = inner([_Job(s, 4)])[0]
        for a, b in zip(got, alone):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_sigterm_stops_gracefully(tiny):
    proc, url = start_gkd_serve(tiny["teacher"])
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    out = server_output(proc)
    assert proc.returncode == 0 and "stopped" in out


@pytest.mark.slow
def test_client_retries_then_fails_clearly(server, setup):
    tok, batch = setup
    proxy = FaultyProxy(server, delay_s=12.0)  # the delay outlasts the timeout, which a loaded machine's answers do not
    try:
        remote = RemoteTeacher(proxy.url, K, api_key=KEY, retries=4, timeout=6.0, seqs_per_request=16).connect(tok)
        remote.client.backoff = 0.01
        want = remote.score(batch)
        for compact in (True, False):
            remote.compact = compact
            proxy.plan = ["500", "drop", "truncate", "delay"]
            got = remote.score(batch)
            assert proxy.seen[-5:] == ["500", "drop", "truncate", "delay", "ok"]
            torch.testing.assert_close(got.topk_logprobs, want.topk_logprobs, rtol=1e-5, atol=1e-6)
        proxy.default = "500"
        with pytest.raises(GKDError, match=r"/v1/completions failed after 5 attempts: HTTP 500"):
            remote.score(batch)
    finally:
        proxy.close()


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_training_fails_clearly_and_resumes_when_the_server_is_back(tiny, server, tmp_path):
    proxy = FaultyProxy(server)
    args = ["--model", tiny["student"], "--teacher_model_server", proxy.url, "--gkd_logits_topk", str(K),
            "--dataset", tiny["data"], "--lmbda", "0", "--micro_batch_size", "2", "--global_batch_size", "4",
            "--max_steps", "4", "--save_steps", "2", "--teacher_retries", "1", "--teacher_seqs_per_request", "8",
            "--max_completion_length", "8", "--learning_rate", "1e-3", "--lr_scheduler_type", "constant"]
    try:
        whole = train_against_server(args, tmp_path / "whole")
        assert whole.returncode == 0, whole.stderr[-2000:]
        # the K probe, then one request per micro-batch: fail from step 3 on
        proxy.seen.clear()
        proxy.plan = ["ok"] * 5
        proxy.default = "500"
        broken = train_against_server(args, tmp_path / "run")
        assert broken.returncode == 2
        last = broken.stderr.strip().splitlines()[-1]
        assert last.startswith("gkd: error: teacher server") and proxy.url in last and "HTTP 500" in last
        assert (tmp_path / "run" / "checkpoint-2").is_dir() and not (tmp_path / "run" / "final").exists()
        proxy.default = "ok"
        resumed = train_against_server(args + ["--resume_from_checkpoint", "latest"], tmp_path / "run")
        assert resumed.returncode == 0, resumed.stderr[-2000:]
    finally:
        proxy.close()
    assert _losses(tmp_path / "run")[-2:] == pytest.approx(_losses(tmp_path / "whole")[-2:], rel=1e-6, abs=1e-7)


def test_error_bodies_of_any_shape_give_one_message():
    import io
    import urllib.error

    from gkd.httpclient import _error_text

    for body, want in [(b'{"error": {"message": "bad K"}}', "bad K"), (b'{"message": "oops"}', "oops"),
                       (b'"Bad gateway"', "Bad gateway"), (b'{"error": {"message": ""}}', "Proxy Error"),
                       (b"<html>502</html>", "Proxy Error"), (b"", "Proxy Error")]:
        err = urllib.error.HTTPError("http://x", 502, "Proxy Error", {}, io.BytesIO(body))
        assert _error_text(err) == want


def test_scorer_skips_unwanted_rows_and_ranks(tiny):
    model = load_model(tiny["teacher"]).eval()
    scorer = Scorer(model, max_batch_tokens=4096, wait_s=0.0)
    seq = [5, 6, 7, 8, 9, 10, 11]
    full = scorer._score([_Job(seq, 4)])[0]
    tail = scorer._score([_Job(seq, 4, rows_from=3, actual=False)])[0]
    torch.testing.assert_close(tail[1], full[1][3:], rtol=1e-5, atol=1e-6)
    assert torch.equal(tail[0], full[0][3:]) and tail[2] is None and tail[3] is None
    scorer.stop()
