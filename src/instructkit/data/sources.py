"""Read records from files and hub datasets, each with its provenance (`file:line`) for error messages.

A source is a file (.jsonl .json .csv .parquet), a glob, a directory of such files, or a hub dataset
id (through `datasets`, from the local cache when offline). Rows that cannot be read (invalid JSON,
bytes that are not UTF-8) are returned as bad rows, not raised, so one report can list them all.
"""

from __future__ import annotations

import csv
import glob
import os
import hashlib
import io
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from instructkit.errors import user_error

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


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
        hashes = {str(f): sha256_file(f) for f in files}
        digest = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()
        return Resolved(name, files, None, digest, "train", hashes)
    try:
        import datasets

        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for "not found / offline"
        raise user_error(f"'{name}' is not a local file and loading it as a hub dataset failed "
                         f"({type(exc).__name__}: {str(exc)[:200]})", key,
                         "check the path, or make the dataset available in the local Hugging Face cache") from exc
    fingerprint = f"hub:{name}:{split}:{dataset._fingerprint}"
    return Resolved(name, [], dataset, fingerprint, split, {f"{name}[{split}]": fingerprint})


def _lines(path: Path) -> list[tuple[int, str | None, str]]:
    """(line number, decoded text or None, error) for each line of a file."""
    out = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            out.append((number, raw.decode("utf-8"), ""))
        except UnicodeDecodeError as exc:
            out.append((number, None, f"byte 0x{raw[exc.start]:02x} at column {exc.start + 1} is not UTF-8"))
    return out


def _read_jsonl(path: Path) -> tuple[list[Record], list[BadRow]]:
    records, bad = [], []
    for number, line, error in _lines(path):
        where = f"{path}:{number}"
        if line is None:
            bad.append(BadRow(where, "not UTF-8", error))
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.append(BadRow(where, "invalid JSON", f"{exc.msg} at column {exc.colno}"))
            continue
        if not isinstance(row, dict):
            bad.append(BadRow(where, "not an object", f"a JSON {type(row).__name__} where an object was expected"))
            continue
        records.append(Record(row, where))
    return records, bad


def _read_text(path: Path) -> str:
    for number, line, error in _lines(path):
        if line is None:
            raise user_error(error, f"{path}:{number}", "re-encode the file as UTF-8")
    return path.read_text(encoding="utf-8")


def _read_json(path: Path) -> tuple[list[Record], list[BadRow]]:
    try:
        rows = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise user_error(f"not valid JSON ({exc.msg} at column {exc.colno})", f"{path}:{exc.lineno}",
                         "fix the JSON there, or write one object per line as .jsonl") from exc
    if not isinstance(rows, list):
        raise user_error("a .json data file must hold a list of objects", str(path),
                         "wrap the rows in [ ... ] or use JSON Lines")
    records, bad = [], []
    for index, row in enumerate(rows):
        if isinstance(row, dict):
            records.append(Record(row, f"{path}#{index}"))
        else:
            bad.append(BadRow(f"{path}#{index}", "not an object", f"a {type(row).__name__}, not an object"))
    return records, bad


def _read_csv(path: Path) -> tuple[list[Record], list[BadRow]]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    records = []
    for row in reader:
        records.append(Record({k: v for k, v in row.items() if k is not None}, f"{path}:{reader.line_num}"))
    return records, []


def _read_parquet(path: Path) -> tuple[list[Record], list[BadRow]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors for a broken file vary
        raise user_error(f"cannot read the Parquet file ({exc})", str(path), "check the file") from exc
    return [Record(row, f"{path}#{i}") for i, row in enumerate(rows)], []


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def read_resolved(resolved: Resolved, source: int = 0) -> tuple[list[Record], list[BadRow]]:
    """All rows of one resolved source, tagged with its index."""
    if resolved.dataset is not None:
        return [Record(dict(row), f"{resolved.name}[{resolved.split}]#{i}", source)
                for i, row in enumerate(resolved.dataset)], []
    records, bad = [], []
    for file in resolved.files:
        got, wrong = READERS[file.suffix.lower()](file)
        records += [Record(r.data, r.where, source) for r in got]
        bad += wrong
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
