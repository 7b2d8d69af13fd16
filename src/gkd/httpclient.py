"""JSON over HTTP to one server (a teacher server, a vLLM rollout server): bearer token, timeouts,
retries with exponential backoff, and one clear error naming the server once it has failed for good."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Callable

from gkd.errors import GKDError


class WireError(ValueError):
    """A server answer that does not hold what was asked for (retryable: a proxy may have cut it)."""


class _Retry(Exception):
    """A failure worth another attempt (connection, timeout, 5xx, a cut or malformed answer)."""


class ServerClient:
    """JSON over HTTP to one server, with a bearer token, timeouts and retries with backoff. ``what`` names
    the server in errors, ``url_flag`` the flag that gave its URL, ``key_hint`` how to give its API key."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0, retries: int = 5,
                 backoff: float = 0.5, what: str = "teacher server", url_flag: str = "--teacher_model_server",
                 key_hint: str = "set --teacher_api_key or GKD_TEACHER_API_KEY"):
        self.what, self.url_flag, self.key_hint = what, url_flag, key_hint
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.stopped = threading.Event()  # set once a request has failed for good: the others give up too

    def _once(self, method: str, path: str, body: dict | None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = _error_text(e)
            if e.code >= 500:
                raise _Retry(f"HTTP {e.code}: {detail}") from None
            if e.code == 401:
                raise GKDError(f"{self.what} {self.url}{path}: HTTP 401, the API key was refused "
                               f"({self.key_hint})") from None
            raise GKDError(f"{self.what} {self.url}{path}: HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError,
                http.client.HTTPException) as e:
            raise _Retry(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise _Retry(f"answer is not JSON ({len(raw)} bytes)") from None

    def call(self, method: str, path: str, body: dict | None = None, parse: Callable | None = None,
             retries: int | None = None):
        """The parsed answer; retried on transient failures (``retries``, default the client's), then one
        clear GKDError."""
        last = ""
        tries = (self.retries if retries is None else retries) + 1
        for attempt in range(tries):
            if self.stopped.is_set():
                raise GKDError(f"{self.what} {self.url}{path}: abandoned after another request failed")
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                answer = self._once(method, path, body)
                return parse(answer) if parse else answer
            except _Retry as e:
                last = str(e)
            except WireError as e:
                last = f"bad answer: {e}"
        raise GKDError(f"{self.what} {self.url}{path} failed after {tries} attempt{'s' if tries > 1 else ''}: "
                       f"{last}")

    def wait_healthy(self, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        last = ""
        while True:
            try:
                self._once("GET", "/health", None)
                return
            except _Retry as e:
                last = str(e)
            if time.monotonic() >= deadline:
                raise GKDError(f"{self.what} {self.url}/health not ready after {wait_s:g} s ({last}); "
                               f"is it running, and is {self.url_flag} right?")
            time.sleep(0.5)


def _error_text(e: urllib.error.HTTPError) -> str:
    """The server's own message, whatever shape its error body has (or none)."""
    try:
        msg = json.loads(e.read() or b'""')
        if isinstance(msg, dict):
            msg = msg.get("message") or msg.get("detail") or msg.get("error") or ""
        if isinstance(msg, dict):  # OpenAI style: {"error": {"message": ...}}
            msg = msg.get("message") or ""
        text = str(msg).strip()
    except Exception:  # not JSON, not readable: fall back to the status line
        text = ""
    return (text.splitlines()[0][:300] if text else str(e.reason or ""))
