"""What the tests share: starting processes (one torchrun launcher, `gkd` in a fresh process or in this one,
teacher servers), the common `gkd train` arguments and the checks several files make, and `Runs`: every
training layout run once per test session, in as few process launches as the layouts allow.

Test files import from here (never from each other); tests/conftest.py holds the fixtures."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

# what every process a test starts runs under: one thread each (several share 2 cores), gloo on loopback
ENV = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))


def free_port() -> int:
    """A port to listen on, free now, drawn below the kernel's ephemeral range (32768-60999 here): ports the
    kernel gives to other processes' connections meanwhile (gloo's, HTTP clients') are never among them."""
    import random

    while True:
        port = random.SystemRandom().randrange(20000, 32000)  # (not the seeded stream tests may set)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


# --------------------------------------------------------------------------------------------------
# processes: torchrun, `gkd` fresh or in this process
# --------------------------------------------------------------------------------------------------


def torchrun_cmd(nproc: int, args: list[str], script: Path | str | None = None) -> list[str]:
    """The torchrun command line (127.0.0.1, a free port) that runs `gkd ARGS`, or `SCRIPT ARGS`, in ``nproc``
    processes."""
    target = [str(script)] if script is not None else ["-m", "gkd"]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
            "--master-addr=127.0.0.1", f"--master-port={free_port()}", *target, *args]


def run_torchrun(script: Path | str, nproc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a script under torchrun with gloo-friendly settings; returns the finished process."""
    return subprocess.run(torchrun_cmd(nproc, list(args), script), capture_output=True, text=True, timeout=timeout,
                          env=ENV, cwd=ROOT)


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a command under ENV; it must succeed."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def gkd_subprocess(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m gkd ARGS` in a fresh process: for runs whose arithmetic must not depend on what this pytest
    worker ran before (a vLLM test makes torch.set_num_threads a no-op here), for kill tests and real CLIs."""
    return subprocess.run([sys.executable, "-m", "gkd", *args], capture_output=True, text=True, timeout=timeout,
                          env=ENV, cwd=ROOT)


def gkd_in_process(*args: str) -> subprocess.CompletedProcess:
    """`gkd ARGS` run in this process (what `python -m gkd` runs, without the ~4 s of imports per call):
    its exit code and what it printed; the environment is restored afterwards (a launch by --nproc_per_node
    sets variables). For mistakes; each test of them still runs one as the real command."""
    import contextlib
    import io

    from gkd.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's own errors
            code = e.code if isinstance(e.code, int) else 1
        finally:
            os.environ.clear()
            os.environ.update(saved)
    return subprocess.CompletedProcess(["gkd", *args], code, out.getvalue(), err.getvalue())


# --------------------------------------------------------------------------------------------------
# `gkd train` arguments, results and the checks on them
# --------------------------------------------------------------------------------------------------

LORA = ["--train_type", "lora", "--lora_rank", "4", "--lora_dropout", "0", "--merge_lora", "true"]


def train_args(models, out, *extra) -> list[str]:
    """4 steps of the tiny models (``models``: a dict with student, teacher and data), seed 42 and lmbda 0.5:
    steps 1 and 3 off-policy, 2 and 4 on-policy (seeded sampling); a checkpoint every 2 steps."""
    return ["train", "--model", models["student"], "--teacher_model", models["teacher"], "--dataset", models["data"],
            "--output_dir", str(out), "--max_completion_length", "6", "--learning_rate", "1e-3",
            "--lr_scheduler_type", "constant", "--micro_batch_size", "2", "--global_batch_size", "8",
            "--progress_bar", "false", "--lmbda", "0.5", "--sft_alpha", "0.3", "--max_steps", "4",
            "--save_steps", "2", *extra]


def set_arg(args: list[str], flag: str, value: str) -> list[str]:
    """``args`` with ``flag``'s value replaced."""
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


def final_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


def losses(out: Path) -> dict:
    from gkd.train.metrics import read_metrics

    return {m["step"]: m["loss"] for m in read_metrics(out / "metrics.jsonl")}


def assert_same_run(single: Path, other: Path) -> tuple[list, list, dict]:
    """``other``'s loss at every step and final weights equal ``single``'s within 1e-5, on off- and
    on-policy steps; returns (single's metrics, other's metrics, other's final weights)."""
    import torch

    from gkd.train.metrics import read_metrics

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


def resumed_from(saved: str, models: str = "tiny", lora: list[str] = (), flags: list[str] = ()) -> Callable:
    """The arguments of a run that resumes ``saved``'s step-2 checkpoint (with ``flags``: on another mesh)."""
    return lambda c, out: train_args(c.models(models), out, "--resume_from_checkpoint",
                                     str(c.out(saved) / "checkpoint-2"), *lora, *flags)


def check_resume(resumed: Path, reference: Path) -> None:
    """A run resumed from another's step-2 checkpoint gives the uninterrupted ``reference`` run's losses at
    steps 3 and 4, and its final weights."""
    import torch

    ref, got = losses(reference), losses(resumed)
    assert sorted(got) == [3, 4]  # step 3 is off-policy, step 4 on-policy
    for step in (3, 4):
        assert abs(got[step] - ref[step]) <= 1e-5, (step, got[step], ref[step])
    w_ref, w = final_weights(reference), final_weights(resumed)
    assert w_ref.keys() == w.keys()
    for k in w_ref:
        torch.testing.assert_close(w[k], w_ref[k], rtol=0, atol=1e-5, msg=k)


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(x) for x in (task / "children").read_text().split()]
    return kids


def kill_and_resume(tiny, out: Path, flags: list[str], single_resume: bool) -> None:
    """A 2-process run with ``flags`` loses its rank 1 to SIGKILL after its first checkpoint: the job must
    end non-zero, and the newest checkpoint must resume (on one process, or on the same 2-process mesh)."""
    import signal

    args = set_arg(train_args(tiny, out, *flags), "--max_steps", "100000")
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
    resume = set_arg(resume, "--max_steps", str(step + 1))
    # the newest complete checkpoint loads and training goes on
    run([sys.executable, "-m", "gkd", *resume] if single_resume else torchrun_cmd(2, resume))
    assert max(losses(out)) == step + 1


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    """Exit code 2 and one line on stderr, `gkd: error: ...` holding ``needle``."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("gkd: error:"), proc.stderr[-2000:]
    assert needle in lines[0], lines[0]


def assert_one_line_mistake(proc: subprocess.CompletedProcess, message: str) -> None:
    """A mistake under several processes: exit code 2 and one line holding ``message`` (Python warnings that
    the launch itself prints aside)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn(" not in ln]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (proc.returncode, proc.stderr[-2000:])


# --------------------------------------------------------------------------------------------------
# teacher servers: `gkd serve`, vLLM's, raw HTTP, a faulty proxy
# --------------------------------------------------------------------------------------------------

API_KEY = "s3cret"


def http(method: str, url: str, body=None, key: str | None = None, raw: bytes | None = None, timeout: float = 30):
    """(status, parsed JSON or None) without raising on HTTP errors."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            payload = r.read()
            return r.status, json.loads(payload) if payload else None
    except urllib.error.HTTPError as e:
        payload = e.read()
        return e.code, json.loads(payload) if payload else None


def start_server(cmd: list[str], **kw) -> subprocess.Popen:
    """A server process whose output (stdout and stderr) a thread reads as it comes, kept for ``stop`` and error
    messages: a server logs a line per request, and a pipe nobody reads fills (64 KiB) and blocks it."""
    import threading

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    proc.output = []

    def read():
        for line in proc.stdout:
            proc.output.append(line)

    proc.reader = threading.Thread(target=read, daemon=True)
    proc.reader.start()
    return proc


def server_output(proc: subprocess.Popen) -> str:
    """What a ``start_server`` process printed so far (after it ended: all of it)."""
    if getattr(proc, "reader", None) is not None and proc.poll() is not None:
        proc.reader.join(timeout=10)
    return "".join(getattr(proc, "output", []))


def wait_healthy(url: str, proc: subprocess.Popen, key: str | None = None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}): {server_output(proc)}")
        try:
            if http("GET", url + "/health", key=key, timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not healthy after {timeout} s")


def start_gkd_serve(model: str, *args: str, key: str | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "gkd", "serve", "--model", model, "--port", str(port), *args]
    if key:
        cmd += ["--api-key", key]
    proc = start_server(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, key)
    return proc, url


def vllm_server_cmd(model: str, port: int, *flags: str) -> list[str]:
    """vLLM's OpenAI server on 127.0.0.1 for a tiny float32 model, on CPU, in one process."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
            "--port", str(port), "--dtype", "float32", "--enforce-eager", "--kv-cache-memory-bytes", "64M",
            "--distributed-executor-backend", "uni", *flags]


VLLM_ENV = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")


needs_vllm = pytest.mark.needs_module("vllm")  # fails, never skips, without vLLM (tests/conftest.py)


def stop(proc: subprocess.Popen) -> str:
    """Ends a server; what it printed (a ``start_server`` one's, read all along; another's, read now)."""
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return server_output(proc) if getattr(proc, "reader", None) is not None else out or ""


def loss_and_head_grad(student, teacher_out, batch, beta=0.5, temperature=0.9):
    """The GKD loss of ``student`` against scored teacher rows and the gradient it leaves on the lm_head:
    what a local and a remote teacher are compared on."""
    from gkd.losses import fused_linear_gkd_loss
    from gkd.models import adapter_for

    student.zero_grad()
    adapter = adapter_for(student)
    hidden = adapter.final_hidden(student, batch.model_inputs())
    out = fused_linear_gkd_loss(hidden, adapter.lm_head(student), **teacher_out.loss_kwargs(), beta=beta,
                                temperature=temperature, mask=batch.loss_mask)
    out.loss.backward()
    return out.loss.detach(), adapter.lm_head(student).grad.clone()


def train_against_server(args: list[str], out: Path) -> subprocess.CompletedProcess:
    """`gkd train ARGS` in a fresh process, with the servers' API key in the environment."""
    cmd = [sys.executable, "-m", "gkd", "train", *args, "--output_dir", str(out), "--progress_bar", "false"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", GKD_TEACHER_API_KEY=API_KEY))


class FaultyProxy:
    """Forwards to a server; `plan` lists what to do with the next /v1/completions requests:
    "ok", "500", "drop" (close without answering), "delay" (answer after `delay_s`), "truncate"
    (cut the last row of every choice). When the plan is empty, `default` applies."""

    def __init__(self, upstream: str, default: str = "ok", delay_s: float = 3.0):
        self.upstream, self.default, self.delay_s = upstream, default, delay_s
        self.plan: list[str] = []
        self.seen: list[str] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _forward(self, method):
                n = int(self.headers.get("Content-Length", "0") or 0)
                body = self.rfile.read(n) if n else None
                action = proxy.next_action() if self.path == "/v1/completions" else "ok"
                if action == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if action == "500":
                    return self._reply(500, json.dumps({"error": {"message": "injected failure"}}).encode())
                if action == "delay":
                    time.sleep(proxy.delay_s)
                req = urllib.request.Request(proxy.upstream + self.path, data=body, method=method)
                for h in ("Content-Type", "Authorization"):
                    if self.headers.get(h):
                        req.add_header(h, self.headers[h])
                try:
                    with urllib.request.urlopen(req, timeout=60) as r:
                        code, payload = r.status, r.read()
                except urllib.error.HTTPError as e:
                    code, payload = e.code, e.read()
                except OSError:
                    return self._reply(502, b'{"error": {"message": "upstream down"}}')
                if action == "truncate" and code == 200:
                    data = json.loads(payload)
                    for c in data["choices"]:
                        if c.get("prompt_logprobs"):
                            c["prompt_logprobs"] = c["prompt_logprobs"][:-1]
                        if c.get("gkd_topk"):
                            c["gkd_topk"]["rows"] -= 1
                    payload = json.dumps(data).encode()
                self._reply(code, payload)

            def _reply(self, code, payload):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                self._forward("GET")

            def do_POST(self):
                self._forward("POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def next_action(self) -> str:
        with self.lock:
            action = self.plan.pop(0) if self.plan else self.default
            self.seen.append(action)
            return action

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# --------------------------------------------------------------------------------------------------
# Runs: each layout once per session, many per launch
# --------------------------------------------------------------------------------------------------
#
# Starting a process costs ~4-7 s of imports (per rank); a further `gkd train` of the tiny models in a process
# that already ran one costs about a second. So the test files declare their runs here (at import, by name)
# and the `runs` fixture (tests/conftest.py) starts them the first time a test reads one: all declared runs
# of one process count in one launch of tests/dist/batch_worker.py, in turn (a plain process for 1, torchrun
# for 2 or 4), and a run that reads another's checkpoint in a later launch. Each run's output folder, and what
# its ranks printed, is kept; tests compare them. Every layout is run once, whichever files check it.
#
# A run is `gkd train ARGS` by default; `call` names a function of a tests/dist worker instead (the function
# runs with the process group made). nproc 0 is a run that must be its own command (`python -m gkd ARGS`,
# e.g. gkd's own --nproc_per_node launcher, whose output a test reads).


@dataclass
class Run:
    name: str
    nproc: int  # 0: its own `python -m gkd ARGS`; 1: in one plain process; 2, 4: under torchrun
    args: Callable  # (RunContext, output folder) -> the arguments
    after: tuple[str, ...] = ()  # runs whose outputs this one reads (it goes in a later launch)
    call: str = ""  # "worker_module:function" (tests/dist) instead of `gkd train`
    mkdir: bool = False  # start from an existing empty output folder (as a resume into a fresh folder does)


RUNS: dict[str, Run] = {}
_SLOTS = (0, 1, 4, 2)  # launch order: own commands, then one plain process, 4 processes, 2 processes, again


def declare(name: str, nproc: int, args: Callable, **kw) -> str:
    """Declare a run (once per name: every file reads the same one); returns the name."""
    run_ = Run(name, nproc, args, **kw)
    if name in RUNS:
        assert RUNS[name].nproc == nproc and RUNS[name].after == run_.after, f"run {name} declared twice, differently"
        return name
    assert nproc in _SLOTS, nproc
    RUNS[name] = run_
    return name


def declare_training(name: str, nproc: int, flags: list[str] = (), models: str = "tiny", **kw) -> str:
    """A 4-step `train_args` run of ``models`` (a RunContext model set) with ``flags``."""
    return declare(name, nproc, lambda c, out: train_args(c.models(models), out, *flags), **kw)


# the single-process references several files compare against
declare_training("single", 1)
declare_training("single-lora", 1, LORA)


@dataclass
class RunContext:
    """What a run's arguments may use: the model sets (the fixtures), the runs' folders, a teacher server."""

    root: Path
    sets: dict  # fixture name -> model set (tiny, tiny4, tied, moe, vl)
    _server: tuple | None = None
    prepared: dict = field(default_factory=dict)

    def models(self, name: str) -> dict:
        return self.sets[name]

    def out(self, run_name: str) -> Path:
        return self.root / run_name

    @property
    def server(self) -> str:
        """The URL of a `gkd serve` of the tiny teacher, started on first use and kept for the session."""
        if self._server is None:
            self._server = start_gkd_serve(self.models("tiny")["teacher"])
        return self._server[1]

    def once(self, key: str, make: Callable):
        """``make()``'s value, made once per session (a model variant, a dataset)."""
        if key not in self.prepared:
            self.prepared[key] = make()
        return self.prepared[key]

    def close(self) -> None:
        if self._server is not None:
            stop(self._server[0])


class Runs:
    """``runs[name]``: the output folder of a declared run, which has succeeded (the test fails with the run's
    own error otherwise); ``runs.output(name)``: what it printed (every rank's stdout, then stderr)."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.logs = ctx.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.slot = {}
        for name in RUNS:
            self._slot_of(name)
        self.done: set[int] = set()
        self.outputs: dict[str, str] = {}
        self.errors: dict[str, str] = {}

    def _slot_of(self, name: str) -> int:
        if name not in self.slot:
            run_ = RUNS[name]
            first = max((self._slot_of(dep) + 1 for dep in run_.after), default=0)
            self.slot[name] = next(i for i in range(first, first + len(_SLOTS))
                                   if _SLOTS[i % len(_SLOTS)] == run_.nproc)
        return self.slot[name]

    def __getitem__(self, name: str) -> Path:
        self._ensure(name)
        if name in self.errors:
            pytest.fail(f"run {name} failed:\n{self.errors[name]}", pytrace=False)
        return self.ctx.out(name)

    def output(self, name: str) -> str:
        """What the run printed: every rank's stdout, then every rank's stderr."""
        self[name]
        return self.outputs[name]

    def stdout(self, name: str) -> str:
        """What a batched run printed on stdout, every rank's."""
        self[name]
        return "".join(self._read(name, rank, "out") for rank in range(RUNS[name].nproc))

    def _ensure(self, name: str) -> None:
        assert name in RUNS, f"run {name} is not declared (helpers.declare)"
        for slot in range(self.slot[name] + 1):
            if slot not in self.done:
                self.done.add(slot)
                self._launch([RUNS[n] for n in RUNS if self.slot[n] == slot])

    def _launch(self, runs: list[Run]) -> None:
        if not runs:
            return
        started = time.monotonic()
        try:
            self._start(runs)
        finally:  # what each launch cost: the file says where the session's time went
            with open(self.ctx.root / "launches.txt", "a") as f:
                f.write(f"{time.monotonic() - started:6.1f} s  {runs[0].nproc} processes: "
                        f"{' '.join(r.name for r in runs)}\n")

    def _start(self, runs: list[Run]) -> None:
        for r in runs:
            if r.mkdir:
                self.ctx.out(r.name).mkdir(parents=True)
        if runs[0].nproc == 0:  # each its own command
            for r in runs:
                proc = subprocess.run([sys.executable, "-m", "gkd", *r.args(self.ctx, self.ctx.out(r.name))],
                                      capture_output=True, text=True, timeout=600, env=ENV, cwd=ROOT)
                self.outputs[r.name] = proc.stdout + proc.stderr
                if proc.returncode != 0:
                    self.errors[r.name] = f"exit code {proc.returncode}\n{proc.stderr[-4000:]}"
            return
        jobs = [{"name": r.name, "call": r.call, "args": [str(a) for a in r.args(self.ctx, self.ctx.out(r.name))]}
                for r in runs]
        while jobs:  # a failed job ends its launch; the ones after it get a launch of their own
            plan = self.logs / f"plan-{jobs[0]['name']}.json"
            plan.write_text(json.dumps({"logs": str(self.logs), "jobs": jobs}))
            script = TESTS / "dist" / "batch_worker.py"
            n = runs[0].nproc
            cmd = [sys.executable, str(script), str(plan)] if n == 1 else torchrun_cmd(n, [str(plan)], script)
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=ENV, cwd=ROOT)
                said = f"launch exit code {proc.returncode}:\n{proc.stderr[-3000:]}"
            except subprocess.TimeoutExpired as e:
                said = f"launch timed out after {e.timeout} s:\n{(e.stderr or b'')[-3000:]!r}"
            for i, job in enumerate(jobs):
                name = job["name"]
                self.outputs[name] = "".join(self._read(name, r, "out") for r in range(n)) + \
                    "".join(self._read(name, r, "err") for r in range(n))
                rcs = [self._read(name, r, "rc") for r in range(n)]
                if rcs == ["0"] * n:
                    continue
                if not any((self.logs / f"{name}.rank-{r}.out").exists() for r in range(n)):  # never started
                    for left in jobs[i:]:
                        self.errors[left["name"]] = f"its launch failed before it started; {said}"
                    jobs = []
                else:
                    self.errors[name] = f"exit codes by rank {rcs}\n{self.outputs[name][-4000:]}\n{said}"
                    jobs = jobs[i + 1:]
                break
            else:
                jobs = []

    def _read(self, name: str, rank: int, kind: str) -> str:
        path = self.logs / f"{name}.rank-{rank}.{kind}"
        return path.read_text(errors="replace") if path.is_file() else ""


# --------------------------------------------------------------------------------------------------
# Runs jobs (``call="helpers:..."``) that watch a `gkd train` from inside its processes
# --------------------------------------------------------------------------------------------------


def counting_recomputed_experts(args: list[str]) -> int:
    """`gkd train ARGS` on this rank, counting the expert-parallel forwards (gkd.parallel.expert) that run inside
    a backward pass, i.e. gradient checkpointing's recomputations: prints ``experts recomputed N of M forwards``."""
    import torch

    from gkd.cli import main
    from gkd.parallel import expert

    counts, inside = {"all": 0, "backward": 0}, []
    real_forward, real_backward = expert._experts_forward, torch.autograd.backward

    def forward(self, *a, **kw):
        counts["all"] += 1
        counts["backward"] += bool(inside)
        return real_forward(self, *a, **kw)

    def backward(*a, **kw):
        inside.append(True)
        try:
            return real_backward(*a, **kw)
        finally:
            inside.pop()

    expert._experts_forward, torch.autograd.backward = forward, backward
    try:
        code = main(list(args))
    finally:
        expert._experts_forward, torch.autograd.backward = real_forward, real_backward
    print(f"experts recomputed {counts['backward']} of {counts['all']} forwards", flush=True)
    return code


def vllm_engine_follows_a_tp_student(args: list[str]) -> int:
    """Run by each process of a 2-process torchrun (gkd makes the process group; the engine leaves it when it
    shuts down, so this cannot be a job of a batch_worker.py launch): TP = 2 with ``--vllm_tensor_parallel_size 2``
    (ARGS: student, teacher, data, output folder). Both ranks drive one engine split over them; before and after 3
    on-policy steps its greedy completions equal HF generate's from the student's current (split) weights, and
    the training moved them. Prints ``vllm tp RANK: engine tp N, K completions equal`` or raises."""
    import torch
    import torch.distributed as dist

    from gkd.config import TrainConfig
    from gkd.parallel import teardown
    from gkd.rollout.base import SamplingConfig
    from gkd.rollout.hf import HFSampler
    from gkd.train.trainer import Trainer

    student, teacher, data, out = args
    cfg = TrainConfig(model=student, teacher_model=teacher, dataset=[data], output_dir=out, lmbda=1.0,
                      micro_batch_size=2, global_batch_size=4, max_completion_length=8, learning_rate=3e-2,
                      lr_scheduler_type="constant", max_steps=3, progress_bar=False, tensor_model_parallel_size=2,
                      use_vllm=True, vllm_tensor_parallel_size=2, vllm_max_model_len=128, vllm_kv_cache_memory_mb=64)
    trainer = Trainer(cfg, log=lambda *_: None)
    rank = dist.get_rank()
    prompts = [[3, 92, 7, 8, 4, 3, 93], [3, 92, 9, 10, 11, 4, 3, 93], [3, 92, 12, 4, 3, 93]]
    greedy = SamplingConfig(max_new_tokens=8, do_sample=False)
    hf = HFSampler(greedy, trainer.sampler.eos_ids, 0, torch.device("cpu"), synced=True)
    engine = trainer.rollout

    def both():
        keep, engine.cfg = engine.cfg, greedy
        try:
            return engine.generate(trainer.student, prompts), hf.generate(trainer.student, prompts)
        finally:
            engine.cfg = keep

    try:
        before = both()
        trainer.train()
        after = both()
        size = engine.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size
    finally:
        trainer.close()
        teardown()
    assert size == 2 and before[0] == before[1] and after[0] == after[1], (size, before, after)
    assert after[0] != before[0], (before, after)  # the weights moved, and the engine took them
    print(f"vllm tp {rank}: engine tp {size}, {len(after[0])} completions equal", flush=True)
    return 0
