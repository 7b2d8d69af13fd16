"""Two tokenisations of one text, lined up: which student token and which teacher token cover the same
bytes, and which vocabulary entries of the two tokenizers are the same string.

Spans are in the UTF-8 bytes of the text. A byte-level BPE token's span is its bytes, laid end to end
(when they make up the text). Otherwise token i of ``ids`` covers bytes ``len(decode(ids[:i])) ..
len(decode(ids[:i + 1]))`` (lengths in UTF-8) when both prefixes are prefixes of the text; a boundary that
is not (a token ending inside a character decodes to U+FFFD) is not clean, and the tokens on either side of
it have no span. Student token i and teacher token j are *aligned* when their spans are equal and the
vocabulary mapping pairs their ids.
"""

from __future__ import annotations

from itertools import pairwise

from gkd.errors import GKDError


def _byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.decoder).__name__ == "ByteLevel"


def id_bytes(tokenizer) -> dict[int, bytes]:
    """Each vocabulary id's string in a form both tokenizers share: a byte-level BPE's entries as the bytes
    they stand for, SentencePiece's with its word marker as a space, anything else as written (UTF-8)."""
    if _byte_level(tokenizer):
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        to_byte = {c: b for b, c in bytes_to_unicode().items()}

        def key(tok: str) -> bytes:
            if all(c in to_byte for c in tok):
                return bytes(to_byte[c] for c in tok)
            return tok.encode()  # an added token, written as itself
    else:
        def key(tok: str) -> bytes:
            return tok.replace("\u2581", " ").encode()
    return {i: key(tok) for tok, i in tokenizer.get_vocab().items()}


def token_keys(tokenizer) -> dict[bytes, int]:
    """id_bytes inverted: each string -> its lowest id."""
    out: dict = {}
    for i, key in sorted(id_bytes(tokenizer).items()):
        out.setdefault(key, i)
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


def spans(tokenizer, ids: list[int], text: str, table: dict[int, bytes] | None = None) -> list[tuple[int, int] | None]:
    """Each token's [start, end) in the UTF-8 bytes of ``text`` (the decoding of ``ids``), None where a boundary
    is not clean. ``table`` (a byte-level tokenizer's id_bytes): where its tokens' bytes make up the text, their
    lengths give the spans in one pass (and a token ending inside a character has one too); otherwise, or
    without it, every prefix is decoded."""
    if table is not None:
        pieces = [table.get(i) for i in ids]
        if None not in pieces and b"".join(pieces) == text.encode():
            out, at = [], 0
            for piece in pieces:
                out.append((at, at + len(piece)) if piece else None)
                at += len(piece)
            return out
    ends = []
    for i in range(len(ids) + 1):
        prefix = decode(tokenizer, ids[:i])
        ends.append(len(prefix.encode()) if text.startswith(prefix) else None)
    return [(a, b) if a is not None and b is not None and a < b else None for a, b in pairwise(ends)]


def aligned_pairs(student_spans, teacher_spans, student_ids, teacher_ids,
                  pair_of: dict[int, int]) -> list[tuple[int, int]]:
    """(i, j): student token i and teacher token j cover the same characters and are paired ids."""
    where = {span: j for j, span in enumerate(teacher_spans) if span is not None}
    out = []
    for i, span in enumerate(student_spans):
        j = where.get(span) if span is not None else None
        if j is not None and pair_of.get(student_ids[i]) == teacher_ids[j]:
            out.append((i, j))
    return out


def _boundaries(token_spans, length: int) -> dict[int, int]:
    """Byte offset -> token index k of each clean boundary (between tokens k - 1 and k), the text's two ends
    included."""
    out = {0: 0, length: len(token_spans)}
    for k, span in enumerate(token_spans):
        if span is not None:
            out.setdefault(span[0], k)
            out.setdefault(span[1], k + 1)
    return out


def unaligned_segments(student_spans, teacher_spans, length: int,
                       pairs: list[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """(i0, i1, j0, j1): student tokens i0..i1-1 and teacher tokens j0..j1-1 covering the same bytes of a text of
    ``length`` bytes, cut at every byte offset where both tokenisations have a clean boundary, and not one
    aligned pair (``pairs``): the shortest spans over which the two models' probabilities of the text compare."""
    mine, theirs = _boundaries(student_spans, length), _boundaries(teacher_spans, length)
    cuts = sorted((b, mine[b], theirs[b]) for b in mine.keys() & theirs.keys())
    aligned = set(pairs)
    out = []
    for (_, i0, j0), (_, i1, j1) in pairwise(cuts):
        if i1 > i0 and j1 > j0 and not (i1 - i0 == j1 - j0 == 1 and (i0, j0) in aligned):
            out.append((i0, i1, j0, j1))
    return out


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


class Aligner:
    """The two tokenizers, their paired vocabulary (vocab_pairs) and, for byte-level ones, each id's bytes."""

    def __init__(self, student_tok, teacher_tok):
        self.student_tok, self.teacher_tok = student_tok, teacher_tok
        self.pairs = vocab_pairs(student_tok, teacher_tok)
        self.pair_of = dict(self.pairs)
        self.tables = [id_bytes(t) if _byte_level(t) else None for t in (student_tok, teacher_tok)]

    def retokenise(self, completion: list[int], where: str) -> tuple[list[int], list[tuple[int, int]], list]:
        """(the teacher's ids of a student completion, the aligned (student index, teacher index) pairs, the
        unaligned segments between them: unaligned_segments). The
        completion's text is the decoding of its tokens before a final end-of-sequence token; the teacher's ids
        are its tokenisation of that text, followed by its own end-of-sequence token where the student's ended
        (an aligned pair)."""
        mine, theirs_tok = self.student_tok, self.teacher_tok
        ended = bool(completion) and completion[-1] == mine.eos_token_id
        body = completion[:-1] if ended else completion
        text = decode(mine, body)
        theirs = list(theirs_tok(text, add_special_tokens=False)["input_ids"])
        if decode(theirs_tok, theirs) != text:
            raise GKDError(f"{where}: the teacher's tokenizer does not give back the completion's text {text[:40]!r} "
                           "(it normalises it); --teacher_tokenizer other needs a lossless teacher tokenizer")
        cut = spans(mine, body, text, self.tables[0]), spans(theirs_tok, theirs, text, self.tables[1])
        pairs = aligned_pairs(*cut, body, theirs, self.pair_of)
        segments = unaligned_segments(*cut, len(text.encode()), pairs)
        if ended:
            pairs.append((len(body), len(theirs)))
            theirs.append(theirs_tok.eos_token_id)
        return theirs, pairs, segments
