"""Read records from files and hub datasets, each with its provenance (`file:line`) for error messages.

A source is a file (.jsonl .json .csv .parquet), a glob, a directory of such files, or a hub dataset
id (through `datasets`, from the local cache when offline). Rows that cannot be read (invalid JSON,
bytes that are not UTF-8) are returned as bad rows, not raised, so one report can list them all.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from instructkit.errors import UserError, user_error

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class Record:
    """One row as read, where it came from (`file:line` or `file#index`), and its source spec index."""

    data: dict
    where: str
    source: int = 0


@dataclass(frozen=True)
class BadRow:
    where: str
    reason: str
    detail: str


@dataclass
class Resolved:
    """A source spec made concrete: its files, or a loaded hub dataset, and a content fingerprint."""

    name: str
    files: list[Path]
    dataset: object = None
    fingerprint: str = ""
    split: str = "train"
    file_hashes: dict = None  # type: ignore[assignment]
    rows_hint: int | None = None  # about how many rows (newlines, Parquet metadata), for progress


def sha256_file(path: str | Path) -> str:
    return hash_and_count(path)[0]


def hash_and_count(path: str | Path) -> tuple[str, int]:
    """(sha256, newlines) in one read: the newline count is the progress bar's row estimate."""
    digest, lines = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
            lines += chunk.count(b"\n")
    return digest.hexdigest(), lines


def _rows_hint(path: Path, lines: int) -> int | None:
    """About how many rows a file holds (for the ETA), when that is cheap to know."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except (OSError, ValueError):
            return None
    return lines if suffix in (".jsonl", ".csv") else None


def _folder_files(folder: Path) -> list[Path]:
    """Data files under a folder, skipping dot-folders and dot-files (JupyterLab's .ipynb_checkpoints holds a
    copy of every edited file) and not following symlinked folders (a link loop would repeat files)."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / n for n in names if not n.startswith(".") and Path(n).suffix.lower() in SUFFIXES]
    return _once(sorted(found))


def _once(files: list[Path]) -> list[Path]:
    """Each real file once, however many paths (links, `**` through a link loop) lead to it."""
    seen, out = set(), []
    for file in files:
        real = os.path.realpath(file)
        if real not in seen:
            seen.add(real)
            out.append(file)
    return out


def _expand(name: str, key: str) -> list[Path] | None:
    """Files named by a path, glob or directory; None when `name` should be a hub dataset id."""
    path = Path(name).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = _folder_files(path)
        if not files:
            raise user_error(f"the directory {name} holds no {'/'.join(SUFFIXES)} files", key, "check the path")
    elif any(ch in name for ch in "*?["):
        files = _once(sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()))
        if not files:
            raise user_error(f"no file matches the pattern {name}", key, "check the pattern")
    elif _HUB_ID.match(name) and not name.startswith((".", "/", "~")) and Path(name).suffix.lower() not in SUFFIXES:
        return None
    else:
        raise user_error(f"data file not found: {name}", key,
                         "check the path (relative to the directory you run instructkit from)")
    for file in files:
        if file.suffix.lower() not in SUFFIXES:
            raise user_error(f"unsupported data file type '{file.suffix}' ({file})", key,
                             f"use one of {', '.join(SUFFIXES)}")
    return files


def resolve_source(name: str, split: str, key: str) -> Resolved:
    """Find the files (hashing their contents) or load the hub dataset (from its cache when offline)."""
    files = _expand(name, key)
    if files is not None:
        hashes, hints = {}, []
        for file in files:
            hashes[str(file)], lines = hash_and_count(file)
            hints.append(_rows_hint(file, lines))
        digest = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()
        hint = None if None in hints else sum(hints)  # type: ignore[arg-type]
        return Resolved(name, files, None, digest, "train", hashes, hint)
    try:
        import datasets

        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for "not found / offline"
        raise user_error(f"'{name}' is not a local file and loading it as a hub dataset failed "
                         f"({type(exc).__name__}: {str(exc)[:200]})", key,
                         "check the path, or make the dataset available in the local Hugging Face cache") from exc
    fingerprint = f"hub:{name}:{split}:{dataset._fingerprint}"
    return Resolved(name, [], dataset, fingerprint, split, {f"{name}[{split}]": fingerprint}, len(dataset))


def _decode(raw: bytes) -> tuple[str | None, str]:
    """(text, "") or (None, why the bytes are not UTF-8)."""
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError as exc:
        return None, f"byte 0x{raw[exc.start]:02x} at column {exc.start + 1} is not UTF-8"


def _iter_jsonl(path: Path) -> Iterator[Record | BadRow]:
    """One line at a time, so memory does not grow with the file."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            line, error = _decode(raw[:-1] if raw.endswith(b"\n") else raw)
            if line is None:
                yield BadRow(where, "not UTF-8", error)
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield BadRow(where, "invalid JSON", f"{exc.msg} at column {exc.colno}")
                continue
            if not isinstance(row, dict):
                yield BadRow(where, "not an object", f"a JSON {type(row).__name__} where an object was expected")
                continue
            yield Record(row, where)


def _not_utf8(path: Path, data: bytes, exc: UnicodeDecodeError) -> UserError:
    """The first line that is not UTF-8, found once decoding failed (the bytes are read only on that path)."""
    line_start = data.rfind(b"\n", 0, exc.start) + 1
    number = data.count(b"\n", 0, exc.start) + 1
    return user_error(f"byte 0x{data[exc.start]:02x} at column {exc.start - line_start + 1} is not UTF-8",
                      f"{path}:{number}", "re-encode the file as UTF-8")


def _iter_json(path: Path) -> Iterator[Record | BadRow]:
    data = path.read_bytes()  # a JSON list is parsed whole; read once (JSON Lines streams)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, data, exc) from None
    del data
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise user_error(f"not valid JSON ({exc.msg} at column {exc.colno})", f"{path}:{exc.lineno}",
                         "fix the JSON there, or write one object per line as .jsonl") from exc
    if not isinstance(rows, list):
        raise user_error("a .json data file must hold a list of objects", str(path),
                         "wrap the rows in [ ... ] or use JSON Lines")
    for index, row in enumerate(rows):
        if isinstance(row, dict):
            yield Record(row, f"{path}#{index}")
        else:
            yield BadRow(f"{path}#{index}", "not an object", f"a {type(row).__name__}, not an object")


def _iter_csv(path: Path) -> Iterator[Record | BadRow]:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            for row in reader:
                yield Record({k: v for k, v in row.items() if k is not None}, f"{path}:{reader.line_num}")
        except UnicodeDecodeError as exc:
            data = path.read_bytes()
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as found:
                raise _not_utf8(path, data, found) from None
            raise user_error(f"not UTF-8 ({exc})", str(path), "re-encode the file as UTF-8") from None


def _iter_parquet(path: Path) -> Iterator[Record | BadRow]:
    import pyarrow.parquet as pq

    index = 0
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=4096)  # row groups in slices, never the whole file
        for batch in batches:
            for row in batch.to_pylist():
                yield Record(row, f"{path}#{index}")
                index += 1
    except (OSError, ValueError) as exc:  # pyarrow's errors for a broken file (ArrowException subclasses these)
        raise user_error(f"cannot read the Parquet file ({exc})", str(path), "check the file") from exc


READERS = {".jsonl": _iter_jsonl, ".json": _iter_json, ".csv": _iter_csv, ".parquet": _iter_parquet}


def iter_resolved(resolved: Resolved, source: int = 0) -> Iterator[Record | BadRow]:
    """Rows of one resolved source, streamed, tagged with its index; unreadable rows as `BadRow`s in place."""
    if resolved.dataset is not None:
        for i, row in enumerate(resolved.dataset):
            yield Record(dict(row), f"{resolved.name}[{resolved.split}]#{i}", source)
        return
    for file in resolved.files:
        for item in READERS[file.suffix.lower()](file):
            yield item if isinstance(item, BadRow) else Record(item.data, item.where, source)


def read_resolved(resolved: Resolved, source: int = 0) -> tuple[list[Record], list[BadRow]]:
    """All rows of one resolved source, tagged with its index (for callers that want lists)."""
    records, bad = [], []
    for item in iter_resolved(resolved, source):
        (bad if isinstance(item, BadRow) else records).append(item)
    return records, bad


def apply_weight(records: list[Record], weight: float, seed: int) -> list[Record]:
    """round(weight x n) rows: a seeded sample below 1 (kept in file order), whole repeats above 1."""
    if weight == 1.0 or not records:
        return records
    target = max(1, round(weight * len(records)))
    whole, rest = divmod(target, len(records))
    picked = sorted(random.Random(seed).sample(range(len(records)), rest))
    return records * whole + [records[i] for i in picked]


def read_records(paths: list[str], key: str = "data.train_file") -> list[Record]:
    """Rows of plain paths; the first unreadable row is an error. For callers outside the pipeline."""
    records, bad = [], []
    for name in paths:
        got, wrong = read_resolved(resolve_source(name, "train", key))
        records, bad = records + got, bad + wrong
    if bad:
        raise user_error(f"{bad[0].reason}: {bad[0].detail}", bad[0].where, "fix or remove that row")
    if not records:
        raise user_error(f"no rows in {', '.join(paths)}", key, "point it at a file with data rows")
    return records
