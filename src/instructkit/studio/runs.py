"""Runs as the studio sees them: everything comes from the run directory.

Status is the manifest's (running, completed, interrupted, failed), checked against the directory's lock:
a training process holds it for the whole run, so "running" without the lock means the process died
without a word (killed), and the lock without a manifest means it is still starting. Runs started from a
terminal look exactly like runs started here.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
from pathlib import Path

import yaml

from instructkit.files import remove
from instructkit.rundir import LOCK, MARKER, RUN_ENTRIES, read_manifest
from instructkit.studio.children import alive_children, command, interrupt, spawn, tail
from instructkit.studio.security import MAX_DEPTH, StudioError

LOG = "train.log"  # what the studio's train children print (the sweep writes the same name)
STUDIO_ENTRIES = (LOG, "studio", "export")  # created in a run by the studio; removed with it on Delete
X_KEYS = ("step", "epoch")  # axes, not curves


def is_run(path: Path) -> bool:
    """An instructkit run directory: its marker, or a manifest (runs from before the marker)."""
    return path.is_dir() and ((path / MARKER).is_file() or (path / "manifest.json").is_file())


def list_runs(root: Path) -> list[str]:
    """Names (relative to root) of the runs under it, newest first; symlinks are not followed."""
    found, stack = [], [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            children = [p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()
                        and not p.name.startswith(".")]
        except OSError:
            continue
        for child in children:
            if is_run(child):
                found.append(child)
            elif depth + 1 < MAX_DEPTH:
                stack.append((child, depth + 1))
    found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [p.relative_to(root).as_posix() for p in found]


def lock_holder(run_dir: Path) -> int | None:
    """The pid holding the run's lock (the training process), asked of the kernel without taking it."""
    path = run_dir / LOCK
    if not path.is_file():
        return None
    fmt = "hhqqi4x"  # struct flock on Linux: type, whence, start, len, pid
    try:
        with open(path, "r+") as handle:
            answer = fcntl.fcntl(handle, fcntl.F_GETLK, struct.pack(fmt, fcntl.F_WRLCK, 0, 0, 0, 0))
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            return None
        raise
    kind, _, _, _, pid = struct.unpack(fmt, answer)
    return pid if kind != fcntl.F_UNLCK and pid > 0 else None


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl as training writes it: a line caught half-written is left for the next poll."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def read_config(run_dir: Path) -> dict:
    try:
        return yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _child_training(run_dir: Path):
    """This studio's child that trains run_dir (it may not have taken the lock yet), or None."""
    target = (run_dir / "config.yaml").resolve()
    return next((p for p in alive_children() if p.args[3:4] == ["train"] and Path(p.args[4]).resolve() == target),
                None)


def status_of(run_dir: Path, manifest: dict) -> str:
    status = manifest.get("status")
    if lock_holder(run_dir):
        return "running" if status == "running" else "starting"
    if _child_training(run_dir):
        return "starting"
    if status == "running":
        return "killed"  # the manifest was never closed: the process died (kill -9, power, OOM)
    return status or ("failed" if (run_dir / LOG).is_file() else "new")


def eta_seconds(records: list[dict], step: int, total: int | None) -> float | None:
    """Seconds left at the pace of the last logging windows (each record says how long its window took)."""
    train = [r for r in records if "elapsed_s" in r and "step" in r]
    if not total or len(train) < 2 or step >= total:
        return None
    recent = train[-5:]
    steps = recent[-1]["step"] - train[-len(recent) - 1]["step"] if len(train) > len(recent) else recent[-1]["step"]
    seconds = sum(r["elapsed_s"] for r in recent)
    return round((total - step) * seconds / max(steps, 1), 1)


def summary(root: Path, name: str) -> dict:
    """One run for the list and the run page."""
    run_dir = root / name
    manifest, config = read_manifest(run_dir), read_config(run_dir)
    records = read_metrics(run_dir)
    status = status_of(run_dir, manifest)
    steps = [r["step"] for r in records if "loss" in r]
    step = steps[-1] if steps else 0
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    return {"name": name, "status": status, "step": step, "total_steps": manifest.get("total_steps"),
            "loss": losses[-1] if losses else None, "eval_loss": evals[-1] if evals else None,
            "eta_s": eta_seconds(records, step, manifest.get("total_steps")) if status == "running" else None,
            "model": (config.get("model") or {}).get("name_or_path"), "method": config.get("method"),
            "start_time": manifest.get("start_time"), "end_time": manifest.get("end_time"),
            "has_final": (run_dir / "final").is_dir(), "has_report": (run_dir / "report/report.html").is_file(),
            "has_eval": (run_dir / "eval/eval.json").is_file(),
            "can_stop": status in ("running", "starting"),
            "can_resume": status in ("interrupted", "failed", "killed", "new"),
            "can_delete": status not in ("running", "starting")}


def metrics_since(run_dir: Path, have: int, last_step: int | None) -> dict:
    """Records the page lacks: those after its first `have`, or all of them when the file was rewritten
    (a resumed run drops what it logged after its checkpoint)."""
    records = read_metrics(run_dir)
    same = have <= len(records) and (have == 0 or records[have - 1].get("step") == last_step)
    return {"reset": not same, "records": records[have:] if same else records}


def numeric_keys(records: list[dict]) -> list[str]:
    """Every numeric key in metrics.jsonl but the axes: the charts follow whatever training logs."""
    keys = dict.fromkeys(k for r in records for k, v in r.items()
                         if k not in X_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool))
    return list(keys)


def log_tail(run_dir: Path, lines: int = 60) -> list[str]:
    return tail(run_dir / LOG, lines)


def train_argv(run_dir: Path) -> list[str]:
    """`instructkit train RUN/config.yaml`: the command that starts a run and, run again, resumes it.
    A run started elsewhere may name its output_dir relative to another directory: then it is given."""
    argv = command("train", str(run_dir / "config.yaml"))
    output_dir = read_config(run_dir).get("output_dir")
    if not output_dir or Path(output_dir).resolve() != run_dir.resolve():
        argv.append(f"output_dir={run_dir}")
    return argv


def start_training(run_dir: Path) -> None:
    spawn(train_argv(run_dir), run_dir / LOG)


def stop(run_dir: Path, name: str) -> None:
    """Ctrl-C for the run: the training process checkpoints after the current step and exits 130."""
    pid = lock_holder(run_dir)
    if pid is None:
        child = _child_training(run_dir)
        pid = child.pid if child else None
    if pid is None:
        raise StudioError(409, f"run '{name}' is not training, so there is nothing to stop")
    interrupt(pid)


def resume(run_dir: Path, name: str) -> None:
    status = status_of(run_dir, read_manifest(run_dir))
    if status in ("running", "starting", "completed"):
        raise StudioError(409, f"run '{name}' is {status}: only a stopped run resumes")
    if not (run_dir / "config.yaml").is_file():
        raise StudioError(409, f"run '{name}' has no config.yaml to train from. Fix: start a new run instead")
    start_training(run_dir)


def delete(run_dir: Path, name: str) -> list[str]:
    """Remove what runs and the studio create in the directory, then the directory if nothing else is
    left; returns what was left (files of the user's own are never deleted)."""
    if not is_run(run_dir):
        raise StudioError(400, f"'{name}' is not an instructkit run directory, so the studio does not delete it")
    status = status_of(run_dir, read_manifest(run_dir))
    if status in ("running", "starting"):
        raise StudioError(409, f"run '{name}' is {status}. Fix: stop it first")
    for entry in (*RUN_ENTRIES, *STUDIO_ENTRIES, LOCK):
        remove(run_dir / entry)
    left = sorted(p.name for p in run_dir.iterdir())
    if not left:
        os.rmdir(run_dir)
    return left
