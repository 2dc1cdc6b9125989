"""Which prompt tokens spell the query: found by decoding the text after the image, so any tokenizer works."""
from __future__ import annotations

import re

# Function words and punctuation draw attention that is not about the object (RefAM's "attention magnets");
# TAG takes only the instruction's quoted element text. The query's content words stay.
STOP_WORDS = frozenset("""
a an the this that these those is are was were be been am do does did what which who whom whose where when why how
of in on at to for from by with about into over under and or not no it its there here please find show me point
locate image picture photo tell give can you i my your any some
""".split())


def token_spans(tokenizer, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text of `ids` and each token's character span in it (from growing prefixes, so merges and
    leading spaces come out as the tokenizer writes them)."""
    spans, prev = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        start = len(prev) if text.startswith(prev) else _common_prefix(prev, text)
        spans.append((start, len(text)))
        prev = text
    return prev, spans


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def phrase_tokens(tokenizer, ids: list[int], start: int, end: int, phrase: str,
                  content_only: bool = True) -> list[int]:
    """Positions in [start, end] (inclusive) of the tokens that spell the last occurrence of `phrase` (case
    insensitive) in the decoded text of those positions; with `content_only`, stop words and punctuation are left
    out unless nothing else remains. [] when the phrase is not there."""
    text, spans = token_spans(tokenizer, ids[start : end + 1])
    at = text.lower().rfind(phrase.strip().lower())
    if not phrase.strip():
        return []
    if at < 0:  # not verbatim (a tokenizer that drops or replaces words, e.g. <unk>): the phrase's content words
        return _word_tokens(text, spans, phrase, start)
    lo, hi = at, at + len(phrase.strip())
    hit = [i for i, (a, b) in enumerate(spans) if a < hi and b > lo and b > a]
    if content_only:  # a token is content when it overlaps a word of the phrase that is not a stop word
        content = [(m.start() + lo, m.end() + lo) for m in re.finditer(r"\w+", text[lo:hi])
                   if m.group().lower() not in STOP_WORDS]
        words = [i for i in hit if any(spans[i][0] < b and spans[i][1] > a for a, b in content)]
        hit = words or hit
    return [start + i for i in hit]


def _word_tokens(text: str, spans, phrase: str, start: int) -> list[int]:
    """Tokens spelling the last occurrence of each content word of `phrase` in `text` (whole words, case-insensitive)."""
    low = text.lower()
    out: set[int] = set()
    for w in re.findall(r"\w+", phrase.lower()):
        if w in STOP_WORDS:
            continue
        found = [m for m in re.finditer(rf"(?<!\w){re.escape(w)}(?!\w)", low)]
        if found:
            lo, hi = found[-1].span()
            out |= {i for i, (a, b) in enumerate(spans) if a < hi and b > lo and b > a}
    return sorted(start + i for i in out)
