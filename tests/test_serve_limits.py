"""`gkd serve` bounds: the size of a JSON answer, the time a client may take to send a request, the
SIGTERM drain; a taken port and bad /tokenize messages are clear errors, never tracebacks or 500s.
No test here measures elapsed time: each checks what happened, and in which order (a held scorer, a dropped
socket), with timeouts only to end a test that fails."""

import socket
import threading

import pytest

from gkd.cli import main
from gkd.config import ServeConfig
from gkd.teacher.serve import TeacherServer
from helpers import http


def _serve(model: str, **limits) -> TeacherServer:
    """A server in this process, answering and dropping stalled clients (its reaper) in threads; the scorer
    counts the sequences it is handed (``server.submitted``)."""
    server = TeacherServer(ServeConfig(model=model, port=0, **limits))
    server.submitted = []
    submit = server.scorer.submit
    server.scorer.submit = lambda ids, *a, **kw: server.submitted.append(len(ids)) or submit(ids, *a, **kw)
    threading.Thread(target=server.httpd.serve_forever, daemon=True).start()
    threading.Thread(target=server._reap, daemon=True).start()
    return server


def _close(server: TeacherServer) -> None:
    server.httpd.shutdown()
    server.drain()
    server.httpd.server_close()
    server.scorer.stop()


@pytest.fixture(scope="module")
def default_server(tiny):
    """A server with the default limits, in this process."""
    server = _serve(tiny["teacher"])
    yield server
    _close(server)


def test_default_json_answers_stay_small(default_server):
    """A JSON answer beyond --max_json_logprob_entries is refused before any scoring (no forward, no ~125 MB
    of JSON built and then dropped); the compact form and vLLM-sized JSON requests are still served."""
    url = default_server.address + "/v1/completions"
    # K = the whole vocabulary (96) on 64 x 256 tokens: 1.6 M entries, ~125 MB of JSON before the bound
    body = {"prompt": [[5] * 256] * 64, "max_tokens": 1, "prompt_logprobs": 96}
    default_server.submitted.clear()
    status, answer = http("POST", url, body, timeout=120)
    assert status == 400 and default_server.submitted == []  # the scorer never saw a sequence of it
    assert "--max_json_logprob_entries" in answer["error"]["message"] and "gkd_wire" in answer["error"]["message"]
    # the compact answer of 8 x 256 tokens x K 96 (beyond the JSON bound) is still served
    body.update(prompt=[[5] * 256] * 8, gkd_wire={"format": "compact"})
    status, answer = http("POST", url, body, timeout=120)
    assert status == 200 and "gkd_topk" in answer["choices"][0]
    # and a vLLM-sized JSON request (K 20 on 4 x 256 tokens) as before
    status, answer = http("POST", url, {"prompt": [[5] * 256] * 4, "max_tokens": 1,
                                        "prompt_logprobs": 20})
    assert status == 200 and len(answer["choices"][3]["prompt_logprobs"]) == 256


@pytest.mark.parametrize("messages", [[{"role": 1, "content": "x"}], [{"role": "user"}], [], "hi",
                                      [{"role": "user", "content": ["w1"]}]])
def test_tokenize_with_bad_messages_is_a_400(default_server, messages):
    status, answer = http("POST", default_server.address + "/tokenize", {"messages": messages})
    assert status == 400 and "messages must be" in answer["error"]["message"], answer


def test_a_taken_port_is_one_line(tiny, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", tiny["teacher"], "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--port {port}" in err and "Address already in use" in err, err


def test_a_trickling_client_is_dropped_before_its_request_is_whole(tiny):
    """--request_timeout bounds the whole request: a client that sends its body a byte at a time, each byte well
    within the 60 s per-read timeout, is dropped before the body is complete. (Sending the 40 bytes takes 20 s or
    more, 20 times --request_timeout 1; a server that only timed out reads would answer the whole body.)"""
    server = _serve(tiny["teacher"], request_timeout=1)
    try:
        with socket.create_connection(server.httpd.server_address[:2]) as trickle:
            trickle.sendall(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 40\r\n\r\n")
            trickle.settimeout(0.5)
            said = None  # b"": dropped; b"H" (of an HTTP answer): the whole body arrived and was answered
            for _ in range(40):
                try:
                    trickle.sendall(b" ")
                    said = trickle.recv(1)
                    break
                except TimeoutError:
                    continue
                except OSError:  # reset by the server
                    said = b""
                    break
        assert said == b"", said
    finally:
        _close(server)


def test_the_drain_cuts_idle_clients_at_once_and_lets_requests_in_flight_finish(tiny):
    """What SIGTERM runs (stop accepting, then TeacherServer.drain): an idle keep-alive client is cut at once,
    while a request in flight (its scoring held on an Event) still runs, and that request then gets its answer.
    A drain that waited for idle clients would wait out their 60 s per-read timeout (the drain here may take
    600 s), and the idle socket's 30 s timeout would end the test."""
    server = _serve(tiny["teacher"], drain_timeout=600)
    scoring, release = threading.Event(), threading.Event()
    score = server.scorer._score
    server.scorer._score = lambda jobs: (scoring.set(), release.wait(120), score(jobs))[-1]
    answered = []
    busy = threading.Thread(target=lambda: answered.append(http(
        "POST", server.address + "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 1, "prompt_logprobs": 2},
        timeout=120)), daemon=True)
    drain = threading.Thread(target=server.drain, daemon=True)
    idle = socket.create_connection(server.httpd.server_address[:2], timeout=30)
    try:
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert idle.recv(4096).startswith(b"HTTP/1.1 200")  # answered; the connection stays open, idle
        busy.start()
        assert scoring.wait(60)  # the request is in flight
        server.httpd.shutdown()
        drain.start()
        assert idle.recv(1) == b""  # closed by the server...
        assert busy.is_alive() and not answered  # ...while the request in flight was still being scored
        release.set()
        busy.join(120)
        drain.join(120)
        assert answered and answered[0][0] == 200 and not drain.is_alive()
    finally:
        release.set()
        idle.close()
        server.httpd.shutdown()  # (a no-op once done)
        server.connections.stopped = True  # (the reaper's end, as after a drain)
        server.httpd.server_close()
        server.scorer.stop()


def test_a_drain_past_its_timeout_answers_every_waiting_request_503_and_ends(tiny):
    """Under load, then SIGTERM: twelve requests at once; one is being scored (held on an Event that the drain
    never sees released), the next did not fit that forward (--max_batch_tokens 100) and waits outside the
    queue, ten wait in it. The drain ends at its timeout anyway, and every one of the twelve is answered 503
    (none left without an answer, none scored after the drain); new work is refused 503."""
    server = _serve(tiny["teacher"], drain_timeout=0.5, max_batch_tokens=100, batch_wait_ms=60_000)
    scoring, release = threading.Event(), threading.Event()
    score = server.scorer._score
    server.scorer._score = lambda jobs: (scoring.set(), release.wait(120), score(jobs))[-1]
    url = server.address + "/v1/completions"
    answers = []

    def ask():
        answers.append(http("POST", url, {"prompt": [5, 6, 7] * 20, "max_tokens": 1, "prompt_logprobs": 2},
                            timeout=120))

    clients = [threading.Thread(target=ask, daemon=True) for _ in range(12)]
    try:
        for c in clients:
            c.start()
        # the scorer waits (batch_wait_ms) until a second request comes and does not fit: then it scores the first
        assert scoring.wait(60)
        while len(server.submitted) < 12:
            assert all(c.is_alive() for c in clients), answers
            threading.Event().wait(0.02)
        server.httpd.shutdown()
        server.drain()  # returns with the forward still held
        assert not release.is_set()
        for c in clients:
            c.join(60)
        assert sorted(a[0] for a in answers) == [503] * 12, answers
        assert "drain timeout" in answers[0][1]["error"]["message"]
        with pytest.raises(Exception, match="shutting down"):
            server.scorer.submit([5, 6], 2)
    finally:
        release.set()
        server.httpd.server_close()
        server.scorer.stop()


def test_gkd_serve_exits_0_when_sigterm_finds_a_forward_that_outlasts_the_drain(tiny):
    """The real command: a forward that never ends (held) with eleven requests waiting behind it, then SIGTERM.
    All twelve get their 503 and the process exits 0 (it does not wait for the forward, nor abort under it)."""
    import signal
    import subprocess
    import sys

    from helpers import ENV, ROOT, free_port, wait_healthy

    port = free_port()
    script = ("import sys, threading\n"
              "from gkd.teacher.serve import Scorer\n"
              "def held(self, jobs):\n"
              "    threading.Event().wait()\n"
              "submit = Scorer.submit\n"
              "def told(self, *a, **kw):\n"
              "    future = submit(self, *a, **kw)\n"
              "    sys.stdout.write('<queued>')\n"
              "    sys.stdout.flush()\n"
              "    return future\n"
              "Scorer._score, Scorer.submit = held, told\n"
              "from gkd.cli import main\n"
              f"main(['serve', '--model', {tiny['teacher']!r}, '--port', '{port}', '--drain_timeout', '1'])\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV, cwd=ROOT)
    said = []  # what it printed, read as it comes (a thread: a read would block the test)
    reader = threading.Thread(target=lambda: said.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}"
    answers = []
    try:
        wait_healthy(url, proc)
        clients = [threading.Thread(target=lambda: answers.append(http(
            "POST", url + "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 1, "prompt_logprobs": 2},
            timeout=120)), daemon=True) for _ in range(12)]
        for c in clients:
            c.start()
        pause = threading.Event()
        for _ in range(1200):  # all twelve taken: the first one's forward runs (held), the rest wait behind it
            if "".join(said).count("<queued>") == 12 or proc.poll() is not None:
                break
            pause.wait(0.1)
        assert "".join(said).count("<queued>") == 12, "".join(said)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        reader.join(10)
        for c in clients:
            c.join(60)
    finally:
        proc.kill()
    out = "".join(said)
    assert proc.returncode == 0, out
    assert [a[0] for a in answers] == [503] * 12, (answers, out)
    assert "stopped" in out and "Traceback" not in out and "terminate" not in out, out


def test_unserved_methods_models_and_malformed_headers_are_json_errors(default_server):
    """PUT / OPTIONS / DELETE get a JSON 405 (not the base class's HTML 501 page), HEAD a bodiless 405; a body
    nested 100k deep is a 400 (not an empty reply); two Content-Length headers are a 400; a "model" this
    server does not serve is a 404 naming the one it serves."""
    from http.client import HTTPConnection

    host, port = default_server.httpd.server_address[:2]
    for method in ("PUT", "OPTIONS", "DELETE"):
        status, answer = http(method, default_server.address + "/v1/completions", {"prompt": [5]})
        assert status == 405 and "not served here" in answer["error"]["message"], (method, status, answer)
    conn = HTTPConnection(host, port, timeout=30)
    conn.request("HEAD", "/health")
    r = conn.getresponse()
    assert r.status == 405 and r.read() == b""
    conn.close()
    deep = b"[" * 100_000 + b"]" * 100_000
    status, answer = http("POST", default_server.address + "/v1/completions", raw=deep)
    assert status == 400 and "nested too deep" in answer["error"]["message"]
    with socket.create_connection((host, port), timeout=30) as s:
        body = b'{"prompt": [5, 6], "prompt_logprobs": 1}'
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nContent-Length: 3\r\n\r\n%s"
                  % (len(body), body))
        said = b""
        while chunk := s.recv(4096):  # to the end: the server closes the connection after a 400
            said += chunk
    assert said.startswith(b"HTTP/1.1 400") and b"exactly one Content-Length" in said, said
    status, answer = http("POST", default_server.address + "/v1/completions",
                          {"model": "someone-else", "prompt": [5, 6], "max_tokens": 1, "prompt_logprobs": 1})
    assert status == 404 and "'someone-else' is not served here" in answer["error"]["message"]
    status, _ = http("POST", default_server.address + "/v1/completions",
                     {"model": default_server.name, "prompt": [5, 6], "max_tokens": 1, "prompt_logprobs": 1})
    assert status == 200


def test_the_default_bounds_are_finite():
    cfg = ServeConfig(model="m")
    assert cfg.request_timeout <= 60 and cfg.drain_timeout <= 30 and cfg.max_json_logprob_entries <= 2**17


@pytest.mark.parametrize("flag,value,message", [
    ("--max_model_len", "100000", "--max_model_len 100000 is beyond the model's context of 256 positions"),
    ("--max_model_len", "-1", "--max_model_len must be >= 1 (or 0: the model's own), got -1"),
    ("--max_logprobs", "-5", "--max_logprobs must be >= 1 (or 0: the model's own), got -5"),
    ("--max_logprobs", "1000", "--max_logprobs 1000 is beyond the model's vocabulary of 96"),
])
def test_limits_the_model_cannot_meet_are_refused_at_start(tiny, capsys, flag, value, message):
    """A limit the server would advertise and not meet, or one that refuses every request, stops it at start in
    one line (it started, and then answered 200 beyond the model's context, or refused everything)."""
    assert main(["serve", "--model", tiny["teacher"], "--port", "0", flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gkd: error: ") and message in err, err
