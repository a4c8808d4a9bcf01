"""Child processes of the studio: only `python -m instructkit SUBCOMMAND ...`, each in its own session.

Its own session (and so its own process group) means a Ctrl-C in the studio's terminal, or the studio
stopping, never reaches a run: runs go on and the studio, started again, finds them in their directories.
Stop sends SIGINT to the run's process group, exactly what Ctrl-C in a terminal does to a job.

Jobs (evaluate + report, merge, GGUF export) are a few such commands in a row; each job keeps its state
in RUN/studio/KIND.json and its output in RUN/studio/KIND.log, so a restarted studio still shows them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from instructkit.files import write_json
from instructkit.rundir import pid_alive as process_exists

# Subcommands the studio may start; anything else is a programming error, never a request's choice.
ALLOWED = ("train", "validate", "eval", "report", "merge", "export-gguf")
_children: list[subprocess.Popen] = []
_lock = threading.Lock()


def command(subcommand: str, *args: str) -> list[str]:
    if subcommand not in ALLOWED:
        raise ValueError(f"the studio does not start `instructkit {subcommand}`")
    return [sys.executable, "-m", "instructkit", subcommand, *args]


def child_env() -> dict:
    # Unbuffered, so the log shows each line as it is printed (the page tails it).
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def spawn(argv: list[str], log_path: Path, append: bool = True) -> subprocess.Popen:
    """Start a child in its own session, output to log_path; remembered so it is reaped when it ends."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a" if append else "w", encoding="utf-8") as log:
        log.write(f"$ instructkit {' '.join(argv[3:])}\n")
        log.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=child_env(), start_new_session=True)
    with _lock:
        _children.append(proc)
    return proc


def alive_children() -> list[subprocess.Popen]:
    """The children still running (finished ones are reaped here, so none lingers as a zombie)."""
    with _lock:
        _children[:] = [p for p in _children if p.poll() is None]
        return list(_children)


def pid_alive(pid: int | None) -> bool:
    """rundir.pid_alive, after reaping our own children (a finished child is a zombie until reaped)."""
    if not process_exists(pid):
        return False
    alive_children()  # reap it if it is our child that just ended
    return process_exists(pid)


def interrupt(pid: int) -> None:
    """SIGINT to the process group of `pid`, as Ctrl-C in its terminal would; only the process itself
    when it shares the studio's group (a group signal would stop the studio too)."""
    try:
        group = os.getpgid(pid)
        if group == os.getpgrp():
            os.kill(pid, signal.SIGINT)
        else:
            os.killpg(group, signal.SIGINT)
    except ProcessLookupError:
        pass


def job_paths(run_dir: Path, kind: str) -> tuple[Path, Path]:
    return run_dir / "studio" / f"{kind}.json", run_dir / "studio" / f"{kind}.log"


def read_job(run_dir: Path, kind: str) -> dict | None:
    """A job's state; a job marked running whose process is gone (the studio stopped meanwhile) says so."""
    state_path, log_path = job_paths(run_dir, kind)
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError):
        return None
    # lost only when the studio that runs its steps is gone too: between two steps, and between the last
    # step's exit and the state saying so, the step's process is already gone while the job still runs
    if state.get("status") == "running" and not pid_alive(state.get("runner")) and not pid_alive(state.get("pid")):
        state["status"] = "lost"
        state["note"] = "its process ended while the studio was not watching; run it again"
    state["log"] = tail(log_path, 40)
    state["elapsed_s"] = round((state.get("ended") or time.time()) - state["started"], 1)
    return state


def start_job(run_dir: Path, kind: str, steps: list[tuple[str, list[str]]], result: str | None) -> dict:
    """Run `steps` ([(title, argv)]) one after the other in a thread; refuses while one of `kind` runs."""
    current = read_job(run_dir, kind)
    if current and current["status"] == "running":
        from instructkit.studio.security import StudioError

        raise StudioError(409, f"a {kind} job of this run is still running (step {current['step']} of "
                               f"{len(current['steps'])}). Fix: wait for it to end.")
    state_path, log_path = job_paths(run_dir, kind)
    state = {"kind": kind, "status": "running", "steps": [t for t, _ in steps], "step": 0, "pid": None,
             "runner": os.getpid(),
             "started": time.time(), "ended": None, "returncode": None, "result": result,
             "commands": ["instructkit " + " ".join(a[3:]) for _, a in steps]}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    write_json(state_path, state)
    threading.Thread(target=_run_steps, args=(state_path, log_path, state, steps), daemon=True).start()
    return state


def _run_steps(state_path: Path, log_path: Path, state: dict, steps: list[tuple[str, list[str]]]) -> None:
    for number, (_, argv) in enumerate(steps, 1):
        proc = spawn(argv, log_path)
        state.update(step=number, pid=proc.pid)
        write_json(state_path, state)
        code = proc.wait()
        if code != 0:
            state.update(status="failed", returncode=code, ended=time.time())
            write_json(state_path, state)
            return
    state.update(status="completed", returncode=0, ended=time.time())
    write_json(state_path, state)


def tail(path: Path, lines: int = 60) -> list[str]:
    """The last lines of a log (progress-bar redraws split on carriage returns, the last one kept)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - 64 * 1024))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [line.rsplit("\r", 1)[-1] for line in text.splitlines()[-lines:]]
