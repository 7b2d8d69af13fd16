"""`gkd serve` bounds: the size of a JSON answer, the time a client may take to send a request, the
SIGTERM drain; a taken port and bad /tokenize messages are clear errors, never tracebacks or 500s."""

import signal
import socket
import threading
import time

import pytest

from gkd.cli import main
from gkd.config import ServeConfig
from gkd.teacher.serve import TeacherServer
from helpers import http, start_gkd_serve


@pytest.fixture(scope="module")
def default_server(tiny):
    """A server with the default limits, in this process."""
    server = TeacherServer(ServeConfig(model=tiny["teacher"], port=0))
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    yield server.address
    server.httpd.shutdown()
    server.drain()
    server.httpd.server_close()
    server.scorer.stop()


def test_default_json_answers_stay_small(default_server):
    # K = the whole vocabulary (96) on 64 x 256 tokens: 1.6 M entries, ~125 MB of JSON before the bound
    body = {"model": "m", "prompt": [[5] * 256] * 64, "max_tokens": 1, "prompt_logprobs": 96}
    t0 = time.monotonic()
    status, answer = http("POST", default_server + "/v1/completions", body, timeout=120)
    assert status == 400 and time.monotonic() - t0 < 5
    assert "--max_json_logprob_entries" in answer["error"]["message"] and "gkd_wire" in answer["error"]["message"]
    # the compact answer of 8 x 256 tokens x K 96 (beyond the JSON bound) is still served
    body.update(prompt=[[5] * 256] * 8, gkd_wire={"format": "compact"})
    status, answer = http("POST", default_server + "/v1/completions", body, timeout=120)
    assert status == 200 and "gkd_topk" in answer["choices"][0]
    # and a vLLM-sized JSON request (K 20 on 4 x 256 tokens) as before
    status, answer = http("POST", default_server + "/v1/completions",
                          {"model": "m", "prompt": [[5] * 256] * 4, "max_tokens": 1, "prompt_logprobs": 20})
    assert status == 200 and len(answer["choices"][3]["prompt_logprobs"]) == 256


@pytest.mark.parametrize("messages", [[{"role": 1, "content": "x"}], [{"role": "user"}], [], "hi",
                                      [{"role": "user", "content": ["w1"]}]])
def test_tokenize_with_bad_messages_is_a_400(default_server, messages):
    status, answer = http("POST", default_server + "/tokenize", {"model": "m", "messages": messages})
    assert status == 400 and "messages must be" in answer["error"]["message"], answer


def test_a_taken_port_is_one_line(tiny, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", tiny["teacher"], "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--port {port}" in err and "Address already in use" in err, err


@pytest.mark.slow
def test_trickling_clients_are_dropped_and_sigterm_does_not_wait_for_idle_ones(tiny):
    proc, url = start_gkd_serve(tiny["teacher"], "--request_timeout", "2", "--drain_timeout", "5")
    host, port = url.removeprefix("http://").split(":")
    try:
        # one byte of the body at a time, each well within any per-read timeout
        trickle = socket.create_connection((host, int(port)))
        trickle.sendall(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n")
        t0, dropped = time.monotonic(), None
        for _ in range(20):
            try:
                trickle.sendall(b" ")
                trickle.settimeout(0.5)
                if trickle.recv(1) == b"":
                    dropped = time.monotonic() - t0
                    break
            except socket.timeout:
                continue
            except OSError:
                dropped = time.monotonic() - t0
                break
        assert dropped is not None and dropped < 10, dropped  # bounded by --request_timeout 2 (not 60 s per read)
        # a keep-alive client that answered one request and now idles
        idle = socket.create_connection((host, int(port)))
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert idle.recv(4096).startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0 and time.monotonic() - t0 < 20, (time.monotonic() - t0, out)  # not the 61 s idle wait
        assert idle.recv(1) == b""  # closed by the server, not left hanging
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_the_default_bounds_are_finite():
    cfg = ServeConfig(model="m")
    assert cfg.request_timeout <= 60 and cfg.drain_timeout <= 30 and cfg.max_json_logprob_entries <= 2**17
