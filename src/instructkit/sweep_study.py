"""The study behind `instructkit sweep`: the checked plan, the Optuna study (created or resumed, seeded,
pruned), trials a dead sweep left running, how many trials are still to start, and the leaderboard
files with best.yaml, rewritten from the study after every trial.
"""

from __future__ import annotations

import os
import socket
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from instructkit.config import load_config
from instructkit.errors import user_error
from instructkit.files import write_text
from instructkit.rundir import RESULT_NEUTRAL, config_differences, pid_alive
from instructkit.sweep_board import best_row, best_text, board_rows, write_board
from instructkit.sweep_metric import AUTO, direction, requested_metric, settle_metric, stored_metric
from instructkit.sweep_params import (
    Param,
    default_space,
    derived,
    has_eval_data,
    parse_space,
    trial_config,
    validate_space,
)

STALE_AFTER_S = 600       # a RUNNING trial silent this long belongs to a sweep that died (another machine)
PRUNE_FROM_EVAL = 2       # never prune on a trial's first evaluation: one point says little about a run
REPORTS = "reports"       # study attribute: "percent" where evaluations are filed by progress (else by step)
AS_GIVEN = "as_given"     # a trial's user attribute: it trains the config as given (no searched values)


def say(text: str) -> None:
    print(text, flush=True)


@dataclass
class SweepPlan:
    """Everything the sweep needs, checked before any trial runs."""

    base: dict                # the resolved config the trials start from
    space: list[Param]
    sweep_dir: Path
    storage: str
    study_name: str
    trials: int
    jobs: int
    gpus: list[str]
    shared: bool              # --storage: other workers may run trials of the same study
    metric: str = AUTO        # --metric, else the config's train.best_metric; auto: the first trial resolves it


def visible_gpus() -> list[str]:
    """CUDA device ids a child may be given (honouring the sweep's own CUDA_VISIBLE_DEVICES)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:count] if count and len(listed) >= count else [str(i) for i in range(count)]


def plan_sweep(config: str, overrides: list[str], trials: int, params: list[str], sweep_dir: str | None = None,
               storage: str | None = None, study_name: str | None = None, jobs: int | None = None,
               metric: str = AUTO) -> SweepPlan:
    """Check the whole command (config, search space, trials, jobs, eval data) without writing anything."""
    if trials < 1:
        raise user_error(f"--trials {trials}: a sweep needs at least one trial", fix="give --trials 1 or more")
    if jobs is not None and jobs < 1:
        raise user_error(f"--jobs {jobs}: at least one trial must run at a time", fix="give --jobs 1 or more")
    base = load_config(config, overrides).model_dump(mode="json")
    if not has_eval_data(base):
        raise user_error("the sweep ranks and prunes trials by an eval metric, and the config has no eval data", config,
                         "set data.eval_file: FILE, or data.val_size (a fraction such as 0.1, a row count, or auto)")
    space = parse_space(params) if params else default_space(base)
    validate_space(base, space)
    folder = Path(sweep_dir) if sweep_dir else Path("sweeps") / base["run_name"]
    gpus = visible_gpus()
    return SweepPlan(base, space, folder, storage or f"sqlite:///{(folder / 'study.db').resolve()}",
                     study_name or base["run_name"], trials, jobs or max(len(gpus), 1), gpus, storage is not None,
                     requested_metric(metric, base))


def shown_url(url: str) -> str:
    """The storage URL without its password (it is printed and written to leaderboard.json)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot parse is reported by open_study
        return url


def make_pruner() -> Any:
    """The median rule: stop a trial whose best reported value (eval loss, or 1 - accuracy: lower is better
    either way) is worse than the median of the complete trials at the same point of training, where at
    least two of them were evaluated there (the median of one trial is that trial's value, and on a small
    split one value is noise: a 3-epoch trial was pruned against a single 2-epoch value at 60%; a function,
    so tests can force a prune)."""
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0, n_min_trials=2)


def open_study(plan: SweepPlan) -> Any:
    """Create or load the study (load_if_exists: the same command resumes), refusing to mix sweeps."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if not plan.shared:  # the default study.db lives in it; with --storage it is made once the study opened
        plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    engine = {"connect_args": {"timeout": 60}} if plan.storage.startswith("sqlite") else {}  # wait on a busy file
    try:
        storage = optuna.storages.RDBStorage(plan.storage, engine_kwargs=engine)
        study = optuna.create_study(storage=storage, study_name=plan.study_name, direction="minimize",
                                    load_if_exists=True, pruner=make_pruner())
    except Exception as exc:
        raise user_error(f"cannot open the study storage {shown_url(plan.storage)} ({type(exc).__name__}: {exc})",
                         "--storage", "give an Optuna database URL, e.g. sqlite:///path/study.db or "
                         "postgresql://user@host/db (with its driver installed)") from exc
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    # Seeded from the config, offset by the trials so far: a resumed sweep does not draw its first
    # trials' values again. Workers sharing a study also mix in who they are, or they would draw alike.
    seed = plan.base["seed"] + len(study.trials) + (zlib.crc32(worker_id().encode()) % 10_000 if plan.shared else 0)
    study.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(3, plan.trials // 5)))
    check_same_sweep(study, plan)
    return study


def check_same_sweep(study: Any, plan: SweepPlan) -> None:
    """A resumed study must search the same space from the same config, and rank by the same metric, or its
    leaderboard would mix trials that cannot be compared. A new study stores all three."""
    space = {p.key: p.describe() for p in plan.space}
    if "space" not in study.user_attrs:
        # before `space`, which marks a study as started (another worker may look at any moment)
        study.set_user_attr(REPORTS, "percent")  # evaluations filed at the percent of training done
        settle_metric(study, plan.metric, plan.study_name)
        study.set_user_attr("space", space)
        study.set_user_attr("base_config", plan.base)
        if not study.trials:  # the config as given is the point to beat: it trains first, its values unchanged
            study.enqueue_trial({}, user_attrs={AS_GIVEN: True})
        return
    if study.user_attrs["space"] != space:
        raise user_error(f"study '{plan.study_name}' searches {study.user_attrs['space']}, this command {space}",
                         "--param", "give the same --param flags to resume it, or a new --sweep-dir/--study-name")
    diffs = [d for d in config_differences(study.user_attrs["base_config"], plan.base)
             if d.split(":", 1)[0] not in RESULT_NEUTRAL]
    if diffs:
        raise user_error(f"study '{plan.study_name}' was started from a config that gives different results; "
                         f"differences: {'; '.join(diffs[:8])}", "CONFIG",
                         "resume it with the same config and overrides, or give a new --sweep-dir/--study-name")
    settle_metric(study, plan.metric, plan.study_name)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def is_stale(trial: Any, now: float, host: str | None = None) -> bool:
    """A RUNNING trial whose sweep is gone: its process is dead on this machine, or it has been silent for
    longer than STALE_AFTER_S (a worker on another machine)."""
    worker_host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
    if worker_host == (host or socket.gethostname()) and pid.isdigit() and not pid_alive(int(pid)):
        return True
    beat = trial.user_attrs.get("heartbeat") or (trial.datetime_start.timestamp() if trial.datetime_start else 0)
    return now - beat > STALE_AFTER_S


def retry(study: Any, trial: Any, run_dir: str | None) -> None:
    """Queue the same values again; the retry trains in the same run directory, resuming its last checkpoint."""
    attrs = {"retry_of": trial.number, **({"run_dir": run_dir} if run_dir else {}),
             **({AS_GIVEN: True} if trial.user_attrs.get(AS_GIVEN) else {})}
    study.enqueue_trial(trial.params, user_attrs=attrs)


def fail_stale(study: Any) -> None:
    """Trials left RUNNING by a sweep that was killed: FAIL, and queued again."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_stale(t, time.time()):
            continue
        try:
            study.tell(t.number, state=TrialState.FAIL)
        except (ValueError, RuntimeError):  # another worker failed it first
            continue
        if t.params or t.user_attrs.get(AS_GIVEN):
            retry(study, t, t.user_attrs.get("run_dir"))
        say(f"trial {t.number} was left running by a sweep that stopped: marked failed and queued again")


def missing(study: Any, wanted: int) -> int:
    """Trials still to start: --trials is the total. Complete, pruned, running and failed ones count, but not
    a trial that was only interrupted (its retry takes its place)."""
    from optuna.trial import TrialState

    counted = [t for t in study.get_trials(deepcopy=False)
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
               or (t.state == TrialState.FAIL and t.user_attrs.get("failed_run"))]
    return wanted - len(counted)


def describe(plan: SweepPlan, study: Any) -> str:
    todo = max(missing(study, plan.trials), 0)
    lines = [f"sweep '{plan.study_name}' in {plan.sweep_dir} (study: {shown_url(plan.storage)}): "
             f"{plan.trials - todo} of {plan.trials} trials done or running, {todo} to start, "
             f"{plan.jobs} at a time" + (f" on GPUs {','.join(plan.gpus)}" if plan.gpus else " on CPU"),
             "trial 0 trains the config as given (the point to beat); the others search:"]
    lines += [f"  {p.key}: {p.describe()}" for p in plan.space]
    for key in derived({p.key: p.ends()[0] for p in plan.space}, plan.space, plan.base["method"]):
        lines.append(f"  {key}: follows the searched values (2 x lora.r)")
    lines.append(f"{objective_text(stored_metric(study.user_attrs))}; pruning: median rule once 2 trials "
                 f"completed, from a trial's eval #{PRUNE_FROM_EVAL}")
    return "\n".join(lines)


def objective_text(metric: str) -> str:
    if metric == AUTO:
        return ("objective: the metric train.best_metric: auto resolves to in the first trial (every later trial "
                "selects its weights by it too)")
    told = "" if metric == "eval_loss" else f"; Optuna minimises 1 - {metric}"
    return f"objective: best {metric} of each trial ({direction(metric)}{told}), the one its final/ weights hold"


def write_best_config(study: Any, plan: SweepPlan, best: dict) -> Path:
    """best.yaml: the config the sweep started from with the best trial's values, trained by `train`
    into the config's own output_dir (the trial's directory already holds the finished trial)."""
    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == best["trial"])
    base = study.user_attrs.get("base_config", plan.base)
    data = trial_config(base, trial.user_attrs.get("overrides", trial.params), base["output_dir"], base["run_name"])
    data["train"]["resume"] = base["train"]["resume"]
    data["train"]["best_metric"] = best.get("metric", data["train"].get("best_metric"))  # what chose the trial
    header = (f"# best trial {best['trial']} of sweep '{plan.study_name}': {best_text(best)}, "
              f"run {best['run_dir']}\n# train it (e.g. on more data, longer): instructkit train "
              f"{plan.sweep_dir / 'best.yaml'}\n")
    write_text(plan.sweep_dir / "best.yaml", header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return plan.sweep_dir / "best.yaml"


def refresh_board(study: Any, plan: SweepPlan) -> list[dict]:
    """leaderboard.md/.json and best.yaml from the study as it is now (other workers' trials included)."""
    metric = stored_metric(study.user_attrs)
    rows = board_rows(study.get_trials(deepcopy=False), metric)
    summary = {"study": plan.study_name, "storage": shown_url(plan.storage), "sweep_dir": str(plan.sweep_dir),
               "trials_wanted": plan.trials, "space": {p.key: p.describe() for p in plan.space}, "metric": metric,
               "direction": None if metric == AUTO else direction(metric),
               "objective": objective_text(metric).removeprefix("objective: ")}
    write_board(plan.sweep_dir, rows, summary)
    if best_row(rows):
        write_best_config(study, plan, best_row(rows))
    return rows
