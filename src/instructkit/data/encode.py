"""Texts -> token ids, fast: the Rust backend called directly, and a template's constant head tokenized once.

`tokenizer(texts)` spends as long on offsets and Python-side wrapping as on tokenizing; the backend's
`encode_batch_fast` gives the same ids without them and releases the GIL, so threads tokenize in parallel.

Most of a rendered prompt's first line is the template's own text (Alpaca's preamble is a fifth of an
average row), tokenized again for every row. For a byte-level BPE tokenizer with GPT-2's pre-tokenizer
(GPT-2, SmolLM2 and others), a text cut just after a newline that follows a non-space and precedes a
non-space tokenizes as its two parts do: the pre-tokenizer's pattern ends a piece at that newline either
way (`\\s+(?!\\S)` fails on the following non-space, `\\s+` takes the newline alone, and no alternative
joins a newline to what precedes it), it has no look-behind, and BPE works within pieces. So a head seen
before keeps its ids, and only the rest of the text goes to the tokenizer. Where the tokenizer is of any
other kind (a normalizer, another pre-tokenizer, BPE dropout, an added token that could straddle the cut),
texts are tokenized whole. By the same pattern a text cut where a non-space meets a space after it also
tokenizes as its parts: data/long_rows.py tokenizes an over-long row's first part only.
"""

from __future__ import annotations

import re
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

HEADS = 1024  # distinct heads kept per tokenizer (a template has a few; user text first lines are not kept)
SEEN = 65536  # heads seen once, remembered until this many, then forgotten


class HeadCache:
    """Ids of texts' heads (up to the first sound cut) seen at least twice."""

    def __init__(self, backend):
        self.backend = backend
        self.ids: dict[str, list[int]] = {}
        self.seen: set[str] = set()

    def split(self, text: str) -> tuple[list[int] | None, str]:
        """(ids of the head when known, the text left to tokenize)."""
        cut = first_cut(text)
        if not cut:
            return None, text
        head = text[:cut]
        if (ids := self.ids.get(head)) is not None:
            return ids, text[cut:]
        if head in self.seen and len(self.ids) < HEADS:
            self.ids[head] = self.backend.encode(head, add_special_tokens=False).ids
            return self.ids[head], text[cut:]
        if len(self.seen) >= SEEN:
            self.seen.clear()
        self.seen.add(head)
        return None, text


def first_cut(text: str) -> int:
    """The first position p with text[p-1] a newline after a non-space (or at the start) and text[p] not
    a space; 0 when there is none."""
    p = text.find("\n")
    while 0 <= p < len(text) - 1:
        if not text[p + 1].isspace() and (p == 0 or not text[p - 1].isspace()):
            return p + 1
        p = text.find("\n", p + 1)
    return 0


_BEFORE_SPACE = re.compile("[^\\s](?=[ \\t\\n\\r\\f\\v])")


def cut_before_space(text: str, start: int) -> int:
    """The first position p >= start with text[p-1] not a space and text[p] an ASCII space, tab or line
    break, where the pre-tokenizer ends a piece too (no alternative joins a non-space to a space after it);
    0 when there is none. Python's spaces include every Unicode space the tokenizer's pattern knows, so
    text[p-1] is a non-space there too."""
    match = _BEFORE_SPACE.search(text, max(start - 1, 0))
    return match.end() if match else 0


def _cuttable(backend) -> bool:
    from tokenizers.models import BPE
    from tokenizers.pre_tokenizers import ByteLevel

    pre = backend.pre_tokenizer
    if backend.normalizer is not None or not isinstance(pre, ByteLevel) or not pre.use_regex or pre.add_prefix_space:
        return False
    if not isinstance(backend.model, BPE) or backend.model.dropout:
        return False
    added = backend.get_added_tokens_decoder().values()
    # an added token must not straddle a cut: none holds a newline before its end or a space after a non-space,
    # and none takes the spaces beside it
    return not any("\n" in t.content[:-1] or _BEFORE_SPACE.search(t.content) or t.lstrip or t.rstrip for t in added)


def cuttable(tokenizer) -> bool:
    """Whether texts of this tokenizer may be cut (first_cut, cut_before_space) and tokenized in parts."""
    return _heads(tokenizer, getattr(tokenizer, "backend_tokenizer", None)) is not None


_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> HeadCache | None


def _heads(tokenizer, backend) -> HeadCache | None:
    if tokenizer not in _HEADS:
        fast = backend is not None and hasattr(backend, "encode_batch_fast")
        _HEADS[tokenizer] = HeadCache(backend) if fast and _cuttable(backend) else None
    return _HEADS[tokenizer]


def encode_texts(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of each text, without special tokens added: exactly `tokenizer(texts)["input_ids"]`."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (backend is None or not hasattr(backend, "encode_batch_fast") or getattr(tokenizer, "split_special_tokens",
                                                                                 False)
            or backend.truncation is not None or backend.padding is not None):
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    heads = _heads(tokenizer, backend)
    if heads is None:
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    parts = [heads.split(text) for text in texts]
    encoded = backend.encode_batch_fast([rest for _, rest in parts], add_special_tokens=False)
    return [head + e.ids if head else e.ids for (head, _), e in zip(parts, encoded)]
