"""Helpers for tests that talk to teacher servers: start/stop `gkd serve`, raw HTTP, a faulty proxy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from conftest import ROOT, free_port


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


def wait_healthy(url: str, proc: subprocess.Popen, key: str | None = None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}): {proc.stdout.read() if proc.stdout else ''}")
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
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, key)
    return proc, url


def stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""


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
