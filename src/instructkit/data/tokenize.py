"""Conversation -> input_ids + labels, the mask built segment by segment while tokenizing.

Each rendered segment is tokenized on its own and the pieces are concatenated, so the prompt tokens
of an example are exactly the tokens `generate` builds for the same prompt, and a label is never
derived by subtracting a prompt length. Segments of many rows go to the tokenizer in one batched
call (data/stream.py spreads the calls over threads or processes).
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import TYPE_CHECKING

from instructkit.config import IGNORE
from instructkit.data.encode import encode_texts

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from instructkit.data.templates import Template

CHUNK = 512  # rows per batched tokenizer call / per task of a worker process


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    where: str = ""

    @property
    def n_supervised(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)

    @property
    def length(self) -> int:
        """Tokens of the example (a `PairExample` has the same property: its longer side)."""
        return len(self.input_ids)


def tokenize_segments(segments: list[tuple[str, bool]], tokenizer: PreTrainedTokenizerBase,
                      train_on_inputs: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of the concatenated segments, and labels: ids where supervised, IGNORE elsewhere."""
    return tokenize_many([segments], tokenizer, train_on_inputs)[0]


def tokenize_many(rows: list[list[tuple[str, bool]]], tokenizer: PreTrainedTokenizerBase, train_on_inputs: bool = False
                  ) -> list[tuple[list[int], list[int]]]:
    """`tokenize_segments` for many rows with one batched tokenizer call (texts holding user text that
    looks like a special token are tokenized piecewise, that text as plain characters)."""
    encoded = iter(encode_all([text for segments in rows for text, _ in segments], tokenizer))
    out = []
    for segments in rows:
        input_ids: list[int] = []
        labels: list[int] = []
        for _, supervised in segments:
            ids = next(encoded)
            input_ids += ids
            labels += ids if (supervised or train_on_inputs) else [IGNORE] * len(ids)
        out.append((input_ids, labels))
    return out


def encode_all(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """encode_texts, texts holding user text that looks like a special token tokenized piecewise (that text
    as plain characters)."""
    encoded = encode_texts(texts, tokenizer) if texts else []
    return [_with_literals(t, tokenizer) if "\ue000" in t else ids for t, ids in zip(texts, encoded)]


def _with_literals(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of a rendered text whose placeholders stand for user text spelling a special token: the
    template's parts as usual, each placeholder as the plain characters it stands for."""
    from instructkit.data.templates import PLACEHOLDER, special_strings

    specials, ids, last = special_strings(tokenizer), [], 0
    for match in PLACEHOLDER.finditer(text):
        if match.start() > last:
            ids += tokenizer(text[last:match.start()], add_special_tokens=False)["input_ids"]
        literal = specials[int(match.group(1))]
        ids += tokenizer(literal, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        last = match.end()
    if last < len(text):
        ids += tokenizer(text[last:], add_special_tokens=False)["input_ids"]
    return ids


def _render_and_tokenize_pairs(args) -> list[tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]]:
    pairs, tokenizer, template = args
    flat = tokenize_many([side for p in pairs for side in p.segments(template, tokenizer)], tokenizer)
    return list(zip(flat[::2], flat[1::2]))


def _map_chunks(work, items: list, extra: tuple, num_proc: int | str) -> list:
    """`work` over chunks of CHUNK items (in worker processes when num_proc > 1; `auto` stays in this
    process: preference pairs are read into memory anyway), results in order."""
    chunks = [(items[i:i + CHUNK], *extra) for i in range(0, len(items), CHUNK)]
    if num_proc == "auto" or int(num_proc) <= 1 or len(chunks) <= 1:
        return [out for chunk in chunks for out in work(chunk)]
    # spawn, not fork: the parent may hold torch/OpenMP threads that a forked child would inherit locked.
    with ProcessPoolExecutor(max_workers=num_proc, mp_context=get_context("spawn")) as pool:
        return [out for part in pool.map(work, chunks) for out in part]


def tokenize_pairs(pairs: list, tokenizer: PreTrainedTokenizerBase, template: Template, num_proc: int | str = 1
                   ) -> list[tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]]:
    """((chosen ids, labels), (rejected ids, labels)) for every `PairConversation`, in order; both sides of
    all pairs of a chunk go to the tokenizer in one batched call."""
    return _map_chunks(_render_and_tokenize_pairs, pairs, (tokenizer, template), num_proc)


def fit_length(input_ids: list[int], labels: list[int], max_length: int, overlength: str, eot_id: int
               ) -> tuple[list[int], list[int]] | None:
    """Apply the over-length policy: None to drop; a truncated copy that still ends in a supervised
    end-of-turn token (so the model keeps learning to stop); or the input when it fits."""
    if len(input_ids) <= max_length:
        return input_ids, labels
    if overlength == "drop":
        return None
    ids, labs = input_ids[: max_length - 1], labels[: max_length - 1]
    if all(label == IGNORE for label in labs):  # the prompt alone is too long: nothing left to learn
        return None
    return ids + [eot_id], labs + [eot_id]
