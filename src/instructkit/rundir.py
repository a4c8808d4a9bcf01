"""The run directory: refuse to mix runs, write the resolved config and the manifest."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import yaml

from instructkit.config import RunConfig, dump_config
from instructkit.errors import user_error

RUN_MARKERS = ("config.yaml", "manifest.json")


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every leaf that differs."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_run_dir(cfg: RunConfig, overwrite: bool) -> Path:
    """Refuse an output directory that holds something else; writes nothing."""
    run_dir = Path(cfg.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise user_error(f"output_dir {run_dir} is a file", "output_dir", "choose a directory path")
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return run_dir
    if not any((run_dir / m).exists() for m in RUN_MARKERS):
        raise user_error(f"output_dir {run_dir} is not empty and holds no instructkit run", "output_dir",
                         "choose an empty or new directory (nothing there is deleted, even with --overwrite)")
    if overwrite:
        return run_dir
    old_path = run_dir / "config.yaml"
    old = yaml.safe_load(old_path.read_text()) if old_path.is_file() else {}
    diffs = config_differences(old or {}, cfg.model_dump(mode="json"))
    what = ("holds a different run; differences: " + "; ".join(diffs[:8])) if diffs else "already holds this run"
    raise user_error(f"output_dir {run_dir} {what}", "output_dir",
                     "choose another output_dir, or pass --overwrite to replace that run")


def claim_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Create the directory; with --overwrite, first remove the earlier run (checked by check_run_dir)."""
    if overwrite and run_dir.is_dir() and any((run_dir / m).exists() for m in RUN_MARKERS):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def write_json(path: Path, data: dict) -> None:
    """Write beside, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def write_config(run_dir: Path, cfg: RunConfig) -> None:
    (run_dir / "config.yaml").write_text(dump_config(cfg))


def git_commit(cwd: str | Path = ".") -> str | None:
    """The commit of the repository around `cwd` (with -dirty when changed), or None outside one."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
