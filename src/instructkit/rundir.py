"""The run directory: refuse to mix runs, own it while training, write the resolved config and the manifest.

A run directory carries a marker file (MARKER) that says it is an instructkit run: `--overwrite` and a
restart remove only the entries runs create, and never touch a directory without the marker. For the
whole run the training process holds an exclusive lock on LOCK (fcntl: the kernel releases it on any
death, kill -9 included, so a resume never needs a manual unlock); a second `train` on the same
directory is refused while the first is alive.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import yaml

from instructkit.checkpoint import find_resumable, verify_checkpoint
from instructkit.config import RunConfig, dump_config
from instructkit.errors import user_error
from instructkit.files import remove, write_text

MARKER, LOCK = ".instructkit-run", ".instructkit.lock"
# Everything a run creates in its directory; nothing else is ever removed from it.
RUN_ENTRIES = (MARKER, "config.yaml", "manifest.json", "metrics.jsonl", "tensorboard", "checkpoints", "final",
               ".final.tmp", "best", ".best.tmp", "data_report.json", "eval", "report")


def read_manifest(run_dir: Path) -> dict:
    """A run's manifest.json, or {} where there is none yet or it cannot be read."""
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def pid_alive(pid: int | None) -> bool:
    """Whether a process of this machine with that id exists (one we may not signal counts as alive)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def flatten(data: dict, prefix: str = "") -> dict:
    """Nested config sections as dotted keys: {"train": {"seed": 1}} -> {"train.seed": 1}."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every leaf that differs."""
    a, b = flatten(old), flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


# Keys that change how a run is observed or stored, not what it computes: a resumed run may change them.
RESULT_NEUTRAL = {"run_name", "output_dir", "train.logging_steps", "train.save_strategy",
                  "train.save_steps", "train.save_total_limit", "train.report_to", "train.resume",
                  "train.per_device_eval_batch_size", "train.dataloader_num_workers", "data.num_proc",
                  "data.cache", "data.eval_file", "data.on_bad_row", "data.max_bad_fraction", "eval.generate",
                  "eval.baseline", "eval.max_samples", "eval.max_new_tokens"}


@dataclass
class RunDirPlan:
    """What `train` will do with the output directory: new, restart, overwrite or resume."""

    path: Path
    action: str
    checkpoint: Path | None = None
    notes: list[str] = field(default_factory=list)


def _is_run(path: Path) -> bool:
    """An instructkit run: the marker, or a run of v0.1 (before the marker) known by its manifest's keys."""
    if (path / MARKER).is_file():
        return True
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and {"status", "versions", "start_time", "total_steps"} <= set(manifest)


def _same_result(old_config: Path, cfg: RunConfig, allow_change: bool) -> None:
    old = yaml.safe_load(old_config.read_text()) if old_config.is_file() else {}
    new = cfg.model_dump(mode="json")
    requested = flatten(new)  # an `auto` resolves on resume to what the run started with (defaults.resolve)
    diffs = [d for d in config_differences(old or {}, new)
             if (key := d.split(":", 1)[0]) not in RESULT_NEUTRAL and requested.get(key) != "auto"]
    if diffs and not allow_change:
        raise user_error(f"the run in {old_config.parent} was trained with a config that gives a different "
                         f"result; differences: {'; '.join(diffs[:8])}", "output_dir",
                         "choose another output_dir, pass --overwrite to replace that run, or "
                         "--allow-config-change to resume it anyway")


def plan_run_dir(cfg: RunConfig, overwrite: bool, allow_config_change: bool = False) -> RunDirPlan:
    """Decide, without writing anything, whether this run starts, resumes or is refused."""
    run_dir, resume = Path(cfg.output_dir), cfg.train.resume
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise user_error(f"output_dir {run_dir} cannot be written ({existing} is "
                         f"{'not a directory' if not existing.is_dir() else 'not writable'})", "output_dir",
                         "choose a directory path you can write to")
    if resume not in ("auto", False):
        checkpoint = Path(resume)
        problem = verify_checkpoint(checkpoint) if checkpoint.is_dir() else "it is not a directory"
        if problem:
            raise user_error(f"cannot resume from {checkpoint}: {problem}", "train.resume",
                             "point it at a checkpoints/step-NNNNNN directory with a COMPLETE marker")
        _same_result(checkpoint.parent.parent / "config.yaml", cfg, allow_config_change)
        if run_dir.is_dir() and any(p.name != LOCK for p in run_dir.iterdir()) \
                and run_dir.resolve() != checkpoint.parent.parent.resolve():
            raise user_error(f"output_dir {run_dir} is not empty and is not the run of {checkpoint}", "output_dir",
                             "choose a new output_dir for the resumed run")
        return RunDirPlan(run_dir, "resume", checkpoint)
    if not run_dir.is_dir() or not any(p.name != LOCK for p in run_dir.iterdir()):
        return RunDirPlan(run_dir, "new")
    if not _is_run(run_dir):
        raise user_error(f"output_dir {run_dir} is not empty and holds no instructkit run", "output_dir",
                         "choose an empty or new directory (nothing there is deleted, even with --overwrite)")
    if overwrite:
        return RunDirPlan(run_dir, "overwrite")
    if resume is False:
        raise user_error(f"output_dir {run_dir} already holds a run and train.resume is false", "output_dir",
                         "choose another output_dir, pass --overwrite to replace it, or set train.resume: auto")
    _same_result(run_dir / "config.yaml", cfg, allow_config_change)
    manifest = run_dir / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("status") == "completed":
        raise user_error(f"output_dir {run_dir} already holds this run, completed", "output_dir",
                         "choose another output_dir, or pass --overwrite to train it again")
    checkpoint, notes = find_resumable(run_dir / "checkpoints")
    if checkpoint is None:
        return RunDirPlan(run_dir, "restart", None, notes + ["no complete checkpoint to resume: starting over"])
    return RunDirPlan(run_dir, "resume", checkpoint, notes)


def claim_run_dir(plan: RunDirPlan) -> None:
    """Create the directory and mark it as a run; for overwrite or restart, first remove what the earlier
    run created (checked by plan_run_dir), and nothing else."""
    if plan.action in ("overwrite", "restart") and plan.path.is_dir() and _is_run(plan.path):
        for name in RUN_ENTRIES:
            remove(plan.path / name)
    try:
        plan.path.mkdir(parents=True, exist_ok=True)
        write_text(plan.path / MARKER, "This directory is an instructkit run; --overwrite removes only what runs "
                                       f"create: {', '.join(RUN_ENTRIES)}.\n")
    except OSError as exc:
        raise user_error(f"cannot write in output_dir {plan.path} ({exc.strerror})", "output_dir",
                         "choose a writable directory") from exc


def _lock_holder(handle) -> str:
    """'pid N' of the process holding the lock (the kernel knows it; nothing is written into the run)."""
    fmt = "hhqqi4x"  # struct flock on Linux: type, whence, start, len, pid
    try:
        pid = struct.unpack(fmt, fcntl.fcntl(handle, fcntl.F_GETLK, struct.pack(fmt, fcntl.F_WRLCK, 0, 0, 0, 0)))[4]
    except OSError:
        return "(unknown pid)"
    return f"pid {pid}" if pid > 0 else "(on another machine sharing this file system)"


@contextmanager
def lock_run_dir(run_dir: Path, owner: bool = True) -> Iterator[None]:
    """Hold the run directory's exclusive lock for the block; UserError naming the holder when another
    process has it. `owner`: only the process that writes the directory (global rank 0) locks it.
    A directory this call created and that holds nothing else when the block ends is removed again, so
    refused input leaves nothing behind."""
    if not owner:
        yield
        return
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / LOCK, "a+")
    except OSError as exc:
        raise user_error(f"cannot write in output_dir {run_dir} ({exc.strerror})", "output_dir",
                         "choose a writable directory") from exc
    try:
        try:  # a POSIX record lock: unlike flock, forked children (data loader workers) do not share it
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise user_error(f"output_dir {run_dir} is in use by the training process {_lock_holder(handle)}",
                             "output_dir",
                             "wait for that run to finish or stop it (Ctrl-C checkpoints it), or choose another "
                             "output_dir; a killed run releases the lock by itself") from None
        yield
    finally:
        handle.close()  # closing releases the lock
        if created and [p.name for p in run_dir.iterdir()] in ([LOCK], []):
            remove(run_dir / LOCK)
            run_dir.rmdir()


def previous_config(plan: RunDirPlan) -> dict | None:
    """The config.yaml of the run a resume continues (None for a new run): what its `auto`s resolved to."""
    if plan.action != "resume" or plan.checkpoint is None:
        return None
    path = plan.checkpoint.parent.parent / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def write_config(run_dir: Path, cfg: RunConfig) -> None:
    """The resolved config, which a resumed run is compared against."""
    write_text(run_dir / "config.yaml", dump_config(cfg))


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


def resume_history(run_dir: Path, plan: RunDirPlan, step: int) -> list[dict]:
    """Earlier resumes from the run's manifest, plus this one when resuming."""
    if plan.action != "resume":
        return []
    manifest = run_dir / "manifest.json"
    old = json.loads(manifest.read_text()).get("resumed", []) if manifest.is_file() else []
    return old + [{"from_checkpoint": str(plan.checkpoint), "step": step, "at": now()}]
