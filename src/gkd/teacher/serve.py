"""`gkd serve`: a teacher server for where vLLM does not run, speaking the part of vLLM's API GKD uses.

GET /health, GET /v1/models, POST /tokenize, POST /v1/completions with ``prompt_logprobs = K``
(token-id prompts; one or several per request). Concurrent requests are batched into one forward.
Beyond vLLM: no cap on K but the vocabulary, and a compact answer (``"gkd_wire"`` in the request;
see gkd.wire) that the gkd client asks for when /v1/models advertises it.
"""

from __future__ import annotations

import hmac
import json
import queue
import select
import signal
import socket
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from gkd.config import ServeConfig
from gkd.data.batch import join_rows
from gkd.data.imagefiles import open_image
from gkd.data.rows import model_context
from gkd.errors import GKDError
from gkd.models import adapter_for, load_image_processing, load_model, load_tokenizer
from gkd.teacher.cache import model_fingerprint
from gkd.teacher.wire import (COMPACT, HIDDEN, TENSOR_DTYPES, WIRE_DTYPES, encode_compact, encode_tensor,
                             encode_vllm_entry)


class BadRequest(Exception):
    """Answered with HTTP 400 and this message."""


class ShuttingDown(Exception):
    """Answered with HTTP 503: the server is draining (SIGTERM) and takes no more work, or its drain timeout
    ended before this request's scoring did."""


@dataclass
class _Job:
    ids: list[int]
    k: int
    rows_from: int = 0  # rows before this are not wanted: their lm_head is never computed
    actual: bool = True  # also the log-prob and rank of the token that follows (vLLM's JSON wants them)
    future: Future | None = None
    inputs: dict | None = None  # the sequence's other model inputs (its images, processed)
    hidden: bool = False  # the final hidden states of rows rows_from .. n-2 instead of top-k log-probs


class Scorer:
    """Collects sequences from concurrent requests and scores them in one padded forward."""

    def __init__(self, model, max_batch_tokens: int, wait_s: float, chunk: int = 256):
        self.model, self.max_batch_tokens, self.wait_s, self.chunk = model, max_batch_tokens, wait_s, chunk
        self.adapter = adapter_for(model)
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.closed = False  # set by the drain: new work is refused
        self.current: list[_Job] = []  # the batch being scored
        self.thread = threading.Thread(target=self._loop, name="gkd-scorer", daemon=True)
        self.thread.start()

    def submit(self, ids: list[int], k: int, rows_from: int = 0, actual: bool = True, inputs: dict | None = None,
               hidden: bool = False) -> Future:
        if self.closed:
            raise ShuttingDown("the server is shutting down; send this request to another one")
        job = _Job(ids, k, rows_from, actual, Future(), inputs, hidden)
        self.jobs.put(job)
        return job.future

    def cancel(self) -> None:
        """Fail every job not answered yet, queued or being scored, with ShuttingDown (their requests get a
        503 now); a forward in progress runs on, and its result is dropped."""
        self.closed = True
        with self.jobs.mutex:
            queued = [j for j in self.jobs.queue if j is not None]
            self.jobs.queue.clear()
        for j in queued + list(self.current):
            _settle(j.future, error=ShuttingDown("the server's drain timeout ended before this request was scored"))

    def stop(self, timeout: float = 30) -> bool:
        """End the scoring thread once its forward in progress ends; False if that takes beyond ``timeout``."""
        self.jobs.put(None)
        self.thread.join(timeout=timeout)
        return not self.thread.is_alive()

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            batch = self.current = [job]  # (seen by cancel() from the first job on)
            deadline = time.monotonic() + self.wait_s
            while True:
                try:
                    nxt = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self.jobs.put(None)
                    break
                # the forward is padded: budget rows x longest row, not the sum of lengths
                if (len(batch) + 1) * max(len(nxt.ids), *(len(j.ids) for j in batch)) > self.max_batch_tokens:
                    self._requeue_first(nxt)  # the next batch's first
                    break
                batch.append(nxt)
            batch = self.current = [j for j in batch if not j.future.done()]  # (cancelled by the drain)
            try:
                for j, result in zip(batch, self._score(batch) if batch else ()):
                    _settle(j.future, result)
            except Exception as e:  # answered as a 500 by each waiting request
                for j in batch:
                    _settle(j.future, error=e)
            self.current = []

    def _requeue_first(self, job: _Job) -> None:
        """Put a job that did not fit back at the head of the queue (or fail it, when cancel() has run)."""
        if self.closed:
            _settle(job.future, error=ShuttingDown("the server is shutting down; send this request to another one"))
            return
        with self.jobs.mutex:
            self.jobs.queue.appendleft(job)
            self.jobs.unfinished_tasks += 1
            self.jobs.not_empty.notify()

    @torch.no_grad()
    def _score(self, jobs: list[_Job]):
        """Per job, rows ``rows_from`` .. n-1: top-k ids / log-probs of the next token ([rows, K]) and, if
        asked, the log-prob and rank of the token that actually follows ([rows - 1]; the last row has
        none), else None for both; a ``hidden`` job gets the final hidden states of rows ``rows_from`` .. n-2
        ([rows, H], the model's dtype) instead."""
        seqs = [j.ids for j in jobs]
        T = max(map(len, seqs))
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        att = torch.zeros(len(seqs), T, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.tensor(s)
            att[b, : len(s)] = 1
        extra = join_rows([j.inputs or {} for j in jobs])
        hidden = self.adapter.final_hidden(self.model, {"input_ids": ids, "attention_mask": att, **extra})
        head = self.adapter.logit_head(self.model).to(torch.float32)
        out = []
        for b, job in enumerate(jobs):
            s = job.ids
            if job.hidden:
                out.append(hidden[b, job.rows_from:len(s) - 1].clone())
                continue
            parts = []
            for r0 in range(job.rows_from, len(s), self.chunk):
                logp = torch.log_softmax(head.logits(hidden[b, r0 : min(r0 + self.chunk, len(s))].float()), dim=-1)
                top_lp, top_id = logp.topk(job.k, dim=-1)
                act = rank = None
                if job.actual:
                    nxt = torch.tensor(s[r0 + 1 : r0 + self.chunk + 1], dtype=torch.long)
                    act = logp[: len(nxt)].gather(1, nxt[:, None])[:, 0]
                    rank = (logp[: len(nxt)] > act[:, None]).sum(-1) + 1
                parts.append((top_id, top_lp, act, rank))
            out.append(tuple(None if p[0] is None else torch.cat(p) for p in zip(*parts)))
        return out


def _settle(future: Future, result=None, error: BaseException | None = None) -> None:
    """Answer a job once: the drain may have failed it while its forward ran."""
    try:
        future.set_exception(error) if error is not None else future.set_result(result)
    except InvalidStateError:
        pass


class TeacherServer:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg.validate()
        self.connections = Connections()
        try:  # the port first: a taken one is known before the model loads
            self.httpd = ThreadingHTTPServer((cfg.host, cfg.port), _handler_for(self))
        except OSError as e:
            raise GKDError(f"--host {cfg.host} --port {cfg.port}: cannot listen there ({e.strerror}); "
                           "is another server on it? choose another --port") from None
        # handler threads are not joined on exit: the drain decides how long they may take
        self.httpd.daemon_threads = True
        try:
            self.tokenizer = load_tokenizer(cfg.model)
            self.model = load_model(cfg.model, cfg.torch_dtype).eval().requires_grad_(False)
            self.vocab, self.hidden_size = adapter_for(self.model).lm_head(self.model).shape
            positions = model_context(self.model)
            if positions is not None and cfg.max_model_len > positions:  # it would be advertised, then not met
                raise GKDError(f"--max_model_len {cfg.max_model_len} is beyond the model's context of {positions} "
                               "positions (max_position_embeddings)")
            if cfg.max_logprobs > self.vocab:
                raise GKDError(f"--max_logprobs {cfg.max_logprobs} is beyond the model's vocabulary of {self.vocab}")
        except BaseException:
            self.httpd.server_close()
            raise
        self.name = cfg.served_model_name or cfg.model
        # by default a sequence fits one forward's budget
        self.max_model_len = cfg.max_model_len or min(positions or 4096, cfg.max_batch_tokens)
        self.max_logprobs = cfg.max_logprobs or self.vocab
        self.images = load_image_processing(cfg.model, self.tokenizer)  # None: a text-only teacher
        self.scorer = Scorer(self.model, cfg.max_batch_tokens, cfg.batch_wait_ms / 1000)
        self._decoded: dict[int, str] = {}
        self._fingerprint, self._fingerprint_lock = None, threading.Lock()

    @property
    def address(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def decode(self, token: int) -> str:
        if token not in self._decoded:
            self._decoded[token] = self.tokenizer.decode([token])
        return self._decoded[token]

    # --- endpoints --------------------------------------------------------------------------

    def models(self) -> dict:
        return {"object": "list", "data": [{
            "id": self.name, "object": "model", "owned_by": "gkd", "max_model_len": self.max_model_len,
            "gkd": {"wire": [COMPACT, HIDDEN], "dtypes": sorted(WIRE_DTYPES), "hidden_dtypes": sorted(TENSOR_DTYPES),
                    "hidden_size": self.hidden_size, "max_logprobs": self.max_logprobs,
                    "max_logprob_entries": self.cfg.max_logprob_entries,
                    "max_json_logprob_entries": self.cfg.max_json_logprob_entries,
                    "images": self.images is not None, "fingerprint": self.fingerprint(),
                    # where its tokenizer loads from: a client with another tokenizer retokenises for it
                    "tokenizer": self.cfg.model}}]}

    def fingerprint(self) -> str:
        """The served weights' hash (a teacher cache's key names it), made at the first ask: hashing a
        large model's files takes seconds that a server without caching clients need not spend."""
        with self._fingerprint_lock:
            if self._fingerprint is None:
                self._fingerprint = model_fingerprint(self.cfg.model, self.cfg.torch_dtype)
            return self._fingerprint

    def tokenize(self, body: dict) -> dict:
        if "messages" in body:
            msgs = body["messages"]
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in msgs):
                raise BadRequest("messages must be a non-empty list of {\"role\": text, \"content\": text} objects")
            try:
                ids = self.tokenizer.apply_chat_template(
                    msgs, add_generation_prompt=bool(body.get("add_generation_prompt", True)), tokenize=True)
            except Exception as e:  # noqa: BLE001 - the model's template rejects these messages (jinja raises)
                raise BadRequest(f"the chat template cannot render these messages ({type(e).__name__}: "
                                 f"{(str(e).splitlines() or [''])[0][:200]})") from None
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise BadRequest("prompt must be a string (or give messages)")
            ids = self.tokenizer(prompt, add_special_tokens=bool(body.get("add_special_tokens", True)))["input_ids"]
        return {"tokens": list(ids), "count": len(ids), "max_model_len": self.max_model_len}

    def _prompts(self, body: dict) -> list[list[int]]:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompt = [self.tokenizer(prompt)["input_ids"]]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            prompt = [prompt]
        if not (isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt)):
            raise BadRequest("prompt must be token ids, a list of token-id lists, or a string")
        if len(prompt) > self.cfg.max_prompts:
            raise BadRequest(f"{len(prompt)} prompts in one request; the limit is {self.cfg.max_prompts} (--max_prompts)")
        for i, p in enumerate(prompt):
            if not p or not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                raise BadRequest(f"prompt[{i}] must be a non-empty list of integer token ids")
            if len(p) > self.max_model_len:
                raise BadRequest(f"prompt[{i}] has {len(p)} tokens; the limit is {self.max_model_len} (max_model_len)")
            bad = [t for t in p if not 0 <= t < self.vocab]
            if bad:
                raise BadRequest(f"prompt[{i}] has token id {bad[0]} outside the vocabulary [0, {self.vocab})")
        return prompt

    def _image_inputs(self, body: dict, prompts: list[list[int]]) -> list[dict | None]:
        """Each prompt's images (``gkd_images``: per prompt, base64 PNG/JPEG strings), processed by this
        model's processor; the prompt's ids must hold exactly the image tokens that processor makes."""
        given = body.get("gkd_images")
        if given is None:
            for i, p in enumerate(prompts):
                if self.images is not None and self.images.image_token_id in p:
                    raise BadRequest(f"prompt[{i}] has image tokens from position {p.index(self.images.image_token_id)} "
                                     "but the request sends no images (gkd_images)")
            return [None] * len(prompts)
        if self.images is None:
            raise BadRequest(f"gkd_images: {self.name} is a text-only model")
        if not (isinstance(given, list) and len(given) == len(prompts) and all(isinstance(g, list) for g in given)):
            raise BadRequest("gkd_images must be a list with one list of base64 images per prompt")
        out = []
        for i, (p, refs) in enumerate(zip(prompts, given)):
            if not all(isinstance(r, str) for r in refs):
                raise BadRequest(f"gkd_images[{i}] must hold base64 strings")
            try:
                pics = [open_image(r if r.startswith("data:") else "data:;base64," + r, None, f"gkd_images[{i}]")
                        for r in refs]
                # an image the processor refuses: the client's
                inputs, counts = self.images.process(pics, f"gkd_images[{i}]")
            except GKDError as e:
                raise BadRequest(str(e)) from None
            where = [j for j, t in enumerate(p) if t == self.images.image_token_id]
            if len(where) != sum(counts):
                at = f" from position {where[0]}" if where else ""
                raise BadRequest(f"prompt[{i}]: {len(where)} image tokens in the ids{at}, but this server's processor "
                                 f"makes {sum(counts)} for its {len(pics)} image(s) ({counts} per image): the client's "
                                 "and the server's processors differ")
            out.append(inputs or None)
        return out

    def completions(self, body: dict) -> dict:
        prompts = self._prompts(body)
        inputs = self._image_inputs(body, prompts)
        k = body.get("prompt_logprobs")
        if k is None:
            k = 0
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise BadRequest(f"prompt_logprobs must be an integer >= 0, got {k!r}")
        if k > self.max_logprobs:
            raise BadRequest(f"prompt_logprobs {k} exceeds the limit {self.max_logprobs} (--max_logprobs / vocabulary)")
        entries = k * sum(map(len, prompts))
        if entries > self.cfg.max_logprob_entries:
            raise BadRequest(f"{entries} log-probs requested (K x tokens); the limit is {self.cfg.max_logprob_entries} "
                             "(--max_logprob_entries): send fewer tokens per request")
        wire = body.get("gkd_wire")
        if k and wire is None and entries > self.cfg.max_json_logprob_entries:
            raise BadRequest(f"{entries} log-probs requested (K x tokens) as JSON; the limit is "
                             f"{self.cfg.max_json_logprob_entries} (--max_json_logprob_entries): send fewer tokens or a "
                             "smaller K per request, or ask for the compact answer (gkd_wire)")
        max_tokens = body.get("max_tokens", 1)
        if max_tokens not in (0, 1) or isinstance(max_tokens, bool):
            raise BadRequest(f"max_tokens must be 0 or 1 (gkd serve scores prompts, it does not generate), got {max_tokens!r}")
        rows_from = [0] * len(prompts)
        if isinstance(wire, dict) and wire.get("format") == HIDDEN:
            return self._hidden(prompts, inputs, wire, max_tokens)
        if wire is not None:
            if not isinstance(wire, dict) or wire.get("format") != COMPACT or wire.get("dtype", "float32") not in WIRE_DTYPES:
                raise BadRequest(f"gkd_wire must be {{'format': '{COMPACT}', 'dtype': one of {sorted(WIRE_DTYPES)}, "
                                 f"'rows_from': int or list}} or {{'format': '{HIDDEN}', 'dtype': one of "
                                 f"{sorted(TENSOR_DTYPES)}, 'rows_from': ...}}")
            rf = wire.get("rows_from", 0)
            rows_from = rf if isinstance(rf, list) else [rf] * len(prompts)
            if len(rows_from) != len(prompts) or not all(
                    isinstance(r, int) and 0 <= r <= len(p) - 1 for r, p in zip(rows_from, prompts)):
                raise BadRequest("gkd_wire.rows_from must give, per prompt, a row in [0, len(prompt) - 1]")
        compact = bool(k) and wire is not None
        futures = [self.scorer.submit(p, max(k, 1), rows_from=r if compact else len(p) - 1 if not k else 0,
                                      actual=bool(k) and not compact, inputs=x)
                   for p, r, x in zip(prompts, rows_from, inputs)]
        choices = []
        for i, (p, fut) in enumerate(zip(prompts, futures)):
            ids, lps, act_lp, act_rank = fut.result()
            choice = {"index": i, "text": self.decode(int(ids[-1, 0])) if max_tokens else "", "logprobs": None,
                      "finish_reason": "length", "prompt_logprobs": None}
            if compact:
                choice["gkd_topk"] = encode_compact(ids[:-1], lps[:-1], rows_from[i], wire.get("dtype", "float32"))
            elif k:
                il, ll, al, ar = ids.tolist(), lps.tolist(), act_lp.tolist(), act_rank.tolist()
                choice["prompt_logprobs"] = [None] + [
                    encode_vllm_entry(il[j], ll[j], p[j + 1], al[j], ar[j], self.decode) for j in range(len(p) - 1)]
            choices.append(choice)
        return self._answer(prompts, choices, max_tokens)

    def _answer(self, prompts: list[list[int]], choices: list[dict], max_tokens: int) -> dict:
        n = sum(map(len, prompts))
        return {"id": f"cmpl-{time.time_ns():x}", "object": "text_completion", "created": int(time.time()),
                "model": self.name, "choices": choices,
                "usage": {"prompt_tokens": n, "completion_tokens": len(prompts) if max_tokens else 0,
                          "total_tokens": n + (len(prompts) if max_tokens else 0)}}

    def _hidden(self, prompts: list[list[int]], inputs: list, wire: dict, max_tokens: int) -> dict:
        """The hidden-state answer: per prompt, the final hidden states of rows ``rows_from`` .. n-2 (row i
        predicts token i+1), which the client turns into logits with the head of POST /v1/gkd/head."""
        dtype = wire.get("dtype", "float32")
        rf = wire.get("rows_from", 0)
        rows_from = rf if isinstance(rf, list) else [rf] * len(prompts)
        if dtype not in TENSOR_DTYPES or len(rows_from) != len(prompts) or not all(
                isinstance(r, int) and not isinstance(r, bool) and 0 <= r <= len(p) - 1 for r, p in zip(rows_from, prompts)):
            raise BadRequest(f"gkd_wire (hidden) needs 'dtype' in {sorted(TENSOR_DTYPES)} and, per prompt, 'rows_from' "
                             "in [0, len(prompt) - 1]")
        if max_tokens:
            raise BadRequest("gkd_wire (hidden) scores prompts only: max_tokens must be 0")
        entries = self.hidden_size * sum(len(p) - 1 - r for p, r in zip(prompts, rows_from))
        if entries > self.cfg.max_logprob_entries:
            raise BadRequest(f"{entries} hidden values requested (H x rows); the limit is {self.cfg.max_logprob_entries} "
                             "(--max_logprob_entries): send fewer tokens per request")
        futures = [self.scorer.submit(p, 1, rows_from=r, actual=False, inputs=x, hidden=True)
                   for p, r, x in zip(prompts, rows_from, inputs)]
        choices = [{"index": i, "text": "", "logprobs": None, "finish_reason": "length", "prompt_logprobs": None,
                    "gkd_hidden": {"rows_from": r, "hidden": encode_tensor(fut.result(), dtype)}}
                   for i, (r, fut) in enumerate(zip(rows_from, futures))]
        return self._answer(prompts, choices, max_tokens)

    def head(self, body: dict) -> dict:
        """Rows ``rows_from`` .. + ``rows`` of the teacher's logit head (weight, bias) in the model's dtype, and
        its transform (scale, softcap): what a client of the hidden-state wire applies to them."""
        head = adapter_for(self.model).logit_head(self.model)
        lo, n = body.get("rows_from", 0), body.get("rows", self.vocab)
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (lo, n)) or lo < 0 or n < 1 \
                or lo + n > self.vocab:
            raise BadRequest(f"rows_from and rows must pick rows of the head's {self.vocab}")
        if n * self.hidden_size > self.cfg.max_logprob_entries:
            raise BadRequest(f"{n} head rows x {self.hidden_size} exceed --max_logprob_entries "
                             f"{self.cfg.max_logprob_entries}: ask for fewer rows at a time")
        dtype = next(k for k, v in TENSOR_DTYPES.items() if v == head.weight.dtype)
        return {"vocab": self.vocab, "hidden_size": self.hidden_size,
                "form": {"scale": head.scale, "scale_hidden": head.scale_hidden, "softcap": head.softcap},
                "weight": encode_tensor(head.weight[lo:lo + n], dtype),
                "bias": None if head.bias is None else encode_tensor(head.bias[lo:lo + n], dtype)}

    # --- lifecycle --------------------------------------------------------------------------

    def serve_forever(self) -> bool:
        """Serve until SIGTERM / SIGINT, then drain. True when every thread ended; False when a forward was
        still running at the drain's end (its requests were answered 503; the caller exits without it)."""
        def on_term(signum, frame):  # stop accepting; the drain below finishes what is in flight
            threading.Thread(target=self.httpd.shutdown, daemon=True).start()

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        print(f"[gkd serve] {self.name} on {self.address} (vocabulary {self.vocab}, max_model_len "
              f"{self.max_model_len}, K <= {self.max_logprobs})", flush=True)
        reaper = threading.Thread(target=self._reap, name="gkd-reaper", daemon=True)
        reaper.start()
        try:
            self.httpd.serve_forever()
        finally:
            self.drain()
            self.httpd.server_close()
            ended = self.scorer.stop(timeout=0.1)
            print("[gkd serve] stopped" if ended else "[gkd serve] stopped (a forward was still running: its "
                  "requests were answered 503)", flush=True)
        return ended

    def _reap(self) -> None:
        """Drop clients that take longer than --request_timeout to send a request (a per-read timeout alone
        lets a client trickling a byte at a time hold a connection for ever)."""
        while not self.connections.stopped:
            self.connections.close(lambda phase, age: phase == "reading" and age > self.cfg.request_timeout)
            time.sleep(0.2)

    def drain(self) -> None:
        """Close idle keep-alive connections now and refuse new work (503); give requests in flight
        --drain_timeout to finish, then answer those still waiting 503 and close every connection."""
        conns = self.connections
        conns.draining = self.scorer.closed = True
        # the last moments of the timeout are for writing the 503s of what is still waiting then
        answered = time.monotonic() + self.cfg.drain_timeout
        deadline = answered - min(0.5, self.cfg.drain_timeout / 2)
        while conns.close(lambda phase, age: phase == "idle") and time.monotonic() < deadline:
            time.sleep(0.05)
        self.scorer.cancel()
        while conns.close(lambda phase, age: phase == "idle") and time.monotonic() < answered:
            time.sleep(0.02)
        conns.close(lambda phase, age: True)
        conns.stopped = True


class Connections:
    """Each open client connection and what it is doing: ``idle`` (waiting for its next request),
    ``reading`` (a request is arriving) or ``working`` (being answered), and since when."""

    def __init__(self):
        self.lock = threading.Lock()
        self.phase: dict[socket.socket, tuple[str, float]] = {}
        self.draining = self.stopped = False

    def set(self, sock: socket.socket, phase: str) -> None:
        with self.lock:
            self.phase[sock] = (phase, time.monotonic())

    def drop(self, sock: socket.socket) -> None:
        with self.lock:
            self.phase.pop(sock, None)

    def close(self, which) -> int:
        """Shut down the connections ``which(phase, age)`` picks (their blocked reads return at once);
        returns how many connections are still open."""
        now = time.monotonic()
        with self.lock:
            for sock, (phase, since) in list(self.phase.items()):
                if which(phase, now - since):
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    del self.phase[sock]
            return len(self.phase)


def _handler_for(server: TeacherServer):
    key = server.cfg.api_key

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 60  # seconds a client may stall mid-request before its connection is dropped

        def log_message(self, fmt, *args):  # quiet: one line per request is noise for a scorer
            pass

        def setup(self):
            super().setup()
            server.connections.set(self.connection, "idle")

        def finish(self):
            server.connections.drop(self.connection)
            try:
                super().finish()
            except OSError:  # the client is gone (or was dropped)
                pass

        def handle_one_request(self):
            conns = server.connections
            conns.set(self.connection, "idle")
            try:
                # draining: a connection whose request has begun to arrive is answered (503), an idle one closed
                if conns.draining and not select.select([self.connection], [], [], 0)[0] or not self.rfile.peek(1):
                    self.close_connection = True
                    return
                conns.set(self.connection, "reading")  # from here the whole request has --request_timeout
                super().handle_one_request()
            except OSError:  # timed out, reset, or shut down by the reaper or the drain
                self.close_connection = True
            if conns.draining:
                self.close_connection = True

        def _working(self) -> None:
            server.connections.set(self.connection, "working")

        def _send(self, code: int, payload=None) -> None:
            data = b"" if payload is None else json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, code: int, message: str) -> None:
            kind = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowed",
                    503: "ServiceUnavailableError"}.get(code, "ServerError")
            self._send(code, {"error": {"message": message, "type": kind, "code": code}})

        def send_error(self, code, message=None, explain=None):  # the base class's are HTML pages
            self.close_connection = True
            self._error(code, message or HTTPStatus(code).phrase)

        def _not_allowed(self):
            self.close_connection = True
            if self.command == "HEAD":  # an answer to HEAD has no body
                self.send_response(405)
                self.send_header("Allow", "GET, POST")
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self._error(405, f"{self.command} is not served here: GET /health, GET /v1/models, POST /tokenize, "
                                 "POST /v1/completions")

        do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

        def _authorized(self) -> bool:
            if not key:
                return True
            given = self.headers.get("Authorization", "")
            if hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return True
            self._error(401, "missing or wrong API key (send 'Authorization: Bearer KEY')")
            return False

        def do_GET(self):
            self._working()
            if not self._authorized():
                return
            if self.path == "/health":
                self._send(503 if server.connections.draining else 200)
            elif self.path == "/v1/models":
                self._send(200, server.models())
            else:
                self._error(404, f"no route GET {self.path}")

        def do_POST(self):
            if not self._authorized():
                self._drain()
                return
            routes = {"/tokenize": server.tokenize, "/v1/completions": server.completions, "/v1/gkd/head": server.head}
            if self.path not in routes:
                self._drain()
                return self._error(404, f"no route POST {self.path}")
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                length = -1
            if length < 0 or len(self.headers.get_all("Content-Length", [])) != 1:
                self.close_connection = True
                return self._error(400, "exactly one Content-Length header >= 0 is required")
            if length > server.cfg.max_request_bytes:
                self.close_connection = True
                return self._error(400, f"request body of {length} bytes exceeds the limit "
                                        f"{server.cfg.max_request_bytes} (--max_request_bytes)")
            raw = self.rfile.read(length)
            if len(raw) < length:  # the client went away, or was dropped for taking too long
                self.close_connection = True
                return
            self._working()
            try:
                body = json.loads(raw or b"null")
            except ValueError as e:
                return self._error(400, f"malformed JSON body: {e}")
            except RecursionError:
                return self._error(400, "the JSON body is nested too deep")
            if not isinstance(body, dict):
                return self._error(400, "the body must be a JSON object")
            if "model" in body and body["model"] not in (server.name, server.cfg.model):
                return self._error(404, f"the model {str(body['model'])[:200]!r} is not served here; this server "
                                        f"serves {server.name!r} (GET /v1/models)")
            try:
                self._send(200, routes[self.path](body))
            except BadRequest as e:
                self._error(400, str(e))
            except ShuttingDown as e:
                self.close_connection = True
                self._error(503, str(e))
            except Exception as e:  # a bug or a failed forward: answer, never take the server down
                self._error(500, f"{type(e).__name__}: {e}")

        def _drain(self) -> None:
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                length = -1
            if not 0 <= length <= server.cfg.max_request_bytes:
                self.close_connection = True
            elif length:
                self.rfile.read(length)

    return Handler
