"""Over-long rows tokenized only as far as the over-length policy needs.

A row a little over `max_length` that the policy drops or truncates is decided by its first max_length + 1
tokens; the rest would be tokenized for nothing (in Alpaca-like data the rows over 512 tokens are a few
percent of the rows but a quarter of the tokens). Where the tokenizer allows exact cuts (data/encode.py), a
row longer than a character budget is split: its segments up to the budget, the segment there cut where
a non-space meets a space, go to the tokenizer first; the rest (that segment's remainder and the later
segments) only when the first part turned out to hold no more than max_length tokens. Cut there, the parts'
tokens are the whole's, so the result is the same either way: a row over the limit is dropped or truncated
from tokens that are its own first tokens, any other row gets all its tokens.
"""

from __future__ import annotations

from typing import Callable

from instructkit.data.encode import cut_before_space

Segments = list[tuple[str, bool]]
Rest = tuple[str, Segments]  # the cut segment's remainder ("" when cut at a segment's end), the later segments


def split_long(segments: Segments, budget: int) -> tuple[Segments, Rest | None]:
    """(segments to tokenize first, the rest or None when the row fits the budget or cannot be cut)."""
    used = 0
    for k, (text, supervised) in enumerate(segments):
        if used + len(text) > budget:
            p = cut_before_space(text, budget - used)
            if p:
                return segments[:k] + [(text[:p], supervised)], (text[p:], segments[k + 1:])
            if k + 1 < len(segments):  # no cut inside it: after it, a segment boundary is a cut anyway
                return segments[:k + 1], ("", segments[k + 1:])
            return segments, None
        used += len(text)
    return segments, None


def join_rest(ids: list[list[int]], supervised: list[bool], counts: list[int], rests: dict[int, Rest],
              max_length: int, train_on_inputs: bool, encode: Callable[[list[str]], list[list[int]]]
              ) -> tuple[list[list[int]], list[bool], list[int]]:
    """Per segment ids, supervision and per row segment counts with the rest of each split row (`rests`, by
    row) tokenized and joined, unless its first part already holds more than max_length tokens."""
    starts = [0]
    for count in counts[:-1]:
        starts.append(starts[-1] + count)
    todo = {j: rest for j, rest in rests.items()
            if sum(len(x) for x in ids[starts[j]:starts[j] + counts[j]]) <= max_length}
    if not todo:
        return ids, supervised, counts
    more = iter(encode([text for remainder, later in todo.values() for text in [remainder, *(t for t, _ in later)]]))
    out_ids: list[list[int]] = []
    out_supervised: list[bool] = []
    out_counts: list[int] = []
    for j, count in enumerate(counts):
        row, flags = ids[starts[j]:starts[j] + count], supervised[starts[j]:starts[j] + count]
        if j in todo:
            _, later = todo[j]
            row = row[:-1] + [row[-1] + next(more)] + [next(more) for _ in later]
            flags = flags + [flag or train_on_inputs for _, flag in later]
        out_ids += row
        out_supervised += flags
        out_counts.append(len(row))
    return out_ids, out_supervised, out_counts
