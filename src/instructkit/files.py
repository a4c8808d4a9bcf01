"""Writing files and directories so that a reader never sees half of one: write beside, then rename.

Every place that produces a result a later step or another process reads (the manifest, a checkpoint,
`final/`, the tokenized cache, a merged model, a GGUF file, the converted builtin model) goes through
`atomic_path`, so a crash, a full disk or Ctrl-C leaves either the old result or the new one (a file is
replaced in one rename; a directory in two, with the old one moved aside and deleted afterwards).
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def remove(path: Path) -> None:
    """Delete a file or a directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(target: Path, tmp_name: str | None = None, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path to write (a file or a directory); when the block succeeds it is
    renamed onto `target`, when it fails it is removed and `target` is untouched.

    `tmp_name`: a fixed name (several processes writing one result together need the same one); by
    default it is per process, so concurrent writers never share one. `keep_existing`: when `target`
    appeared meanwhile (another process finished first), keep it and drop ours."""
    target = Path(target)
    tmp = target.with_name(tmp_name or f".{target.name}.tmp-{os.getpid()}")
    remove(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
    except BaseException:
        remove(tmp)
        raise
    if target.exists() and keep_existing:
        remove(tmp)
        return
    if target.is_dir() and not target.is_symlink():
        # rename cannot replace a non-empty directory: move the old one aside first (two renames, so
        # the target is missing only between them, never half-written), then delete it
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        remove(old)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.replace(tmp, target)


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (indented; values JSON cannot hold are written as strings)."""
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")
