"""A teacher behind HTTP: `vllm serve` or `gkd serve`, spoken to as vLLM's OpenAI-compatible API.

Each sequence goes out as token ids (prompt + completion, never re-tokenised) with
``prompt_logprobs = K`` and ``max_tokens = 1``; the answer's rows for the completion positions
become the loss's ``teacher_topk_ids`` / ``teacher_topk_logprobs``. The server gives log-probs at
temperature 1; the loss divides the K log-probs by ``--temperature`` and renormalises over them,
exactly as it does for a local top-k teacher, so both give the same result.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from gkd.data.batch import Batch
from gkd.data.imagefiles import to_base64_png
from gkd.errors import GKDError
from gkd.httpclient import ServerClient, WireError
from gkd.teacher.base import TeacherOutput
from gkd.teacher.wire import COMPACT, WIRE_DTYPES, decode_compact, decode_vllm

API_KEY_ENV = "GKD_TEACHER_API_KEY"


def _sequences(batch: Batch) -> list[tuple[list[int], int, list]]:
    """(token ids, first scored position or -1 when nothing is scored, images) per sequence of ``batch``."""
    return [(ids, r0, batch.images[s] if batch.images else []) for s, (ids, r0) in enumerate(batch.scored_sequences())]


class RemoteTeacher:
    """Top-k teacher over HTTP; `connect` checks the server before training starts."""

    def __init__(self, url: str, topk: int, *, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 5, max_in_flight: int = 4, seqs_per_request: int = 8, wait: float = 120.0,
                 wire_dtype: str = "float32", model: str | None = None):
        if topk < 1:
            raise GKDError("--teacher_model_server needs --gkd_logits_topk K >= 1 (a server sends top-k log-probs)")
        if wire_dtype not in WIRE_DTYPES:
            raise GKDError(f"--teacher_wire_dtype must be one of {sorted(WIRE_DTYPES)}, got {wire_dtype!r}")
        self.client = ServerClient(url, api_key or os.environ.get(API_KEY_ENV) or None, timeout, retries)
        self.topk, self.wait, self.wire_dtype, self.model = topk, wait, wire_dtype, model
        self.seqs_per_request = seqs_per_request
        self.pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="gkd-teacher")
        self.compact = False
        self.images = False  # the server takes images with token ids (gkd serve of a vision-language model)
        self.max_model_len: int | None = None
        self.served: dict | None = None  # the server's /v1/models entry of its model (what identifies it)
        self.context = None  # the server's max_model_len is checked by check_rows (it needs room for one token)

    @property
    def url(self) -> str:
        return self.client.url

    def connect(self, tokenizer) -> "RemoteTeacher":
        self.client.wait_healthy(self.wait)
        models = self.client.call("GET", "/v1/models")
        try:
            entries = models["data"]
            names = [m["id"] for m in entries]
        except (KeyError, TypeError):
            raise GKDError(f"teacher server {self.url}/v1/models: unexpected answer {str(models)[:200]}") from None
        if not names:
            raise GKDError(f"teacher server {self.url}/v1/models lists no model")
        if self.model and self.model not in names:
            raise GKDError(f"teacher server {self.url} serves {names}, not {self.model!r}")
        entry = entries[names.index(self.model)] if self.model else entries[0]
        self.model, self.served = entry["id"], entry
        self.max_model_len = entry.get("max_model_len")
        self.compact = COMPACT in (entry.get("gkd") or {}).get("wire", [])
        self.images = bool((entry.get("gkd") or {}).get("images"))
        self._check_tokenizer(tokenizer)
        self._check_topk(tokenizer)
        return self

    def check_rows(self, examples: list, new_tokens: int, sampled: bool) -> None:
        from gkd.data.rows import longest_sequence

        if any(e.images for e in examples):
            self.check_images()
        self.check_fits(longest_sequence(examples, new_tokens, sampled)[0])

    def check_images(self) -> None:
        """Fail before training if the data has images and the server cannot score token ids with them."""
        if not self.images:
            raise GKDError(f"teacher server {self.url} ({self.model}) does not take images with token ids (vLLM's "
                           "/v1/completions has no image input); serve a vision-language teacher with gkd serve")

    def check_fits(self, longest: int) -> None:
        """Fail before training if the server cannot score the longest sequence training can make.
        vLLM scores a prompt only with room for one generated token: at most max_model_len - 1."""
        if self.max_model_len and longest > self.max_model_len - 1:
            raise GKDError(f"teacher server {self.url} scores sequences of at most {self.max_model_len - 1} tokens, "
                           f"training can make {longest} (longest prompt + completion): start the server with a "
                           "larger --max-model-len, or lower --max_length / --max_completion_length")

    def _check_tokenizer(self, tokenizer) -> None:
        probes = ["Hello, world! 12345", " leading space,\ttabs and ünïcödé ✓"]
        if tokenizer.chat_template:
            probes.append(tokenizer.apply_chat_template(
                [{"role": "user", "content": "probe"}, {"role": "assistant", "content": "answer"}], tokenize=False))
        for text in probes:
            answer = self.client.call("POST", "/tokenize",
                                      {"model": self.model, "prompt": text, "add_special_tokens": False})
            theirs = answer.get("tokens") if isinstance(answer, dict) else None
            ours = tokenizer(text, add_special_tokens=False)["input_ids"]
            if theirs != ours:
                raise GKDError(f"teacher server {self.url} ({self.model}) tokenizes {text[:40]!r} as {str(theirs)[:80]}, "
                               f"the student's tokenizer as {str(ours)[:80]}; GKD needs one tokenizer for both")

    def _check_topk(self, tokenizer) -> None:
        ids = tokenizer("probe of the top-k limit", add_special_tokens=False)["input_ids"][:8]
        try:
            self._request([(ids, 0, [])])
        except GKDError as e:
            raise GKDError(f"{e} -- with --gkd_logits_topk {self.topk} (vLLM allows at most its --max-logprobs, "
                           "default 20)") from None

    def _request(self, seqs: list[tuple[list[int], int, list]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One /v1/completions call for several sequences; rows from each sequence's first scored row."""
        k = self.topk
        body = {"model": self.model, "prompt": [s for s, _, _ in seqs], "max_tokens": 1, "temperature": 0,
                "prompt_logprobs": k}
        if self.compact:
            body["gkd_wire"] = {"format": COMPACT, "dtype": self.wire_dtype, "rows_from": [r for _, r, _ in seqs]}
        if any(images for _, _, images in seqs):
            body["gkd_images"] = [[to_base64_png(im) for im in images] for _, _, images in seqs]

        def parse(answer):
            try:
                choices = sorted(answer["choices"], key=lambda c: c.get("index", 0))
            except (KeyError, TypeError, AttributeError):
                raise WireError("no choices") from None
            if len(choices) != len(seqs):
                raise WireError(f"{len(choices)} choices for {len(seqs)} prompts")
            out = []
            for (ids, rows_from, _), choice in zip(seqs, choices):
                rows = len(ids) - 1 - rows_from
                if self.compact:
                    out.append(decode_compact(choice.get("gkd_topk") or {}, k, rows, rows_from))
                else:
                    out.append(decode_vllm(choice.get("prompt_logprobs"), k, rows_from, len(ids)))
            return out

        return self.client.call("POST", "/v1/completions", body, parse)

    def score(self, batch: Batch, split=None) -> TeacherOutput:
        """Whole sequences go to the server; with ``split`` the first context-parallel rank asks, every rank
        of the group receives the rows and keeps its tokens'."""
        B, T = batch.input_ids.shape
        ids = torch.zeros(B, T, self.topk, dtype=torch.long)
        logprobs = torch.zeros(B, T, self.topk, dtype=torch.float32)
        if split is None or split.rank == 0:
            self._fill(batch, ids, logprobs)
        if split is not None:
            import torch.distributed as dist

            src = dist.get_global_rank(split.group, 0)
            dist.broadcast(ids, src, group=split.group)
            dist.broadcast(logprobs, src, group=split.group)
            ids, logprobs = split.local(ids), split.local(logprobs)
        device = batch.input_ids.device
        return TeacherOutput(topk_ids=ids.to(device), topk_logprobs=logprobs.to(device))

    def _fill(self, batch: Batch, ids: torch.Tensor, logprobs: torch.Tensor) -> None:
        seqs = _sequences(batch)
        todo = [b for b, (_, r, _) in enumerate(seqs) if r >= 0]
        groups = [todo[i:i + self.seqs_per_request] for i in range(0, len(todo), self.seqs_per_request)]
        futures = [self.pool.submit(self._request, [seqs[b] for b in g]) for g in groups]
        try:
            where = batch.sequences()
            for group, fut in zip(groups, futures):
                for s, (i, lp) in zip(group, fut.result()):
                    b, start, _ = where[s]
                    r0 = start + seqs[s][1]
                    ids[b, r0:r0 + len(i)] = i
                    logprobs[b, r0:r0 + len(i)] = lp
        except BaseException:
            self.close()  # requests still retrying stop at their next attempt; the error goes up now
            raise

    def score_pipelined(self, batches: list[Batch], last_stage: bool) -> list[TeacherOutput | None]:
        """Asked for by the last stage only (the others never see the loss)."""
        return [self.score(b) if last_stage else None for b in batches]

    def check_generation(self, rollout, why: str) -> None:
        raise GKDError(f"{why}; the teacher must write their completions, which needs a local --teacher_model "
                       f"(the teacher server {self.url} only scores)")

    def generate(self, prompts, rollout, rows=None, inputs=None, seed: int = 0):
        raise GKDError(f"teacher server {self.url}: a server only scores; completions need a local --teacher_model")

    def evaluate(self, student, prompts, **kw):
        raise GKDError("held-out evaluation needs a local --teacher_model (gkd eval can run afterwards)")

    def memory_mib(self, most, device) -> dict[str, float]:
        return {}  # its weights live on the server

    def close(self) -> None:
        self.client.stopped.set()
        self.pool.shutdown(wait=False, cancel_futures=True)
