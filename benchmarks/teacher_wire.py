"""Teacher-server answers on the wire: vLLM-style JSON prompt_logprobs vs gkd serve's compact form, and
gkd serve's hidden states (--teacher_wire hidden: the full vocabulary).

    .venv/bin/python benchmarks/teacher_wire.py            # K = 20 and 64, 1024 scored tokens

The answers are built by the same code gkd serve uses, from real top-K log-probs (random logits over
SmolLM2's 49152-token vocabulary, decoded tokens from its tokenizer) or random hidden states of SmolLM2's
width (576), and decoded by the same code the client uses (json.loads, then gkd.wire.decode_vllm,
decode_compact or decode_tensor). Reported: bytes per scored token and the client's decode time (median of
--runs), side by side; for the hidden wire also what the client then computes that a top-K answer spares it:
the teacher's logits over the vocabulary (hidden @ head.T, the loss's work for a local teacher too).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from gkd.teacher.wire import decode_compact, decode_tensor, decode_vllm, encode_compact, encode_tensor, encode_vllm_entry

HIDDEN_SIZE = 576  # SmolLM2-135M's


def answers(k: int, n: int, vocab: int, decode) -> dict[str, bytes]:
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(n, vocab) * 3, dim=-1)
    tokens = torch.randint(0, vocab, (n + 1,)).tolist()
    top_lp, top_id = logp.topk(k, dim=-1)
    actual = logp.gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]
    rank = (logp > actual[:, None]).sum(-1) + 1
    il, ll, al, ar = top_id.tolist(), top_lp.tolist(), actual.tolist(), rank.tolist()
    entries = [None] + [encode_vllm_entry(il[j], ll[j], tokens[j + 1], al[j], ar[j], decode) for j in range(n)]
    out = {"vllm-json": {"choices": [{"index": 0, "text": "", "prompt_logprobs": entries}]}}
    for dtype in ("float16", "float32"):
        out[f"compact-{dtype}"] = {"choices": [{"index": 0, "text": "", "prompt_logprobs": None,
                                                "gkd_topk": encode_compact(top_id, top_lp, 0, dtype)}]}
    return {name: json.dumps(body).encode() for name, body in out.items()}


def hidden_answers(n: int) -> dict[str, bytes]:
    hidden = torch.randn(n, HIDDEN_SIZE)
    return {f"hidden-{dtype}": json.dumps({"choices": [{"index": 0, "text": "", "prompt_logprobs": None, "gkd_hidden": {
        "rows_from": 0, "hidden": encode_tensor(hidden, dtype)}}]}).encode() for dtype in ("float32", "bfloat16")}


def decode(name: str, raw: bytes, k: int, n: int):
    choice = json.loads(raw)["choices"][0]
    if name.startswith("hidden"):
        return decode_tensor(choice["gkd_hidden"]["hidden"], "hidden", (n, HIDDEN_SIZE))
    if name == "vllm-json":
        return decode_vllm(choice["prompt_logprobs"], k, 0, n + 1)
    return decode_compact(choice["gkd_topk"], k, n, 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024, help="scored tokens per answer")
    ap.add_argument("--k", type=int, nargs="+", default=[20, 64])
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    from gkd.models import SMOLLM2, load_tokenizer

    tok = load_tokenizer(SMOLLM2)
    cache: dict[int, str] = {}

    def dec(t: int) -> str:
        if t not in cache:
            cache[t] = tok.decode([t])
        return cache[t]

    print(f"{a.tokens} scored tokens per answer, vocabulary {len(tok)}, median of {a.runs} decodes\n")
    print("| K | format | bytes/token | decode ms | bytes vs JSON | decode speed-up |")
    print("|---|---|---|---|---|---|")
    for k in a.k:
        raws = answers(k, a.tokens, len(tok), dec)
        stats = {}
        for name, raw in raws.items():
            times = []
            for _ in range(a.runs):
                t0 = time.perf_counter()
                ids, lps = decode(name, raw, k, a.tokens)
                times.append(time.perf_counter() - t0)
            stats[name] = (len(raw) / a.tokens, statistics.median(times) * 1e3)
        ref_ids, ref_lps = decode("vllm-json", raws["vllm-json"], k, a.tokens)
        got_ids, got_lps = decode("compact-float32", raws["compact-float32"], k, a.tokens)
        assert torch.equal(ref_ids, got_ids) and torch.allclose(ref_lps, got_lps)  # same content both ways
        jb, jt = stats["vllm-json"]
        for name, (b, t) in stats.items():
            print(f"| {k} | {name} | {b:.0f} | {t:.2f} | {b / jb:.3f} | {jt / t:.1f}× |")
    # the hidden wire does not depend on K: once, against the JSON of the largest K
    for name, raw in hidden_answers(a.tokens).items():
        times = []
        for _ in range(a.runs):
            t0 = time.perf_counter()
            decode(name, raw, 0, a.tokens)
            times.append(time.perf_counter() - t0)
        b, t = len(raw) / a.tokens, statistics.median(times) * 1e3
        print(f"| all ({len(tok)}) | {name} | {b:.0f} | {t:.2f} | {b / jb:.3f} (vs K={k}) | {jt / t:.1f}× |")
    head, h = torch.randn(len(tok), HIDDEN_SIZE), torch.randn(a.tokens, HIDDEN_SIZE)
    times = []
    for _ in range(a.runs):
        t0 = time.perf_counter()
        for c in range(0, a.tokens, 256):
            torch.log_softmax(h[c:c + 256] @ head.T, dim=-1)
        times.append(time.perf_counter() - t0)
    print(f"\nhidden wire, client side: the teacher's log-probs over {len(tok)} tokens for {a.tokens} rows "
          f"(hidden @ head.T, log-softmax, in chunks of 256): {statistics.median(times) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
