"""How a teacher server's top-k log-probs travel: vLLM's JSON `prompt_logprobs`, or our compact form.

Both decode to ``(ids [rows, K] int64, logprobs [rows, K] float32)`` where row j is the distribution
of token ``rows_from + j + 1`` given the tokens up to ``rows_from + j`` (the trainer's convention:
row i predicts token i+1).

vLLM (``prompt_logprobs = K``): a list with one entry per prompt token, ``null`` first; entry i is a
dict ``{"<token id>": {"logprob", "rank", "decoded_token"}}`` with the top K of token i's
distribution and possibly token i itself as an extra entry. We sort by log-prob and keep K.

Compact (offered by `gkd serve`, asked for with ``"gkd_wire": {"format": "compact", ...}``):
``{"k", "rows_from", "rows", "dtype", "ids": base64 int32 LE [rows*K], "logprobs": base64 float16|
float32 LE [rows*K]}`` -- about 6-8 bytes per entry instead of ~50 in JSON, and decoded with two
``frombuffer`` calls instead of a JSON walk.

Hidden states (``"gkd_wire": {"format": "hidden", ...}``, `gkd serve` only): the teacher's final hidden
states of the scored rows, ``{"rows_from", "rows", "hidden": tensor}``, and its logit head once
(``POST /v1/gkd/head``); the client applies the head itself, so the loss sees the full vocabulary. A tensor on
the wire is ``{"dtype", "shape", "data": base64 little-endian bytes}`` (float32, float16 or bfloat16).
"""

from __future__ import annotations

import base64

import numpy as np
import torch

from gkd.httpclient import WireError

COMPACT = "compact"
HIDDEN = "hidden"
WIRE_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
TENSOR_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def encode_tensor(t: torch.Tensor, dtype: str) -> dict:
    """``t`` in ``dtype`` (a TENSOR_DTYPES name) as base64 of its little-endian bytes."""
    data = t.detach().to(TENSOR_DTYPES[dtype]).contiguous().cpu().view(torch.uint8).numpy().tobytes()
    return {"dtype": dtype, "shape": list(t.shape), "data": base64.b64encode(data).decode("ascii")}


def decode_tensor(obj, what: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """The tensor of :func:`encode_tensor`'s ``obj`` (its shape checked against ``shape`` where given)."""
    try:
        dtype = TENSOR_DTYPES[obj["dtype"]]
        got = tuple(int(n) for n in obj["shape"])
        raw = bytearray(base64.b64decode(obj["data"], validate=True))
    except (KeyError, TypeError, ValueError) as e:
        raise WireError(f"{what}: malformed tensor ({type(e).__name__}: {e})") from None
    if shape is not None and got != tuple(shape):
        raise WireError(f"{what}: expected shape {tuple(shape)}, got {got}")
    count = int(np.prod(got)) if got else 1
    if len(raw) != count * dtype.itemsize:
        raise WireError(f"{what}: {len(raw)} bytes for shape {got} of {obj['dtype']}")
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(got) if count else torch.zeros(got, dtype=dtype)


def encode_compact(ids: torch.Tensor, logprobs: torch.Tensor, rows_from: int, dtype: str) -> dict:
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(WIRE_DTYPES)}, got {dtype!r}")
    rows, k = ids.shape
    return {
        "k": k, "rows_from": rows_from, "rows": rows, "dtype": dtype,
        "ids": base64.b64encode(ids.to(torch.int32).numpy().astype("<i4", copy=False).tobytes()).decode("ascii"),
        "logprobs": base64.b64encode(logprobs.float().numpy().astype(WIRE_DTYPES[dtype]).tobytes()).decode("ascii"),
    }


def decode_compact(obj: dict, k: int, rows: int, rows_from: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        if (obj["k"], obj["rows"], obj["rows_from"]) != (k, rows, rows_from):
            raise WireError(f"compact rows: asked for {rows} rows x K={k} from {rows_from}, "
                            f"got {obj['rows']} x {obj['k']} from {obj['rows_from']}")
        ids = np.frombuffer(base64.b64decode(obj["ids"], validate=True), dtype="<i4")
        lp = np.frombuffer(base64.b64decode(obj["logprobs"], validate=True), dtype=WIRE_DTYPES[obj["dtype"]])
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, WireError):
            raise
        raise WireError(f"compact rows: malformed ({type(e).__name__}: {e})") from None
    if ids.size != rows * k or lp.size != rows * k:
        raise WireError(f"compact rows: {ids.size} ids and {lp.size} log-probs for {rows} rows x K={k}")
    return (torch.from_numpy(ids.astype(np.int64)).view(rows, k),
            torch.from_numpy(lp.astype(np.float32)).view(rows, k))


def decode_vllm(prompt_logprobs, k: int, rows_from: int, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``rows_from .. n_tokens - 2`` from vLLM's per-token entries (entry i + 1 gives row i)."""
    if not isinstance(prompt_logprobs, list) or len(prompt_logprobs) != n_tokens:
        got = len(prompt_logprobs) if isinstance(prompt_logprobs, list) else type(prompt_logprobs).__name__
        raise WireError(f"prompt_logprobs: expected {n_tokens} entries (one per prompt token), got {got}")
    rows = n_tokens - 1 - rows_from
    ids = np.empty((rows, k), dtype=np.int64)
    lps = np.empty((rows, k), dtype=np.float32)
    for j in range(rows):
        entry = prompt_logprobs[rows_from + j + 1]
        if not isinstance(entry, dict) or len(entry) < k:
            size = len(entry) if isinstance(entry, dict) else entry
            raise WireError(f"prompt_logprobs[{rows_from + j + 1}]: expected >= {k} entries, got {size!r}")
        try:
            best = sorted(((float(v["logprob"]), int(t)) for t, v in entry.items()), reverse=True)[:k]
            lps[j] = [b[0] for b in best]
            ids[j] = [b[1] for b in best]
        except (KeyError, TypeError, ValueError) as e:
            raise WireError(f"prompt_logprobs[{rows_from + j + 1}]: malformed entry ({e})") from None
    return torch.from_numpy(ids), torch.from_numpy(lps)


def encode_vllm_entry(ids: list[int], logprobs: list[float], actual: int, actual_logprob: float,
                      actual_rank: int, decode) -> dict:
    """One vLLM-style ``prompt_logprobs`` entry: the top K plus the actual token if it is not among them."""
    entry = {str(t): {"logprob": lp, "rank": r + 1, "decoded_token": decode(t)}
             for r, (t, lp) in enumerate(zip(ids, logprobs))}
    if str(actual) not in entry:
        entry[str(actual)] = {"logprob": actual_logprob, "rank": actual_rank, "decoded_token": decode(actual)}
    return entry
