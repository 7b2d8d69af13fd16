"""Two tokenisations of one text, lined up: which student token and which teacher token cover the same
characters, and which vocabulary entries of the two tokenizers are the same string.

A token's span is found by decoding prefixes: token i of ``ids`` covers ``text[len(decode(ids[:i])) :
len(decode(ids[:i + 1]))]`` when both prefixes are prefixes of ``text`` (a byte-level token that ends
inside a multi-byte character decodes to a replacement character: that boundary is not clean, and the
tokens on either side of it have no span of their own). Student token i and teacher token j are *aligned*
when their spans are equal and the vocabulary mapping pairs their ids.
"""

from __future__ import annotations

from gkd.errors import GKDError


def _byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.decoder).__name__ == "ByteLevel"


def token_keys(tokenizer) -> dict[str, int]:
    """Each vocabulary entry's string in a form both tokenizers share -> its id (the lowest id of equal
    strings): a byte-level BPE's entries as the bytes they stand for, SentencePiece's with its word marker
    as a space, anything else as written."""
    vocab = tokenizer.get_vocab()
    if _byte_level(tokenizer):
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        to_byte = {c: b for b, c in bytes_to_unicode().items()}

        def key(tok: str):
            if all(c in to_byte for c in tok):
                return bytes(to_byte[c] for c in tok)
            return tok.encode()  # an added token, written as itself
    else:
        def key(tok: str):
            return tok.replace("\u2581", " ").encode()
    out: dict = {}
    for tok, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        out.setdefault(key(tok), i)
    return out


def vocab_pairs(student_tok, teacher_tok) -> list[tuple[int, int]]:
    """(student id, teacher id) of every string both vocabularies hold, in student-id order, one-to-one; the
    two end-of-sequence tokens are paired whatever their strings."""
    s_eos, t_eos = student_tok.eos_token_id, teacher_tok.eos_token_id
    if s_eos is None or t_eos is None:
        raise GKDError("--teacher_tokenizer other: both tokenizers need an end-of-sequence token (eos_token) to pair")
    theirs = token_keys(teacher_tok)
    pairs = {s: theirs[k] for k, s in token_keys(student_tok).items() if k in theirs}
    pairs = {s: t for s, t in pairs.items() if s != s_eos and t != t_eos}
    pairs[s_eos] = t_eos
    return sorted(pairs.items())


def spans(tokenizer, ids: list[int], text: str) -> list[tuple[int, int] | None]:
    """Each token's [start, end) in ``text`` (the decoding of ``ids``), None where a boundary is not clean."""
    ends = []
    for i in range(len(ids) + 1):
        prefix = decode(tokenizer, ids[:i])
        ends.append(len(prefix) if text.startswith(prefix) else None)
    return [(a, b) if a is not None and b is not None and a < b else None for a, b in zip(ends, ends[1:])]


def aligned_pairs(student_spans, teacher_spans, student_ids, teacher_ids, pair_of: dict[int, int]) -> list[tuple[int, int]]:
    """(i, j): student token i and teacher token j cover the same characters and are paired ids."""
    where = {span: j for j, span in enumerate(teacher_spans) if span is not None}
    out = []
    for i, span in enumerate(student_spans):
        j = where.get(span) if span is not None else None
        if j is not None and pair_of.get(student_ids[i]) == teacher_ids[j]:
            out.append((i, j))
    return out


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def retokenise(student_tok, teacher_tok, pair_of: dict[int, int], completion: list[int],
               where: str) -> tuple[list[int], list[tuple[int, int]]]:
    """(the teacher's ids of a student completion, the aligned (student index, teacher index) pairs). The
    completion's text is the decoding of its tokens before a final end-of-sequence token; the teacher's ids are
    its tokenisation of that text, followed by its own end-of-sequence token where the student's ended (an
    aligned pair). ``pair_of``: vocab_pairs as a dict."""
    ended = bool(completion) and completion[-1] == student_tok.eos_token_id
    body = completion[:-1] if ended else completion
    text = decode(student_tok, body)
    theirs = list(teacher_tok(text, add_special_tokens=False)["input_ids"])
    if decode(teacher_tok, theirs) != text:
        raise GKDError(f"{where}: the teacher's tokenizer does not give back the completion's text "
                       f"{text[:40]!r} (it normalises it); --teacher_tokenizer other needs a lossless teacher tokenizer")
    pairs = aligned_pairs(spans(student_tok, body, text), spans(teacher_tok, theirs, text), body, theirs, pair_of)
    if ended:
        pairs.append((len(body), len(theirs)))
        theirs.append(teacher_tok.eos_token_id)
    return theirs, pairs

