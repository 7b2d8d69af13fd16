"""The teacher cache (``--teacher_cache DIR``): off-policy rows scored once and reused across epochs and runs.

An entry holds what the teacher gives the loss for one row's completion positions:
- with ``--gkd_logits_topk K``: its top-K ids and log-probs (temperature 1), in the teacher server's compact
  wire encoding (gkd.teacher.wire, float32: what a local top-k teacher gives the loss, bit for bit). The loss
  divides them by the loss temperature and renormalises over the K entries;
- with the full vocabulary (K = 0): its final hidden states, in their own dtype. The loss applies the
  teacher's logit head to them as to a live forward's: the exact full distribution, without the teacher's
  layers.

Key: sha256 of (the row's token ids, its first scored position, its images' pixels, the teacher's identity
-- a hash of its model files and dtype, or a server's model name, root and weights fingerprint --, K and,
for top-K entries, the loss temperature). Any change of a part is another key: a miss, scored afresh, never
a reuse. One folder can hold entries of several teachers, Ks and temperatures side by side.

On disk: ``DIR/gkd-teacher-cache.json`` marks the folder; entries are ``DIR/entries/<2 hex>/<key>.json``,
first line the sha256 of the rest, then one JSON object. Written atomically (gkd.atomic: a reader never
sees half a file; writers of the same entry write the same bytes, the last rename stays). An entry whose
checksum, key or shape does not match (a torn write, a flipped byte) is reported once and scored again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from gkd.atomic import sha256_file, write_atomic
from gkd.data.batch import Batch
from gkd.errors import GKDError
from gkd.httpclient import WireError
from gkd.losses import topk_logprobs
from gkd.teacher.base import OneTeacher, TeacherOutput
from gkd.teacher.wire import TENSOR_DTYPES, decode_compact, decode_tensor, encode_compact, encode_tensor

FORMAT = "gkd-teacher-cache/1"
MARKER = "gkd-teacher-cache.json"
HEAD_ROWS = 1024  # teacher logits made at once when a local teacher's top-K is taken (bounds [rows, V] memory)


# --- the folder ---------------------------------------------------------------------------------------


def check_folder(path: str) -> Path:
    """The cache folder, or one line saying why not (a file, not writable, another program's folder).
    Writes nothing: the folder and its marker are made by ``TeacherCache``."""
    folder = Path(path).absolute()
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise GKDError(f"--teacher_cache {path}: {probe} is a file, not a folder; name a folder for the cache")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".gkd-probe-", dir=probe))
    except OSError as e:
        raise GKDError(f"--teacher_cache {path}: not writable ({e.strerror or e}); make it writable or choose "
                       "another folder") from None
    # (another process of this run may be probing too, or making the cache: its marker is made first)
    if probe == folder and not (folder / MARKER).is_file() and any(
            not f.name.startswith((".gkd-probe-", f".{MARKER}.")) for f in folder.iterdir()):
        raise GKDError(f"--teacher_cache {path}: the folder holds other files and no {MARKER}; name an empty or "
                       "new folder (or one a teacher cache made)")
    return folder


def model_fingerprint(spec: str, dtype: str) -> str:
    """sha256 over the model's files (weights, config, tokenizer: every file of its folder, or its .gguf)
    and the dtype it is loaded in: another teacher, or the same one changed on disk, has another one."""
    from gkd.models import resolve

    folder, gguf = resolve(spec)
    files = [folder / gguf] if gguf else sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    h = hashlib.sha256(f"dtype={dtype}\n".encode())
    for f in files:
        h.update(f"{f.name}={sha256_file(f)}\n".encode())
    return h.hexdigest()


def local_identity(spec: str, dtype: str) -> dict:
    return {"kind": "local", "fingerprint": model_fingerprint(spec, dtype)}


def remote_identity(remote) -> dict:
    """A server's model as it names itself (``gkd serve`` also sends its weights' fingerprint; for vLLM the
    served name and root are all there is: see docs/teacher_cache.md), and the log-probs' wire dtype."""
    served = remote.served or {}
    return {"kind": "server", "model": remote.model, "root": served.get("root"),
            "fingerprint": (served.get("gkd") or {}).get("fingerprint"),
            "wire_dtype": remote.wire_dtype if remote.compact else "json"}


def _images_digest(images: list) -> list[str]:
    out = []
    for im in images or []:
        h = hashlib.sha256(f"{im.mode}:{im.size}".encode())
        h.update(im.tobytes())
        out.append(h.hexdigest())
    return out


class TeacherCache:
    """Entries of one teacher, K and loss temperature in a folder (K = 0: final hidden states, which no
    temperature changes); counts what it did."""

    def __init__(self, folder: str, identity: dict, topk: int, temperature: float, log=print):
        self.folder = Path(folder).absolute()  # checked by the caller before any process wrote into it
        self.base = {"format": FORMAT, "teacher": identity, "topk": int(topk),
                     "temperature": float(temperature) if topk else None}
        self.topk, self.log = int(topk), log
        self.hits = self.misses = self.damaged = self.written_bytes = 0
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if not (self.folder / MARKER).is_file():  # first, so no process sees the folder unmarked
                write_atomic(self.folder / MARKER, json.dumps({"format": FORMAT}) + "\n")
            (self.folder / "entries").mkdir(exist_ok=True)
        except OSError as e:
            raise GKDError(f"--teacher_cache {folder}: cannot create it ({e.strerror or e})") from None

    def key(self, ids: list[int], rows_from: int, images: list | None = None) -> str:
        tokens = hashlib.sha256(torch.tensor(ids, dtype=torch.int64).numpy().tobytes()).hexdigest()
        parts = {**self.base, "tokens": tokens, "n": len(ids), "rows_from": rows_from,
                 "images": _images_digest(images)}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / "entries" / key[:2] / f"{key}.json"

    def get(self, key: str, rows: int, rows_from: int) -> tuple[torch.Tensor, ...] | None:
        """The entry's (ids [rows, K], log-probs [rows, K]), or (hidden states [rows, H],) with K = 0; None
        when absent or damaged (said once)."""
        path = self.path(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            self.misses += 1
            return None
        why = None
        sum_, _, body = raw.partition(b"\n")
        if hashlib.sha256(body).hexdigest().encode() != sum_:
            why = "checksum mismatch"
        else:
            try:
                entry = json.loads(body)
                if entry.get("key") != key:
                    why = "it belongs to another key"
                else:
                    got = (decode_compact(entry["topk"], self.topk, rows, rows_from) if self.topk else
                           (decode_tensor(entry["hidden"], "hidden states"),))
                    if got[0].dim() != 2 or got[0].shape[0] != rows:
                        raise WireError(f"{tuple(got[0].shape)} for {rows} rows")
                    self.hits += 1
                    return got
            except (ValueError, KeyError, TypeError, AttributeError, WireError) as e:
                why = f"unreadable ({type(e).__name__})"
        self.damaged += 1
        self.misses += 1
        self.log(f"[gkd] teacher cache: damaged entry {path} ({why}); scoring the row again")
        return None

    def put(self, key: str, ids: torch.Tensor, logprobs: torch.Tensor, rows_from: int) -> None:
        """A top-K entry: ids and log-probs [rows, K]."""
        self._write(key, {"topk": encode_compact(ids.cpu(), logprobs.cpu(), rows_from, "float32")})

    def put_hidden(self, key: str, hidden: torch.Tensor) -> None:
        """A full-vocabulary entry: final hidden states [rows, H], in their dtype."""
        name = {d: n for n, d in TENSOR_DTYPES.items()}[hidden.dtype]
        self._write(key, {"hidden": encode_tensor(hidden, name)})

    def _write(self, key: str, payload: dict) -> None:
        body = json.dumps({"key": key, **payload}, separators=(",", ":")).encode()
        data = hashlib.sha256(body).hexdigest().encode() + b"\n" + body
        path = self.path(key)
        try:
            path.parent.mkdir(exist_ok=True)
            write_atomic(path, data)
        except OSError as e:
            raise GKDError(f"--teacher_cache {self.folder}: writing {path} failed ({e.strerror or e}); free some "
                           "space or choose another folder") from None
        self.written_bytes += len(data)

    def summary(self) -> dict:
        return {"cache_hits": self.hits, "cache_misses": self.misses, "cache_damaged": self.damaged,
                "cache_bytes_written": self.written_bytes}


# --- the teacher ----------------------------------------------------------------------------------------


def _any_rank(flags: list[bool], device) -> list[bool]:
    """Whether each of ``flags`` holds on any process: a sharded (or pipelined) teacher's forward needs every
    rank, so one rank's miss in its k-th micro-batch makes all of them score their k-th."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flags
    t = torch.tensor([int(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


@dataclass
class _Found:
    """What the cache holds of a batch, in place ([B, T, ...] on the CPU): top-K ids and log-probs, or final
    hidden states (``fields``; made at the first entry read: their width and dtype are the entries'); each
    sequence's key; the sequences it misses."""

    fields: list | None
    keys: list
    missing: list[int]


def _topk_output(batch: Batch, ids: torch.Tensor, logprobs: torch.Tensor, split=None) -> TeacherOutput:
    """Top-K rows [B, T, K] as the loss takes them: on the batch's device, this rank's positions under ``split``."""
    device = batch.input_ids.device
    return TeacherOutput(topk_ids=ids.to(device), topk_logprobs=logprobs.to(device)).local(split)


class CachedTeacher(OneTeacher):
    """A teacher whose off-policy rows come from a TeacherCache when every row of the batch is there; else
    the wrapped teacher scores the batch (every rank of a sharded one) and the missing rows are stored.
    The loss always gets top-K ids + log-probs, the same values a live top-K teacher gives it."""

    def __init__(self, inner, cache: TeacherCache, sharded: bool = False, tp_group=None, log=print):
        self.inner, self.cache, self.sharded, self.tp_group, self.log = inner, cache, sharded, tp_group, log
        self.topk, self.context = inner.topk, inner.context

    def score(self, batch: Batch, split=None) -> TeacherOutput:
        """``split`` (context parallelism): every rank of the group looks the whole rows up; a miss on any
        rank has the wrapped teacher score this rank's positions on each, the group gathers them into
        whole rows, which its first rank stores."""
        if batch.sampled:  # the student's samples change every step: nothing to reuse
            return self.inner.score(batch, split)
        found = self._stored(batch)
        together = self.sharded or split is not None  # (the group's ranks must score together)
        if not (_any_rank([bool(found.missing)], batch.input_ids.device)[0] if together else found.missing):
            return self._output(batch, found, split)
        return self._fill(batch, found, self.inner.score(batch, split), split)

    def score_pipelined(self, batches: list[Batch], last_stage: bool, splits=None) -> list[TeacherOutput | None]:
        """Every pipeline rank takes part in the wrapped teacher's scoring of the micro-batches any rank misses
        rows of (its stages pass hidden states on); the last stage stores what it scored and returns each
        micro-batch's output (None elsewhere); ``splits`` as in ``score``."""
        splits = splits or [None] * len(batches)
        found = [None if b.sampled else self._stored(b) for b in batches]
        live = _any_rank([f is None or bool(f.missing) for f in found], batches[0].input_ids.device)
        asked = [i for i, go in enumerate(live) if go]
        scored = iter(self.inner.score_pipelined([batches[i] for i in asked], last_stage,
                                                 None if splits[0] is None else [splits[i] for i in asked]))
        out = []
        for b, f, go, split in zip(batches, found, live, splits):
            got = next(scored) if go else None
            if not last_stage:
                out.append(None)
            elif f is None:  # on-policy: as the teacher gives it
                out.append(got)
            else:
                out.append(self._fill(b, f, got, split) if go else self._output(b, f, split))
        return out

    def _output(self, batch: Batch, found: "_Found", split=None) -> TeacherOutput:
        """A batch the cache holds whole, as the loss takes it: on the batch's device, this rank's positions
        under ``split``; hidden states with the teacher's head."""
        device, (B, T) = batch.input_ids.device, batch.input_ids.shape
        if self.cache.topk:
            k = self.cache.topk
            fields = found.fields or [torch.zeros(B, T, k, dtype=torch.long), torch.zeros(B, T, k)]
            return _topk_output(batch, *fields, split)
        head = self.inner.logit_head(device)
        hidden = (found.fields[0].to(device) if found.fields else  # (no row of the batch is scored)
                  torch.zeros(B, T, head.weight.shape[1], dtype=head.weight.dtype, device=device))
        return TeacherOutput(hidden=hidden if split is None else split.local(hidden), head=head, topk=None)

    def _stored(self, batch: Batch) -> "_Found":
        """The batch's rows the cache holds, in place, and those it misses."""
        seqs = batch.scored_sequences()
        B, T = batch.input_ids.shape
        found = _Found(None, [None] * len(seqs), [])
        for s, ((seq, r0), (b, start, end)) in enumerate(zip(seqs, batch.sequences())):
            if r0 < 0:
                continue
            found.keys[s] = self.cache.key(seq, r0, batch.images[s] if batch.images else None)
            got = self.cache.get(found.keys[s], len(seq) - 1 - r0, r0)
            if got is None:
                found.missing.append(s)
                continue
            if found.fields is None:
                found.fields = [torch.zeros(B, T, t.shape[1], dtype=t.dtype) for t in got]
            for field, t in zip(found.fields, got):
                field[b, start + r0:end - 1] = t
        return found

    def _fill(self, batch: Batch, found: "_Found", live: TeacherOutput, split=None) -> TeacherOutput:
        """The batch's output from the wrapped teacher's ``live`` one, its missing rows stored. Under a context
        ``split`` both are this rank's positions: the group gathers them into whole rows, which its first rank
        stores."""
        if self.cache.topk:
            fields = self._topk_of(batch.loss_mask if split is None else split.local(batch.loss_mask, False), live)
        else:  # the live output itself: the hidden states and the head the loss gets either way
            fields = (live.hidden.detach(),)
        whole = fields if split is None else tuple(split.whole(t) for t in fields)
        if split is None or split.rank == 0:
            self._store(batch, found, whole)
        return _topk_output(batch, *fields) if self.cache.topk else live

    def _store(self, batch: Batch, found: "_Found", fields: tuple) -> None:
        """The rows the cache missed, from the whole batch's top-K ids and log-probs or hidden states [B, T, ...]."""
        seqs, where = batch.scored_sequences(), batch.sequences()
        for s in found.missing:
            b, start, end = where[s]
            r0 = start + seqs[s][1]
            rows = [t[b, r0:end - 1] for t in fields]
            if self.cache.topk:
                self.cache.put(found.keys[s], *rows, seqs[s][1])
            else:
                self.cache.put_hidden(found.keys[s], rows[0])

    def _topk_of(self, loss_mask: torch.Tensor, out: TeacherOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """The wrapped teacher's top-K at every scored position of ``loss_mask`` [B, T] ([B, T, K] on the
        CPU) from its output ``out`` (of those positions)."""
        if out.topk_ids is not None:
            return out.topk_ids.cpu(), out.topk_logprobs.float().cpu()
        # a local teacher: its top-K from its logits, as the loss takes it (gkd.losses.topk_logprobs)
        B, T = loss_mask.shape
        ids = torch.zeros(B * T, self.cache.topk, dtype=torch.long)
        lps = torch.zeros(B * T, self.cache.topk, dtype=torch.float32)
        where = loss_mask.reshape(-1).nonzero()[:, 0]
        hidden = out.hidden.reshape(B * T, -1)
        for c in range(0, len(where), HEAD_ROWS):
            pos = where[c:c + HEAD_ROWS]
            i, lp = topk_logprobs(out.head.logits(hidden[pos]), self.cache.topk, tp_group=self.tp_group)
            ids[pos.cpu()], lps[pos.cpu()] = i.cpu(), lp.cpu()
        return ids.view(B, T, -1), lps.view(B, T, -1)

    # --- the rest of the protocol: the wrapped teacher's ---

    def check_rows(self, examples: list, new_tokens: int, sampled: bool) -> None:
        self.inner.check_rows(examples, new_tokens, sampled)


    def check_generation(self, rollout, why: str) -> None:
        self.inner.check_generation(rollout, why)

    def generate(self, prompts, rollout, rows=None, inputs=None, seed: int = 0):
        return self.inner.generate(prompts, rollout, rows, inputs, seed)

    def evaluate(self, student, prompts, **kw):
        return self.inner.evaluate(student, prompts, **kw)

    def memory_mib(self, most, device) -> dict[str, float]:
        return self.inner.memory_mib(most, device)

    def close(self) -> None:
        c = self.cache
        self.log(f"[gkd] teacher cache {c.folder}: {c.hits} rows reused, {c.misses} scored ({c.damaged} damaged "
                 f"entries among them), {c.written_bytes} bytes written")
        self.inner.close()
