"""The order of a vLLM server sampler's requests (--async_generation): a weight sync never overlaps a
request still running at the server, and no request outlives the sampler. A fake server in a thread
records what runs when; its completions take a while, so an overlap would be seen, not missed."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gkd.rollout.base import SamplingConfig
from gkd.rollout.vllm_engine import VLLMServerSampler

SAMPLE_S = 0.3  # how long each completion runs at the fake server


class FakeServer:
    """vLLM's endpoints that the sampler uses, with the WeightSync extension's path sync. ``events``: what
    happened, in order; ``loads``: how many completions were running when each weight load arrived."""

    def __init__(self):
        self.version, self.running, self.paused = "0", 0, False
        self.has_pause = True  # False: a vLLM without the pause endpoints
        self.two_running = threading.Event()
        self.events, self.loads = [], []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, body):
                raw = b"" if body is None else json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                if self.path == "/is_paused" and not fake.has_pause:
                    self.send_error(404)
                    return
                self._answer({"/v1/models": {"data": [{"id": "student"}]}, "/is_paused": {"is_paused": fake.paused},
                              }.get(self.path))

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
                self._answer(fake.post(self.path.split("?")[0], body))

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def note(self, event: str) -> None:
        with self.lock:
            self.events.append(event)

    def post(self, path: str, body):
        if path == "/v1/completions":
            with self.lock:
                self.running += 1
                self.events.append("sample")
                if self.running == 2:
                    self.two_running.set()
            time.sleep(SAMPLE_S)
            with self.lock:
                self.running -= 1
                self.events.append("sampled")
            return {"choices": [{"token_ids": [7, 1]}]}
        if path == "/collective_rpc":
            if body["method"] == "gkd_load_weights":
                with self.lock:
                    self.loads.append(self.running)
                    self.events.append("load")
                    self.version = body["args"][1]
            return {"results": [self.version]}
        if path in ("/pause", "/resume"):
            self.paused = path == "/pause"
            self.note(path[1:])
        elif path == "/reset_prefix_cache":
            self.note("reset")
        return None


@pytest.fixture
def server():
    fake = FakeServer()
    yield fake
    fake.http.shutdown()


def _sampler(server, tmp_path):
    return VLLMServerSampler(server.url, SamplingConfig(max_new_tokens=4), [1], sync_dir=tmp_path / "sync",
                             timeout=30, log=lambda *_: None)


def test_a_weight_sync_waits_for_the_request_ahead(tiny, server, tmp_path):
    """A sync asked for while the request ahead still runs (here: a synchronous generate after an update)
    loads the weights only once it has returned, inside pause/resume; the answer ahead stays usable."""
    from gkd.models import load_model

    model = load_model(tiny["student"])
    sampler = _sampler(server, tmp_path)
    pending, tag = sampler.generate_ahead(model, [[5, 6]], [0], seed=1)
    sampler.weights_changed()
    assert sampler.generate(model, [[5, 6]], [0], seed=2) == [[7, 1]]
    assert server.loads == [0, 0]  # no completion was running when either load arrived
    assert server.events == ["pause", "load", "reset", "resume", "sample", "sampled",
                             "pause", "load", "reset", "resume", "sample", "sampled"]
    assert sampler.take(pending, tag) == [[7, 1]]  # it was sampled from version ``tag`` throughout
    sampler.close()


def test_no_request_outlives_the_sampler(tiny, server, tmp_path):
    from gkd.models import load_model

    sampler = _sampler(server, tmp_path)
    sampler.generate_ahead(load_model(tiny["student"]), [[5, 6], [8]], [0, 1], seed=1)
    assert server.two_running.wait(30)  # both rows' requests run at the server
    sampler.close()
    assert server.running == 0 and server.events[-2:] == ["sampled", "sampled"]


def test_a_server_left_paused_is_resumed(server, tmp_path):
    server.paused = True  # a trainer stopped between /pause and /resume
    _sampler(server, tmp_path).close()
    assert server.events == ["resume"] and not server.paused


def test_a_run_with_async_generation_syncs_between_requests_only(tiny, server, tmp_path):
    """--async_generation 1, four on-policy steps against the fake server: each step from the second trains
    on samples one update old, every weight load finds no completion running and sits between pause and
    resume, and the last step leaves no request behind."""
    from gkd.config import TrainConfig
    from gkd.train.metrics import read_metrics
    from gkd.train.trainer import Trainer

    cfg = TrainConfig(model=tiny["student"], teacher_model=tiny["teacher"], dataset=[tiny["data"]],
                      output_dir=str(tmp_path / "out"), lmbda=1.0, max_completion_length=4, micro_batch_size=4,
                      global_batch_size=4, max_steps=4, progress_bar=False, use_vllm=True, vllm_mode="server",
                      vllm_server_base_url=server.url, async_generation=1)
    trainer = Trainer(cfg, log=lambda *_: None)
    trainer.train()
    assert trainer.rollout.in_flight is None and server.running == 0  # nothing requested past the last step
    assert [m["staleness"] for m in read_metrics(trainer.out / "metrics.jsonl")] == [0, 1, 1, 1]
    # step 0 syncs and samples; steps 0 .. 2 then request the next step, the last two after a sync
    assert server.loads == [0, 0, 0]
    loads = [i for i, e in enumerate(server.events) if e == "load"]
    assert all(server.events[i - 1:i + 3] == ["pause", "load", "reset", "resume"] for i in loads), server.events
    trainer.close()


def test_a_server_without_pause_is_one_clear_error(server, tmp_path):
    from gkd.errors import GKDError

    server.has_pause = False
    with pytest.raises(GKDError, match=r"is_paused: HTTP 404.*one with /collective_rpc, /pause and /resume"):
        _sampler(server, tmp_path)
