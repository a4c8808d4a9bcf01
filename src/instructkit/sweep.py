"""`instructkit sweep`: an Optuna study over ordinary runs, ranked and pruned on the metric the runs choose
their best weights by (train.best_metric; see sweep_metric.py).

Each trial is a run directory (SWEEP_DIR/trial-NNN) trained by a child process of the normal CLI, so a
trial behaves exactly like `instructkit train` (resume, lock, checkpoints, exit codes) and a crash in
one trial cannot take the sweep down. The sweep watches the trial's metrics.jsonl, reports each
evaluation's metric to Optuna and, when Optuna says prune, sends the child SIGINT (it checkpoints and
exits 130).
The study lives in a database (SWEEP_DIR/study.db by default), so the same command resumes a sweep,
and several machines can share one study through --storage.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from instructkit.errors import TrainingInterrupted, UserError, user_error
from instructkit.metrics import read_metrics
from instructkit.rundir import MARKER, RunDirPlan, claim_run_dir, read_manifest, write_config
from instructkit.sweep_board import best_row, board_markdown, cell
from instructkit.sweep_metric import StudyMetric, best_eval, eval_fields, metric_value, objective, stored_metric
from instructkit.sweep_params import Param, derived, trial_config, validate
from instructkit.sweep_study import (
    AS_GIVEN,
    PRUNE_FROM_EVAL,
    REPORTS,
    SweepPlan,
    describe,
    fail_stale,
    missing,
    open_study,
    refresh_board,
    retry,
    say,
    worker_id,
)

POLL_S = 0.5              # how often running trials are looked at
HEARTBEAT_S = 60          # how often a running trial says it is alive in the study
STOP_GRACE_S = 600        # a stopped child that has not exited after this long is killed
PROGRESS_GRID = 5         # percent: evaluations are filed at the nearest multiple of it of the trial's training
BOARD_ROWS_SHOWN = 10     # rows printed after each trial (the files hold all of them)


def suggest(trial: Any, space: list[Param]) -> dict[str, Any]:
    values = {}
    for p in space:
        if p.kind == "categorical":
            values[p.key] = trial.suggest_categorical(p.key, list(p.choices))
        elif p.kind == "int":
            values[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high), log=p.log)
        else:
            values[p.key] = trial.suggest_float(p.key, float(p.low), float(p.high), log=p.log)
    return values


@dataclass
class TrialRun:
    """A trial whose child process is training."""

    trial: Any
    run_dir: Path
    slot: int
    proc: subprocess.Popen
    log: IO
    metric: StudyMetric
    started: float = field(default_factory=time.time)
    offset: int = 0
    evals: dict[int, float] = field(default_factory=dict)  # step -> the metric's natural value
    by_percent: bool = True  # Optuna is told evaluations at the percent of training done (else at the step)
    total_steps: int | None = None  # the trial's planned optimizer steps, from its manifest
    reported: set[int] = field(default_factory=set)  # keys Optuna was told
    pruned: bool = False
    interrupted: bool = False
    stopped_at: float | None = None
    beat: float = field(default_factory=time.time)

    def stop(self, signum: int = signal.SIGINT) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
            self.stopped_at = self.stopped_at or time.time()


def read_new(path: Path, offset: int) -> tuple[list[dict], int]:
    """Complete JSON lines appended since `offset` (from the start again when the file was rewritten, as a
    resumed run does)."""
    try:
        if path.stat().st_size < offset:
            offset = 0
        with open(path, "rb") as handle:
            handle.seek(offset)
            chunk = handle.read()
    except FileNotFoundError:
        return [], 0
    complete = chunk[:chunk.rfind(b"\n") + 1]
    records = []
    for line in complete.decode("utf-8", "replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records, offset + len(complete)


def log_tail(path: Path, lines: int = 20) -> list[str]:
    """The last lines of a trial's log (progress-bar redraws split off)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [line for line in text.replace("\r", "\n").splitlines() if line.strip()][-lines:]


def prepare_run_dir(run_dir: Path, cfg: Any) -> None:
    """The trial's directory, marked as a run, with its config.yaml (what the child trains)."""
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / MARKER).is_file():
        raise user_error(f"{run_dir} exists and is not an instructkit run, so the sweep leaves it untouched",
                         fix="move it away, or give another --sweep-dir")
    claim_run_dir(RunDirPlan(run_dir, "new"))
    write_config(run_dir, cfg)


def tell_best(study: Any, trial: Any, run_dir: Path, metric: str | None) -> dict | None:
    """Tell Optuna the value of the trial's evaluation whose weights its final/ holds (what the sweep hands
    back), as the study minimises it; keep that evaluation's other values (its eval loss beside an accuracy
    breaks ties on the leaderboard). None: no evaluation had the metric."""
    best = best_eval(read_metrics(run_dir), metric, read_manifest(run_dir)) if metric else None
    if best is None:
        return None
    trial.set_user_attr("best_eval", eval_fields(best))
    study.tell(trial, objective(metric, metric_value(best, metric)))
    return best


def _completed(run_dir: Path) -> bool:
    return read_manifest(run_dir).get("status") == "completed"


def child_env(plan: SweepPlan, slot: int) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if plan.gpus:  # one trial per GPU (round robin when --jobs exceeds the GPUs)
        env["CUDA_VISIBLE_DEVICES"] = plan.gpus[slot % len(plan.gpus)]
    elif plan.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:  # CPU trials share the cores, not fight for them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // plan.jobs))
    return env


def fail(study: Any, trial: Any, note: str, tail: list[str] | None = None) -> None:
    """FAIL a trial whose own run failed (it counts towards --trials, so a broken setting cannot loop)."""
    from optuna.trial import TrialState

    trial.set_user_attr("failed_run", True)
    trial.set_user_attr("note", note)
    if tail:
        trial.set_user_attr("log_tail", tail)
    study.tell(trial, state=TrialState.FAIL)
    say(f"trial {trial.number}: failed: {note}")


def start_trial(study: Any, plan: SweepPlan, slot: int, metric: StudyMetric) -> TrialRun | None:
    """Ask Optuna for values, write the trial's run directory and config, start its child."""
    trial = study.ask()
    values = {} if trial.user_attrs.get(AS_GIVEN) else suggest(trial, plan.space)
    overrides = {**values, **derived(values, plan.space, plan.base["method"])}
    # Every trial selects its final/ weights by the metric the sweep ranks it by; while that is still
    # `auto`, the trial resolves it (watch() reads what it chose).
    known = metric.known()
    fixed = {"train.best_metric": known} if known else {}
    retry_dir = trial.user_attrs.get("run_dir")
    if retry_dir and not Path(retry_dir).parent.is_dir():  # a trial of a worker whose sweep dir is not shared
        retry_dir = str(plan.sweep_dir / Path(retry_dir).name)
    run_dir = Path(retry_dir) if retry_dir else plan.sweep_dir / f"trial-{trial.number:03d}"
    for key, value in {"run_dir": str(run_dir), "overrides": overrides, "worker": worker_id(),
                       "heartbeat": time.time()}.items():
        trial.set_user_attr(key, value)
    if retry_dir and _completed(run_dir) and tell_best(study, trial, run_dir, metric.adopt(run_dir)):
        trial.set_user_attr("note", "finished before its sweep stopped; counted without training again")
        return None  # it finished before its sweep stopped
    try:
        cfg = validate(trial_config(plan.base, {**overrides, **fixed}, str(run_dir),
                                    f"{plan.base['run_name']}-{run_dir.name}"), f"trial {trial.number}")
        prepare_run_dir(run_dir, cfg)
    except UserError as exc:
        fail(study, trial, str(exc))
        return None
    log = open(run_dir / "train.log", "a" if retry_dir else "w", encoding="utf-8")  # noqa: SIM115 - the child writes it
    # A fresh trial replaces whatever an earlier study left under its number; a retry resumes its checkpoint.
    command = [sys.executable, "-m", "instructkit", "train", str(run_dir / "config.yaml"),
               *([] if retry_dir else ["--overwrite"])]
    # Its own session: a Ctrl-C in the terminal reaches only the sweep, which passes it on exactly once.
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            env=child_env(plan, slot), start_new_session=True)
    shown = ", ".join(f"{k}={cell(v)}" for k, v in overrides.items()) or "the config as given"
    say(f"trial {trial.number}: {'resuming' if retry_dir else 'training'} in {run_dir} ({shown})")
    return TrialRun(trial, run_dir, slot, proc, log, metric, by_percent=study.user_attrs.get(REPORTS) == "percent")


def watch(run: TrialRun, study: Any) -> bool:
    """Report new evaluations, prune or keep alive; True once the child has exited and the trial is told."""
    code = run.proc.poll()
    known = run.metric.known()
    metric = known or run.metric.adopt(run.run_dir)
    if metric and not known:
        say(f"trial {run.trial.number}: the sweep ranks by {metric}, what train.best_metric: auto resolved to; "
            "later trials select their final/ weights by it too")
    if metric:  # the child writes config.yaml (resolved) before its first evaluation, so none is skipped
        report_evals(run, metric, code is None)
    now = time.time()
    if now - run.beat > HEARTBEAT_S:
        run.trial.set_user_attr("heartbeat", now)
        run.beat = now
    if code is None:
        if run.stopped_at and now - run.stopped_at > STOP_GRACE_S:
            run.proc.kill()
        return False
    finish(run, study, code)
    return True


def report_key(run: TrialRun, step: int) -> int | None:
    """Where Optuna files an evaluation, and so what the pruner compares it with: the percent of its own
    training the trial had done, to the nearest PROGRESS_GRID percent (the pruner compares only equal keys, and
    trials whose steps per epoch differ evaluate at slightly different percents). Trials of 1 and 3 epochs are
    compared at the same point of their schedules; at the same step a longer schedule still has its learning
    rate high and would be pruned for that (on the development suite both 3-epoch trials were, at step 30).
    Studies begun before this rule file by step. None while this trial's own manifest (its planned steps) is
    not written yet."""
    if not run.by_percent:
        return step
    if run.total_steps is None:
        run.total_steps = planned_steps(run.run_dir, run.started)
    if run.total_steps is None:
        return None
    return PROGRESS_GRID * round(100 * step / run.total_steps / PROGRESS_GRID)


def planned_steps(run_dir: Path, since: float) -> int | None:
    """The run's planned optimizer steps, from a manifest written since `since` (the child writes it before
    its first evaluation; one left by an earlier run in the directory is not this trial's)."""
    try:
        if (run_dir / "manifest.json").stat().st_mtime < since - 1.0:  # file times lag the clock by up to a tick
            return None
    except OSError:
        return None
    total = read_manifest(run_dir).get("total_steps")
    return total if isinstance(total, int) and total > 0 else None


def report_evals(run: TrialRun, metric: str, running: bool) -> None:
    """Report the metric of evaluations logged since the last look (as Optuna is told it: the study minimises)
    and ask the pruner, from the trial's PRUNE_FROM_EVAL-th evaluation on. Nothing after a prune: the pruned
    value stays the trial's last."""
    if run.pruned or report_key(run, 0) is None:
        return  # until the trial's manifest says how long it trains, its records (maybe an old run's) wait
    records, run.offset = read_new(run.run_dir / "metrics.jsonl", run.offset)
    for record in records:
        value, step = metric_value(record, metric), record.get("step")
        if value is None or not isinstance(step, int) or step in run.evals:
            continue
        run.evals[step] = value
        say(f"trial {run.trial.number}: step {step} {metric} {value:.4f}")
        key = report_key(run, step)
        if key in run.reported:  # a second evaluation at the same point of training: Optuna keeps the first
            continue
        run.reported.add(key)
        run.trial.report(objective(metric, value), key)
        if (len(run.evals) >= PRUNE_FROM_EVAL and running and not run.interrupted
                and run.trial.should_prune()):
            run.pruned = True
            run.trial.set_user_attr("pruned_at", step)
            say(f"trial {run.trial.number}: pruned at step {step} (worse than the median): stopping it")
            run.stop()
            return


def finish(run: TrialRun, study: Any, code: int) -> None:
    """Tell Optuna how the trial ended: its best value of the metric, pruned, interrupted (queued again) or
    failed."""
    from optuna.trial import TrialState

    run.log.close()
    trial = run.trial
    trial.set_user_attr("wall_s", round(time.time() - run.started, 1))
    metric = run.metric.adopt(run.run_dir) if code == 0 else run.metric.known()
    best = tell_best(study, trial, run.run_dir, metric) if code == 0 else None
    if best is not None:
        say(f"trial {trial.number}: complete, {metric} {metric_value(best, metric):.4f} (step {best['step']})")
    elif code == 0:
        fail(study, trial, f"the run logged no {metric or 'evaluation'} (data.val_size: auto holds none out of "
             "small data): set data.eval_file or a numeric data.val_size")
    elif run.pruned:
        study.tell(trial, state=TrialState.PRUNED)
    elif run.interrupted:
        trial.set_user_attr("interrupted", True)
        study.tell(trial, state=TrialState.FAIL)
        retry(study, trial, str(run.run_dir))
        say(f"trial {trial.number}: interrupted (exit {code}); the next `instructkit sweep` resumes it")
    else:
        tail = log_tail(run.run_dir / "train.log")
        fail(study, trial, f"exit code {code}: {tail[-1] if tail else 'no output'}", tail)


@contextmanager
def forwarded_signals() -> Iterator[list[int]]:
    """SIGINT/SIGTERM/SIGHUP to the sweep are recorded, not raised: the loop then starts no new trial and passes
    each signal on to the running trials (the first makes them checkpoint and stop, a second stops them
    at once, as with `train`)."""
    received: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        # SIGHUP too: the trials run in their own sessions, so a closed terminal would not stop them
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, lambda signum, _frame: received.append(signum))
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_sweep(plan: SweepPlan) -> dict | None:
    """Run the missing trials, --jobs at a time; returns the best leaderboard row (None: nothing completed).
    A signal stops the running trials gracefully and raises TrainingInterrupted (exit 130)."""
    study = open_study(plan)
    fail_stale(study)
    say(describe(plan, study))
    refresh_board(study, plan)
    metric = StudyMetric(study, stored_metric(study.user_attrs))
    active: list[TrialRun] = []
    with forwarded_signals() as signals:
        try:
            shown = run_trials(study, plan, active, signals, metric)
        finally:
            for run in active:  # an internal error: let the children checkpoint; their trials stay RUNNING
                run.stop()
                run.proc.wait()
    rows = refresh_board(study, plan)
    if signals:
        say(f"sweep stopped by {signal.Signals(signals[0]).name}; run the same command to continue")
        raise TrainingInterrupted(signals[0], None)
    if shown < len(rows):  # the last table printed was cut short, or no trial ran this time
        say(board_markdown(rows, "leaderboard:", stored_metric(study.user_attrs)))
    return best_row(rows)


def run_trials(study: Any, plan: SweepPlan, active: list[TrialRun], signals: list[int], metric: StudyMetric) -> int:
    """The loop: pass on signals, start trials while slots and missing trials remain, watch the running ones,
    print the leaderboard after each; returns how many rows the last printed table showed. While the metric
    is still `auto`, one trial runs at a time: the others then select their weights by what it resolved."""
    forwarded, shown = 0, 0
    while True:
        for signum in signals[forwarded:]:
            for run in active:  # train checkpoints on SIGINT and SIGTERM; SIGHUP would kill it outright
                run.interrupted = True
                run.stop(signal.SIGTERM if signum == signal.SIGHUP else signum)
        forwarded = len(signals)
        while (not signals and len(active) < plan.jobs and missing(study, plan.trials) > 0
               and not (active and metric.known() is None)):
            started = start_trial(study, plan, min(set(range(plan.jobs + 1)) - {r.slot for r in active}), metric)
            if started is None:  # told already (failed to set up, or finished before)
                refresh_board(study, plan)
            else:
                active.append(started)
        if not active:
            return shown
        for run in [r for r in active if watch(r, study)]:
            active.remove(run)
            rows = refresh_board(study, plan)
            say(board_markdown(rows, "leaderboard:", stored_metric(study.user_attrs), BOARD_ROWS_SHOWN))
            shown = min(len(rows), BOARD_ROWS_SHOWN)
        time.sleep(POLL_S)
