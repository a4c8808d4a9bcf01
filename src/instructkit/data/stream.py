"""Rows streamed from the sources through the converter and the tokenizer into the store, a chunk at a time.

Memory stays flat however long the file: a chunk of CHUNK conversations is rendered and tokenized (in
`data.num_proc` spawned workers, each given the tokenizer once, a bounded number of chunks in flight) and
written to the store as flat arrays; what is kept per row is a status byte. Which rows are held out for
eval is decided once their number is known, from the same seeded shuffle as before, so the examples,
masks and order are those of the in-memory pipeline.

A row over max_length that the policy drops or truncates anyway is cut before tokenizing where that
cannot change the result: a token stands for at most `max_token_chars` characters, so a row (drop) or
the segments before a point (truncate) with more characters than that many tokens can hold is over the
limit for certain, and what lies beyond is never tokenized.
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from instructkit.config import IGNORE
from instructkit.data.formats import Conversation
from instructkit.data.sources import BadRow, Record, apply_weight, iter_resolved, read_resolved
from instructkit.data.tokenize import CHUNK, fit_length, tokenize_many
from instructkit.data.validate import Converter

if TYPE_CHECKING:
    from instructkit.config import DataConfig
    from instructkit.data.store import StoreWriter

KEPT, TRUNCATED, DROPPED, OVER = 0, 1, 2, 3  # a row's status byte; OVER: over max_length under `error`


@dataclass
class Settings:
    """What a tokenizing worker needs (sent once per worker)."""

    tokenizer: Any
    template: Any
    train_on_inputs: bool
    turns: str
    max_length: int
    overlength: str
    eot_id: int
    token_chars: int | None  # most characters one token stands for; None when no sound bound is known


def max_token_chars(tokenizer) -> int | None:
    """Most characters of text one token can cover: its vocabulary string's length (byte-level tokens spell
    one character per byte, added tokens are their text). Unsound when a normalizer may shrink the text
    (NFC composes characters), so None there."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None:
        return None
    return max(len(token) for token in tokenizer.get_vocab())


def _cut(segments: list[tuple[str, bool]], s: Settings) -> list[tuple[str, bool]] | None:
    """The segments that decide the row's example: None when the row is over max_length for certain and
    dropped; under truncate, without the segments after a point that holds more than max_length tokens."""
    if s.token_chars is None or s.overlength == "error" or any("\ue000" in text for text, _ in segments):
        return segments
    if s.overlength == "drop":
        return None if sum(len(text) for text, _ in segments) > s.max_length * s.token_chars else segments
    least = 0  # tokens the segments before k hold at the least
    for k, (text, _) in enumerate(segments):
        if least > s.max_length:
            return segments[:k]  # already over: truncation keeps only tokens before this segment
        least += math.ceil(len(text) / s.token_chars)
    return segments


_WORKER: Settings | None = None


def _init(settings: Settings) -> None:
    global _WORKER
    _WORKER = settings


def tokenize_chunk(conversations: list[Conversation]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                                 np.ndarray]:
    """(ids, mask, lengths, status, full lengths) of a chunk: the kept examples' tokens end to end, each
    row's length in them (0 when not kept), its status and its token count before the policy."""
    from instructkit.data.templates import render_segments

    s = _WORKER
    n = len(conversations)
    status, full, lengths = np.zeros(n, np.int8), np.zeros(n, np.int32), np.zeros(n, np.int32)
    todo = []
    for i, conv in enumerate(conversations):
        segments = _cut(render_segments(s.template, s.tokenizer, conv.messages, turns=s.turns), s)
        if segments is None:
            status[i] = DROPPED
        else:
            todo.append((i, segments))
    ids_out: list[int] = []
    labels_out: list[int] = []
    for (i, _), (ids, labels) in zip(todo, tokenize_many([seg for _, seg in todo], s.tokenizer, s.train_on_inputs)):
        full[i] = len(ids)
        if len(ids) > s.max_length and s.overlength == "error":
            status[i] = OVER
            continue
        fitted = fit_length(ids, labels, s.max_length, s.overlength, s.eot_id)
        if fitted is None:
            status[i] = DROPPED
            continue
        status[i] = TRUNCATED if len(ids) > s.max_length else KEPT
        ids_out += fitted[0]
        labels_out += fitted[1]
        lengths[i] = len(fitted[0])
    ids_arr, labels_arr = np.array(ids_out, dtype=np.int64), np.array(labels_out, dtype=np.int64)
    return ids_arr, labels_arr != IGNORE, lengths, status, full


def tokenized(chunks: Iterator[list[Conversation]], settings: Settings, num_proc: int) -> Iterator[tuple]:
    """(chunk, tokenize_chunk(chunk)) in order; with num_proc > 1 in spawned workers (not forked: the parent
    may hold torch/OpenMP threads a forked child would inherit locked), a bounded number in flight."""
    if num_proc <= 1:
        _init(settings)
        for chunk in chunks:
            yield chunk, tokenize_chunk(chunk)
        return
    with ProcessPoolExecutor(max_workers=num_proc, mp_context=get_context("spawn"), initializer=_init,
                             initargs=(settings,)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, pool.submit(tokenize_chunk, chunk)))
            if len(pending) > 2 * num_proc:
                chunk, future = pending.popleft()
                yield chunk, future.result()
        while pending:
            chunk, future = pending.popleft()
            yield chunk, future.result()


@dataclass
class Scan:
    """One split's sources read through: bad rows as found, each conversation's status (an entry of the
    store from `first_entry` on), the provenance of rows dropped or over the limit, and preference pairs
    (kept as objects: they take the in-memory path)."""

    converter: Converter
    first_entry: int
    rows: int = 0
    read_bad: list[BadRow] = field(default_factory=list)
    convert_bad: list[BadRow] = field(default_factory=list)
    status: array = field(default_factory=lambda: array("b"))
    dropped: dict[int, str] = field(default_factory=dict)
    over: dict[int, tuple[str, int]] = field(default_factory=dict)
    pairs: list = field(default_factory=list)

    @property
    def bad(self) -> list[BadRow]:
        return self.read_bad + self.convert_bad


def _records(specs, resolved, seed: int) -> Iterator[Record | BadRow]:
    """Every source's rows in order; a weighted source is read whole (its sample needs its row count)."""
    for index, (spec, source) in enumerate(zip(specs, resolved)):
        if spec.weight == 1.0:
            yield from iter_resolved(source, index)
            continue
        got, wrong = read_resolved(source, index)
        yield from wrong
        yield from apply_weight(got, spec.weight, seed + index)


def _chunks(scan: Scan, items: Iterator[Record | BadRow], stop_on_bad: bool, tick: Callable[[int], None]
            ) -> Iterator[list[Conversation]]:
    chunk: list[Conversation] = []
    for item in items:
        scan.rows += 1
        if scan.rows % 4096 == 0:
            tick(4096)
        if isinstance(item, BadRow):
            scan.read_bad.append(item)
            continue
        out = scan.converter.convert(item)
        if isinstance(out, BadRow):
            scan.convert_bad.append(out)
        elif isinstance(out, Conversation):
            if not (stop_on_bad and scan.read_bad + scan.convert_bad):  # the run stops anyway: report only
                chunk.append(out)
            if len(chunk) == CHUNK:
                yield chunk
                chunk = []
        else:
            scan.pairs.append(out)
    tick(scan.rows % 4096)
    if chunk:
        yield chunk


def scan_split(specs, resolved, data_cfg: DataConfig, seed: int, settings: Settings, writer: StoreWriter,
               tick: Callable[[int], None]) -> Scan:
    """Read, convert and tokenize one split's sources into `writer`."""
    formats = [spec.format or data_cfg.format for spec in specs]
    columns = [spec.columns if spec.columns is not None else data_cfg.columns for spec in specs]
    scan = Scan(Converter(formats, columns), len(writer))
    chunks = _chunks(scan, _records(specs, resolved, seed), data_cfg.on_bad_row == "error", tick)
    for chunk, (ids, mask, lengths, status, full) in tokenized(chunks, settings, data_cfg.num_proc):
        base = len(scan.status)
        scan.status.extend(status.tolist())
        for i in np.flatnonzero(status == DROPPED).tolist():
            scan.dropped[base + i] = chunk[i].where
        for i in np.flatnonzero(status == OVER).tolist():
            scan.over[base + i] = (chunk[i].where, int(full[i]))
        writer.add_arrays(ids, mask, lengths, [c.where for c in chunk])
    return scan


def split_part(scan: Scan, members: np.ndarray, max_length: int) -> tuple[np.ndarray, list[BadRow], dict]:
    """(store entries of the kept examples, bad rows over max_length, stats) of the conversations `members`
    (indices into the scan, ascending)."""
    status = np.frombuffer(scan.status, dtype=np.int8)[members] if len(members) else np.zeros(0, np.int8)
    entries = members[status <= TRUNCATED] + scan.first_entry
    bad = [BadRow(scan.over[i][0], "over max_length", f"{scan.over[i][1]} tokens, over data.max_length={max_length} "
                  "(raise it, or set data.overlength to drop or truncate)") for i in members[status == OVER].tolist()]
    dropped = members[status == DROPPED]
    if not len(members):
        return entries, bad, {}
    return entries, bad, {"rows": len(members), "kept": len(entries), "dropped": len(dropped),
                          "truncated": int((status == TRUNCATED).sum()),
                          "dropped_examples": [scan.dropped[i] for i in dropped[:5].tolist()]}
