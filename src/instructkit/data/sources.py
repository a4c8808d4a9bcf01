"""Read records from JSON / JSON Lines files, each with its provenance (file:line) for error messages."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from instructkit.errors import user_error

SUFFIXES = (".jsonl", ".json")


@dataclass(frozen=True)
class Record:
    """One row as read, and where it came from (`file:line` or `file#index`)."""

    data: dict
    where: str


def _decode_lines(path: Path) -> list[str]:
    lines = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise user_error(f"bytes that are not UTF-8 at column {exc.start + 1}", f"{path}:{number}",
                             "re-encode the file as UTF-8") from exc
    return lines


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    for number, line in enumerate(_decode_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise user_error(f"not valid JSON ({exc.msg} at column {exc.colno})", f"{path}:{number}",
                             "each line of a .jsonl file must be one complete JSON object") from exc
        if not isinstance(row, dict):
            raise user_error(f"a JSON {type(row).__name__} where an object was expected", f"{path}:{number}",
                             "each line must be an object such as {\"instruction\": ..., \"output\": ...}")
        records.append(Record(row, f"{path}:{number}"))
    return records


def _read_json(path: Path) -> list[Record]:
    text = "\n".join(_decode_lines(path))
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise user_error(f"not valid JSON ({exc.msg} at column {exc.colno})", f"{path}:{exc.lineno}",
                         "fix the JSON there, or write one object per line as .jsonl") from exc
    if not isinstance(rows, list):
        raise user_error("a .json data file must hold a list of objects", str(path),
                         "wrap the rows in [ ... ] or use JSON Lines")
    records = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise user_error(f"item {index} is a {type(row).__name__}, not an object", f"{path}#{index}",
                             "every item of the list must be an object")
        records.append(Record(row, f"{path}#{index}"))
    return records


def check_paths(paths: list[str], key: str) -> list[Path]:
    """The data files as paths; UserError naming the config key when one is missing or of an unknown kind."""
    result = []
    for name in paths:
        path = Path(name).expanduser()
        if not path.is_file():
            raise user_error(f"data file not found: {name}", key,
                             "check the path (relative to the directory you run instructkit from)")
        if path.suffix.lower() not in SUFFIXES:
            raise user_error(f"unsupported data file type '{path.suffix}' ({name})", key,
                             f"use one of {', '.join(SUFFIXES)}")
        result.append(path)
    return result


def read_records(paths: list[str], key: str = "data.train_file") -> list[Record]:
    """All rows of the given files, in order; an empty result is an error."""
    records: list[Record] = []
    for path in check_paths(paths, key):
        records += _read_jsonl(path) if path.suffix.lower() == ".jsonl" else _read_json(path)
    if not records:
        raise user_error(f"no rows in {', '.join(paths)}", key, "point it at a file with data rows")
    return records


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
