"""A teacher behind HTTP: `vllm serve` or `gkd serve`, spoken to as vLLM's OpenAI-compatible API.

Each sequence goes out as token ids (prompt + completion, never re-tokenised) with
``prompt_logprobs = K`` and ``max_tokens = 1``; the answer's rows for the completion positions
become the loss's ``teacher_topk_ids`` / ``teacher_topk_logprobs``. The server gives log-probs at
temperature 1; the loss divides the K log-probs by ``--temperature`` and renormalises over them,
exactly as it does for a local top-k teacher, so both give the same result.

With ``--teacher_wire hidden`` (gkd serve only) the server sends the teacher's final hidden states of the
scored rows instead, and the teacher's logit head comes once at `connect`: the loss then gets what a local
teacher gives it (hidden states + head), the full vocabulary, or its top-K with ``--gkd_logits_topk``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from gkd.data.batch import Batch
from gkd.data.imagefiles import to_base64_png
from gkd.errors import GKDError
from gkd.httpclient import ServerClient, WireError
from gkd.losses import LogitHead
from gkd.teacher.base import OneTeacher, TeacherOutput
from gkd.teacher.wire import (COMPACT, HIDDEN, TENSOR_DTYPES, WIRE_DTYPES, decode_compact, decode_tensor,
                             decode_vllm)

API_KEY_ENV = "GKD_TEACHER_API_KEY"


def _sequences(batch: Batch) -> list[tuple[list[int], int, list]]:
    """(token ids, first scored position or -1 when nothing is scored, images) per sequence of ``batch``."""
    return [(ids, r0, batch.images[s] if batch.images else []) for s, (ids, r0) in enumerate(batch.scored_sequences())]


class RemoteTeacher(OneTeacher):
    """A teacher over HTTP: its top-k log-probs (``wire="topk"``), or its final hidden states, to which the
    teacher's logit head, fetched once, is applied here (``wire="hidden"``: the full vocabulary, or its top-k);
    `connect` checks the server before training starts."""

    def __init__(self, url: str, topk: int, *, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 5, max_in_flight: int = 4, seqs_per_request: int = 8, wait: float = 120.0,
                 wire_dtype: str = "float32", model: str | None = None, wire: str = "topk"):
        if wire not in ("topk", HIDDEN):
            raise GKDError(f"--teacher_wire must be topk or {HIDDEN}, got {wire!r}")
        if topk < 1 and wire == "topk":
            raise GKDError("--teacher_model_server needs --gkd_logits_topk K >= 1 (a server sends top-k log-probs)")
        dtypes = TENSOR_DTYPES if wire == HIDDEN else WIRE_DTYPES
        if wire_dtype not in dtypes:
            raise GKDError(f"--teacher_wire_dtype {wire_dtype} with --teacher_wire {wire}: must be one of "
                           f"{sorted(dtypes)}")
        self.client = ServerClient(url, api_key or os.environ.get(API_KEY_ENV) or None, timeout, retries)
        self.topk, self.wait, self.wire_dtype, self.model = topk or None, wait, wire_dtype, model
        self.wire = wire
        self.head = None  # the teacher's LogitHead, fetched by connect (hidden wire)
        self.max_entries: int | None = None
        self.seqs_per_request = seqs_per_request
        self.pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="gkd-teacher")
        self.compact = False
        self.images = False  # the server takes images with token ids (gkd serve of a vision-language model)
        self.max_model_len: int | None = None
        self.served: dict | None = None  # the server's /v1/models entry of its model (what identifies it)
        self.tokenizer = None  # the tokenizer the server declares, when connect is asked to load it
        self.context = None  # the server's max_model_len is checked by check_rows (it needs room for one token)

    @property
    def url(self) -> str:
        return self.client.url

    def connect(self, tokenizer=None) -> "RemoteTeacher":
        """Checks the server before training: its model, limits and that it tokenises as ``tokenizer`` (the
        student's); without one, as the tokenizer the server declares, loaded here (``self.tokenizer``: a
        teacher with another tokenizer, gkd.teacher.cross_tokenizer)."""
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
        gkd = entry.get("gkd") or {}
        self.compact = COMPACT in gkd.get("wire", [])
        self.images = bool(gkd.get("images"))
        self.max_entries = gkd.get("max_logprob_entries")  # per request (gkd serve's limit; None: vLLM's own)
        if tokenizer is None:
            self.tokenizer = self._declared_tokenizer(gkd.get("tokenizer"))
            self._check_tokenizer(self.tokenizer, f"the tokenizer it declares ({gkd['tokenizer']})",
                                  "the server's tokenizer differs from the one it declares")
        else:
            self._check_tokenizer(tokenizer, "the student's tokenizer", "GKD needs one tokenizer for both")
        if self.wire == HIDDEN:
            if HIDDEN not in gkd.get("wire", []):
                raise GKDError(f"teacher server {self.url} ({self.model}) does not send hidden states (gkd serve does; "
                               "vLLM does not): use --teacher_wire topk with --gkd_logits_topk K")
            self.head = self._fetch_head(int(gkd["hidden_size"]), int(gkd["max_logprob_entries"]))
        else:
            self._check_topk(tokenizer or self.tokenizer)
        return self

    def _declared_tokenizer(self, source):
        from gkd.models import load_tokenizer

        if not source:
            raise GKDError(f"teacher server {self.url} ({self.model}) does not declare its tokenizer (gkd serve does; "
                           "vLLM does not): --teacher_tokenizer other needs it to retokenise the rows")
        try:
            return load_tokenizer(source)
        except (GKDError, OSError, ValueError) as e:
            raise GKDError(f"teacher server {self.url} declares its tokenizer as {source}, which does not load here "
                           f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__}): --teacher_tokenizer "
                           "other needs the teacher's tokenizer files on this machine too") from None

    def _fetch_head(self, hidden_size: int, per_request: int) -> LogitHead:
        """The teacher's logit head, in slices of rows that fit the server's limit."""
        rows = max(1, per_request // hidden_size)
        first = self.client.call("POST", "/v1/gkd/head", {"model": self.model, "rows_from": 0, "rows": 1})
        try:
            vocab, form = int(first["vocab"]), dict(first["form"])
        except (KeyError, TypeError, ValueError):
            raise GKDError(f"teacher server {self.url}/v1/gkd/head: unexpected answer {str(first)[:200]}") from None
        weights, biases = [], []
        for lo in range(0, vocab, rows):
            n = min(rows, vocab - lo)

            def parse(answer, n=n):
                w = decode_tensor(answer.get("weight"), "head weight", (n, hidden_size))
                b = answer.get("bias")
                return w, None if b is None else decode_tensor(b, "head bias", (n,))

            w, b = self.client.call("POST", "/v1/gkd/head", {"model": self.model, "rows_from": lo, "rows": n}, parse)
            weights.append(w)
            biases.append(b)
        bias = None if biases[0] is None else torch.cat(biases)
        return LogitHead(torch.cat(weights), bias, float(form["scale"]), bool(form["scale_hidden"]),
                         None if form["softcap"] is None else float(form["softcap"]))

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

    def _check_tokenizer(self, tokenizer, whose: str, need: str) -> None:
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
                               f"{whose} as {str(ours)[:80]}; {need}")

    def _check_topk(self, tokenizer) -> None:
        ids = tokenizer("probe of the top-k limit", add_special_tokens=False)["input_ids"][:8]
        try:
            self._request([(ids, 0, [])])
        except GKDError as e:
            raise GKDError(f"{e} -- with --gkd_logits_topk {self.topk} (vLLM allows at most its --max-logprobs, "
                           "default 20)") from None

    def _request(self, seqs: list[tuple[list[int], int, list]]) -> list[tuple[torch.Tensor, ...]]:
        """One /v1/completions call for several sequences; rows from each sequence's first scored row: per
        sequence (top-k ids, log-probs), or (hidden states,) on the hidden wire."""
        k = self.topk
        rows_from = [r for _, r, _ in seqs]
        if self.wire == HIDDEN:
            body = {"model": self.model, "prompt": [s for s, _, _ in seqs], "max_tokens": 0,
                    "gkd_wire": {"format": HIDDEN, "dtype": self.wire_dtype, "rows_from": rows_from}}
        else:
            body = {"model": self.model, "prompt": [s for s, _, _ in seqs], "max_tokens": 1, "temperature": 0,
                    "prompt_logprobs": k}
        if self.compact and self.wire != HIDDEN:
            body["gkd_wire"] = {"format": COMPACT, "dtype": self.wire_dtype, "rows_from": rows_from}
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
                if self.wire == HIDDEN:
                    shape = (rows, self.head.weight.shape[1])
                    out.append((decode_tensor((choice.get("gkd_hidden") or {}).get("hidden"), "hidden states", shape),))
                elif self.compact:
                    out.append(decode_compact(choice.get("gkd_topk") or {}, k, rows, rows_from))
                else:
                    out.append(decode_vllm(choice.get("prompt_logprobs"), k, rows_from, len(ids)))
            return out

        return self.client.call("POST", "/v1/completions", body, parse)

    def logit_head(self, device: torch.device) -> LogitHead:
        """The teacher's head, fetched at connect (hidden wire), on ``device``."""
        h = self.head
        return LogitHead(h.weight.to(device), None if h.bias is None else h.bias.to(device), h.scale, h.scale_hidden,
                         h.softcap)

    def score(self, batch: Batch, split=None) -> TeacherOutput:
        """Whole sequences go to the server; with ``split`` the first context-parallel rank asks, every rank
        of the group receives the rows and keeps its tokens'."""
        B, T = batch.input_ids.shape
        if self.wire == HIDDEN:
            fields = [torch.zeros(B, T, self.head.weight.shape[1], dtype=self.head.weight.dtype)]
        else:
            fields = [torch.zeros(B, T, self.topk, dtype=torch.long), torch.zeros(B, T, self.topk, dtype=torch.float32)]
        if split is None or split.rank == 0:
            self._fill(batch, fields)
        if split is not None:
            import torch.distributed as dist

            src = dist.get_global_rank(split.group, 0)
            for t in fields:
                dist.broadcast(t, src, group=split.group)
            fields = [split.local(t) for t in fields]
        device = batch.input_ids.device
        if self.wire == HIDDEN:
            return TeacherOutput(hidden=fields[0].to(device), head=self.logit_head(device), topk=self.topk)
        return TeacherOutput(topk_ids=fields[0].to(device), topk_logprobs=fields[1].to(device))

    def _fill(self, batch: Batch, fields: list[torch.Tensor]) -> None:
        """Each field [B, T, ...] filled at the scored rows of every sequence from the server's answers."""
        seqs = _sequences(batch)
        todo = [b for b, (_, r, _) in enumerate(seqs) if r >= 0]
        # what the server counts against its limit: K per token of the sequence, H per hidden row sent
        rows = [len(seqs[b][0]) - 1 - seqs[b][1] if self.wire == HIDDEN else len(seqs[b][0]) for b in todo]
        groups = self._groups(rows, todo)
        futures = [self.pool.submit(self._request, [seqs[b] for b in g]) for g in groups]
        try:
            where = batch.sequences()
            for group, fut in zip(groups, futures):
                for s, got in zip(group, fut.result()):
                    b, start, _ = where[s]
                    r0 = start + seqs[s][1]
                    for field, rows in zip(fields, got):
                        field[b, r0:r0 + len(rows)] = rows
        except BaseException:
            self.close()  # requests still retrying stop at their next attempt; the error goes up now
            raise

    def _groups(self, rows: list[int], todo: list[int]) -> list[list[int]]:
        """``todo``'s sequences in requests of at most --teacher_seqs_per_request sequences and of at most the
        server's entries per request (``rows`` of K or H values each), in order."""
        width = self.head.weight.shape[1] if self.wire == HIDDEN else self.topk
        groups, used = [], 0
        for b, n in zip(todo, rows):
            if not groups or len(groups[-1]) == self.seqs_per_request or (
                    self.max_entries and used + n * width > self.max_entries):
                groups.append([])
                used = 0
            groups[-1].append(b)
            used += n * width
        return groups

    def score_pipelined(self, batches: list[Batch], last_stage: bool, splits=None) -> list[TeacherOutput | None]:
        """Asked for by the last stage only (the others never see the loss)."""
        return [self.score(b, split) if last_stage else None for b, split in zip(batches, splits or [None] * len(batches))]

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
