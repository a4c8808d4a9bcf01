"""Rows streamed from the sources through the converter and the tokenizer into the store, a chunk at a time.

Memory stays flat however long the file: a chunk of CHUNK conversations is rendered, tokenized (by
`data.num_proc` threads calling the tokenizer's native code, or spawned worker processes; a bounded number
of chunks in flight) and written to the store as flat arrays; what is kept per row is a status byte.
Which rows are held out for eval is decided once their number is known, from the same seeded shuffle as
before, so the examples, masks and order are those of the in-memory pipeline.

A row over max_length that the policy drops or truncates anyway is cut before tokenizing where that
cannot change the result: a token stands for at most `max_token_chars` characters, so a row (drop) or
the segments before a point (truncate) with more characters than that many tokens can hold is over the
limit for certain, and what lies beyond is never tokenized.
"""

from __future__ import annotations

import math
import os
from array import array
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from multiprocessing import get_context
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from instructkit.config import IGNORE
from instructkit.data.encode import cuttable
from instructkit.data.formats import Conversation
from instructkit.data.long_rows import Rest, join_rest, split_long
from instructkit.data.sources import BadRow, Record, apply_weight, iter_resolved, read_resolved
from instructkit.data.tokenize import CHUNK, encode_all, fit_length
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
    split_long: bool = field(init=False)  # over-long rows tokenized only as far as the policy needs (long_rows.py)
    chars_per_token: float = 4.0  # as last measured (4: English text before any): sets where long rows are split

    def __post_init__(self) -> None:
        self.split_long = self.overlength in ("drop", "truncate") and cuttable(self.tokenizer)

    def long_row_budget(self) -> int | None:
        """Characters after which a row is split: what max_length + 1 tokens usually hold. Splitting costs
        next to nothing (the parts' tokens are the whole's), so rows just under the limit may be split too."""
        if not self.split_long:
            return None
        return int((self.max_length + 1) * self.chars_per_token)


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


@dataclass
class Rendered:
    """A chunk rendered: the status so far, the rows to tokenize, their segments' texts end to end, whether
    each segment is supervised, and how many segments each row has."""

    status: np.ndarray
    rows: list[int]
    texts: list[str]
    supervised: list[bool]
    counts: list[int]
    rests: dict[int, Rest] = field(default_factory=dict)  # by position in `rows`: what split_long held back


def render_chunk(conversations: list[Conversation], s: Settings) -> Rendered:
    from instructkit.data.templates import render_segments

    out = Rendered(np.zeros(len(conversations), np.int8), [], [], [], [])
    budget = s.long_row_budget()
    for i, conv in enumerate(conversations):
        segments = _cut(render_segments(s.template, s.tokenizer, conv.messages, turns=s.turns), s)
        if segments is None:
            out.status[i] = DROPPED
            continue
        if budget is not None:
            segments, rest = split_long(segments, budget)
            if rest is not None:
                out.rests[len(out.rows)] = rest
        out.rows.append(i)
        out.counts.append(len(segments))
        for text, supervised in segments:
            out.texts.append(text)
            out.supervised.append(supervised or s.train_on_inputs)
    return out


def encode_chunk(rendered: Rendered, s: Settings) -> tuple[np.ndarray, np.ndarray]:
    """(every segment's ids end to end, each segment's length): the part that runs in the tokenizer's native
    threads, so it overlaps with rendering the next chunk."""
    ids = encode_all(rendered.texts, s.tokenizer)
    if s.split_long and (tokens := sum(map(len, ids))):
        s.chars_per_token = sum(map(len, rendered.texts)) / tokens
    if rendered.rests:
        ids, rendered.supervised, rendered.counts = join_rest(
            ids, rendered.supervised, rendered.counts, rendered.rests, s.max_length, s.train_on_inputs,
            lambda texts: encode_all(texts, s.tokenizer))
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    return np.fromiter(chain.from_iterable(ids), np.int64, int(lengths.sum())), lengths


def assemble_chunk(rendered: Rendered, flat: np.ndarray, seg_lengths: np.ndarray, s: Settings
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ids, mask, lengths, status, full lengths) of a chunk: the kept examples' tokens end to end, each
    row's length in them (0 when not kept), its status and its token count before the policy."""
    n, status = len(rendered.status), rendered.status
    full, lengths = np.zeros(n, np.int32), np.zeros(n, np.int32)
    mask = np.repeat(np.array(rendered.supervised, bool), seg_lengths)
    if not rendered.rows:
        return flat, mask, lengths, status, full
    row_lengths = np.add.reduceat(seg_lengths, np.cumsum([0] + rendered.counts[:-1])) if len(seg_lengths) else \
        np.zeros(len(rendered.rows), np.int64)
    rows = np.array(rendered.rows)
    full[rows] = row_lengths
    lengths[rows] = row_lengths
    over = np.flatnonzero(row_lengths > s.max_length)
    if not len(over):
        return flat, mask, lengths, status, full
    starts = np.concatenate([[0], np.cumsum(row_lengths)])
    ids_parts, mask_parts, done = [], [], 0
    for k in over.tolist():  # rows over max_length: the policy decides, row by row (rare)
        a, b, i = int(starts[k]), int(starts[k + 1]), rendered.rows[k]
        ids_parts.append(flat[done:a])
        mask_parts.append(mask[done:a])
        done = b
        fitted = None if s.overlength == "error" else fit_length(
            flat[a:b].tolist(), np.where(mask[a:b], flat[a:b], IGNORE).tolist(), s.max_length, s.overlength, s.eot_id)
        status[i] = OVER if s.overlength == "error" else DROPPED if fitted is None else TRUNCATED
        lengths[i] = 0 if fitted is None else len(fitted[0])
        if fitted is not None:
            ids_parts.append(np.array(fitted[0], np.int64))
            mask_parts.append(np.array(fitted[1]) != IGNORE)
    ids_parts.append(flat[done:])
    mask_parts.append(mask[done:])
    return np.concatenate(ids_parts), np.concatenate(mask_parts), lengths, status, full


_WORKER: Settings | None = None


def _init(settings: Settings) -> None:
    global _WORKER
    _WORKER = settings


def tokenize_chunk(conversations: list[Conversation]) -> tuple:
    """assemble_chunk's arrays of a chunk, rendered, encoded and assembled in one worker process."""
    rendered = render_chunk(conversations, _WORKER)
    return assemble_chunk(rendered, *encode_chunk(rendered, _WORKER), _WORKER)


def tokenizing_plan(template, num_proc: int | str) -> tuple[str, int]:
    """("threads" | "processes", how many). A builtin template renders in microseconds, so tokenizing is
    the work: threads calling the tokenizer's native code (which releases the GIL) share this process's
    memory. A template rendered through Jinja costs as much Python as tokenizing: an explicit num_proc > 1
    spreads it over spawned processes (each imports the tokenizer's libraries); `auto` never spawns."""
    from instructkit.data.templates import renders_fast

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if num_proc == "auto":
        return "threads", min(cores, 8)
    if int(num_proc) > 1 and not renders_fast(template):
        return "processes", int(num_proc)
    return "threads", int(num_proc)


def tokenized(chunks: Iterator[list[Conversation]], settings: Settings, num_proc: int | str) -> Iterator[tuple]:
    """(chunk, assemble_chunk's arrays) in order, a bounded number of chunks in flight: rendered here and
    encoded by threads, or all of it in spawned worker processes (not forked: the parent may hold
    torch/OpenMP threads a forked child would inherit locked); see tokenizing_plan."""
    kind, n = tokenizing_plan(settings.template, num_proc)
    if kind == "processes":
        yield from _in_workers(chunks, settings, n)
        return
    with serial_tokenizer(), ThreadPoolExecutor(max_workers=n) as pool:
        pending: deque = deque()
        for chunk in chunks:
            rendered = render_chunk(chunk, settings)
            pending.append((chunk, rendered, pool.submit(encode_chunk, rendered, settings)))
            if len(pending) > 2 * n:
                chunk, rendered, future = pending.popleft()
                yield chunk, assemble_chunk(rendered, *future.result(), settings)
        while pending:
            chunk, rendered, future = pending.popleft()
            yield chunk, assemble_chunk(rendered, *future.result(), settings)


@contextmanager
def serial_tokenizer() -> Iterator[None]:
    """Each batch call on one core while our threads tokenize: one chunk per thread keeps every core busy
    (measured: 1.9 of 2 cores, against 1.6 with one thread and the tokenizer's own parallel batch). The
    Rust side reads the variable at each call; it is set back once no tokenizer thread runs."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _in_workers(chunks: Iterator[list[Conversation]], settings: Settings, num_proc: int) -> Iterator[tuple]:
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
