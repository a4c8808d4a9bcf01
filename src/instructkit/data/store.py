"""The tokenized-data store: flat token arrays with an offsets index, memory-mapped, written row by row.

A million examples must not be a million Python lists in every process of a job, so the tokenized data
lives on disk and is mapped, not loaded: the page cache holds one copy that every rank shares, and a
cache hit costs a key check and a few `mmap` calls. Files of a store directory:

    ids.bin        token ids of every entry, end to end (uint16 when the vocabulary fits, else int32)
    mask.bin       uint8, 1 where the token is supervised (a label is always its token or IGNORE)
    offsets.bin    int64 [n + 1], where entry i starts in ids/mask
    lengths.bin    int32 [n], tokens of entry i (packing, length grouping and the sampler read only this)
    where.bin, where_offsets.bin   each entry's provenance (`file:line`), UTF-8 end to end
    SPLIT.idx      int64 entry numbers of a split's examples, in order (pairs: SPLIT-chosen/-rejected.idx)

An entry is one tokenized row; a row dropped as over-long is an entry of length 0 (its provenance stays
for the report). `ExampleSequence` and `PairSequence` are the lazy lists of `Example`s / `PairExample`s
that `Datasets` holds: indexable, sized, iterable, each item built from the mapped arrays when asked for.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from instructkit.config import IGNORE
from instructkit.data.preference import PairExample
from instructkit.data.tokenize import Example

FILES = ("ids", "mask", "offsets", "lengths", "where", "where_offsets")


def ids_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "int32"


class StoreWriter:
    """Appends entries to the files of `directory` (which must exist); `close` writes the index and returns
    the layout to record in stats.json. Labels are stored as a mask, so they must be their token or IGNORE."""

    def __init__(self, directory: Path, dtype: str):
        self.directory, self.dtype = Path(directory), dtype
        self._ids, self._mask = open(self.directory / "ids.bin", "wb"), open(self.directory / "mask.bin", "wb")
        self._where = open(self.directory / "where.bin", "wb")
        self.offsets, self.lengths, self.where_offsets = array("q", [0]), array("i"), array("q", [0])

    def __len__(self) -> int:
        return len(self.lengths)

    def add_arrays(self, ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray, where: list[str]) -> None:
        """Entries whose tokens are `ids` end to end (`lengths[i]` each) with provenance `where[i]`."""
        self._ids.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self._mask.write(np.asarray(mask, dtype=np.uint8).tobytes())
        end = self.offsets[-1]
        for n in lengths.tolist():
            end += n
            self.offsets.append(end)
        self.lengths.extend(lengths.astype(np.int32).tolist())
        encoded = [w.encode("utf-8") for w in where]
        self._where.write(b"".join(encoded))
        end = self.where_offsets[-1]
        for w in encoded:
            end += len(w)
            self.where_offsets.append(end)

    def add(self, examples: list[Example]) -> None:
        """Examples (lists of ids and labels) as entries."""
        ids = np.fromiter((t for e in examples for t in e.input_ids), dtype=np.int64)
        labels = np.fromiter((t for e in examples for t in e.labels), dtype=np.int64)
        mask = labels != IGNORE
        if not np.array_equal(labels[mask], ids[mask]):
            raise ValueError("a supervised label differs from its token; the store keeps labels as a mask")
        self.add_arrays(ids, mask, np.array([len(e.input_ids) for e in examples], dtype=np.int32),
                        [e.where for e in examples])

    def close(self) -> dict:
        for handle in (self._ids, self._mask, self._where):
            handle.close()
        for name, values, dtype in (("offsets", self.offsets, np.int64), ("lengths", self.lengths, np.int32),
                                    ("where_offsets", self.where_offsets, np.int64)):
            np.asarray(values, dtype=dtype).tofile(self.directory / f"{name}.bin")
        return {"dtype": self.dtype, "entries": len(self.lengths), "tokens": int(self.offsets[-1])}


def write_index(directory: Path, name: str, entries: np.ndarray) -> None:
    np.asarray(entries, dtype=np.int64).tofile(Path(directory) / f"{name}.idx")


def _map(path: Path, dtype) -> np.ndarray:
    """A read-only mapping of a file (an empty file cannot be mapped: an empty array then)."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class Store:
    """The mapped files of a store directory, opened on first use (again in each DataLoader worker that
    unpickles it, so a pickled sequence carries a path, not the data)."""

    def __init__(self, directory: Path, layout: dict):
        self.directory, self.layout = Path(directory), layout
        self._arrays: dict | None = None

    def __getstate__(self) -> dict:
        return {"directory": self.directory, "layout": self.layout, "_arrays": None}

    @property
    def arrays(self) -> dict:
        if self._arrays is None:
            types = {"ids": self.layout["dtype"], "mask": np.uint8, "offsets": np.int64, "lengths": np.int32,
                     "where": np.uint8, "where_offsets": np.int64}
            self._arrays = {name: _map(self.directory / f"{name}.bin", dtype) for name, dtype in types.items()}
        return self._arrays

    def index(self, name: str) -> np.ndarray:
        return _map(self.directory / f"{name}.idx", np.int64)

    def example(self, entry: int) -> Example:
        a = self.arrays
        start, end = int(a["offsets"][entry]), int(a["offsets"][entry + 1])
        ids = np.asarray(a["ids"][start:end], dtype=np.int64)
        labels = np.where(a["mask"][start:end] != 0, ids, IGNORE)
        w0, w1 = int(a["where_offsets"][entry]), int(a["where_offsets"][entry + 1])
        return Example(ids.tolist(), labels.tolist(), bytes(a["where"][w0:w1]).decode("utf-8"))


class _Lazy(Sequence):
    """A read-only list built on demand; slices are plain lists."""

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._item(j) for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._item(i)

    def __iter__(self):
        return (self._item(i) for i in range(len(self)))

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} items from {self.store.directory})"


class ExampleSequence(_Lazy):
    """The `Example`s of a split: entry `entries[i]` of the store."""

    def __init__(self, store: Store, entries: np.ndarray):
        self.store, self.entries = store, entries

    def __len__(self) -> int:
        return len(self.entries)

    def _item(self, i: int) -> Example:
        return self.store.example(int(self.entries[i]))

    @property
    def lengths(self) -> np.ndarray:
        """Tokens of each example, read from the index alone."""
        return np.asarray(self.store.arrays["lengths"][np.asarray(self.entries)], dtype=np.int64)


class PairSequence(_Lazy):
    """The `PairExample`s of a split: chosen side `chosen[i]`, rejected side `rejected[i]`."""

    def __init__(self, store: Store, chosen: np.ndarray, rejected: np.ndarray):
        self.store, self.chosen, self.rejected = store, chosen, rejected

    def __len__(self) -> int:
        return len(self.chosen)

    def _item(self, i: int) -> PairExample:
        c, r = self.store.example(int(self.chosen[i])), self.store.example(int(self.rejected[i]))
        return PairExample(c, r, c.where)

    @property
    def lengths(self) -> np.ndarray:
        """Each pair's longer side, read from the index alone."""
        lengths = self.store.arrays["lengths"]
        return np.maximum(lengths[np.asarray(self.chosen)], lengths[np.asarray(self.rejected)]).astype(np.int64)


def lengths_of(items: Sequence) -> np.ndarray:
    """Token lengths of examples or pairs: from the store's index when they are mapped, else one by one."""
    if hasattr(items, "lengths"):
        return items.lengths
    return np.array([x.length for x in items], dtype=np.int64)


def save_splits(directory: Path, splits: dict[str, list], kind: str, writer: StoreWriter) -> None:
    """Examples (or pairs) already in memory, appended to the store with an index per split."""
    for name, items in splits.items():
        if kind == "preference":
            for side in ("chosen", "rejected"):
                start = len(writer)
                writer.add([getattr(p, side) for p in items])
                write_index(directory, f"{name}-{side}", np.arange(start, len(writer)))
        else:
            start = len(writer)
            writer.add(list(items))
            write_index(directory, name, np.arange(start, len(writer)))


def open_splits(directory: Path, stats: dict) -> tuple[_Lazy, _Lazy]:
    """(train, eval) as lazy sequences over the mapped store."""
    store = Store(directory, stats["store"])
    if stats["kind"] == "preference":
        return tuple(PairSequence(store, store.index(f"{s}-chosen"), store.index(f"{s}-rejected"))
                     for s in ("train", "eval"))  # type: ignore[return-value]
    return ExampleSequence(store, store.index("train")), ExampleSequence(store, store.index("eval"))


def read_stats(directory: Path) -> dict | None:
    """The stats of a complete store (stats.json is written last, inside the directory renamed into place)."""
    path = Path(directory) / "stats.json"
    return json.loads(path.read_text()) if path.is_file() else None
