"""`instructkit sweep` without training: --param parsing, the default spaces, the checks that exit 2 before
any trial, trial configs, trial counting and staleness, and the leaderboard written from a fake study."""

import json
import os
import socket
import time
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from instructkit.config import load_config
from instructkit.errors import UserError
from instructkit.sweep import log_tail, read_new
from instructkit.sweep_board import best_row, board_markdown, board_rows, write_board
from instructkit.sweep_params import (
    Param,
    default_space,
    derived,
    has_eval_data,
    parse_param,
    parse_space,
    trial_config,
    validate_space,
)
from instructkit.sweep_study import SweepPlan, check_same_sweep, is_stale, missing, write_best_config

optuna.logging.set_verbosity(optuna.logging.WARNING)


def base_config(**sections) -> dict:
    """A resolved config (as the sweep stores it), without touching any file."""
    raw = {"run_name": "exp", "model": {"name_or_path": "some/model", "precision": "fp32"}, "method": "lora",
           "lora": {"r": 4, "alpha": 8}, "data": {"train_file": "train.jsonl", "val_size": 0.1},
           "train": {"max_steps": -1, "learning_rate": 1e-3, "num_train_epochs": 2}}
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    from instructkit.config import RunConfig

    return RunConfig.model_validate(raw).model_dump(mode="json")


@pytest.mark.parametrize("text, expected", [
    ("train.learning_rate=1e-4..1e-2:log", Param("train.learning_rate", "float", 1e-4, 1e-2, log=True)),
    ("lora.r=4..64:log", Param("lora.r", "int", 4, 64, log=True)),
    ("train.num_train_epochs=1..4", Param("train.num_train_epochs", "int", 1, 4)),
    ("train.num_train_epochs=1..2.5", Param("train.num_train_epochs", "float", 1, 2.5)),
    ("train.warmup_ratio=0..0.1", Param("train.warmup_ratio", "float", 0, 0.1)),
    ("lora.r=8,16,32", Param("lora.r", "categorical", choices=(8, 16, 32))),
    ("train.learning_rate=1e-4, 3e-4", Param("train.learning_rate", "categorical", choices=(1e-4, 3e-4))),
    ("model.precision=fp32,bf16", Param("model.precision", "categorical", choices=("fp32", "bf16"))),
    ("lora.use_dora=true,false", Param("lora.use_dora", "categorical", choices=(True, False))),
    ("train.eval_steps=null,5", Param("train.eval_steps", "categorical", choices=(None, 5))),
])
def test_param_forms(text, expected):
    assert parse_param(text) == expected


@pytest.mark.parametrize("text, needle", [
    ("train.lr=1..2", "'train.lr' is not a config key (train has no 'lr')"),
    ("lr=1..2", "'lr' is not a config key (the top level has no 'lr')"),
    ("lora=1..2", "'lora' is a section, not a value"),
    ("lora.r.x=1..2", "'lora.r' is a value, not a section"),
    ("output_dir=a,b", "the sweep sets output_dir itself"),
    ("lora.r=8..8", "the range is empty (8..8)"),
    ("lora.r=16..8", "the range is reversed (16..8)"),
    ("train.learning_rate=0..1e-2:log", "a log range needs bounds above 0 (got 0)"),
    ("train.learning_rate=-1e-3..1e-2:log", "a log range needs bounds above 0"),
    ("train.learning_rate", "is not of the form KEY=RANGE or KEY=CHOICES"),
    ("=1..2", "is not of the form"),
    ("lora.r=", "is not of the form"),
    ("train.learning_rate=a..1", "'a' is not a number"),
    ("train.learning_rate=1e-4..", "'' is not a number"),
    ("train.learning_rate=1e-4..1e-2:lin", "unknown suffix ':lin'"),
    ("lora.r=8,,16", "an empty choice"),
    ("lora.r=8", "at least two different values"),
    ("lora.r=8,8", "at least two different values"),
    ("lora.r=8,16:log", "':log' applies to a range"),
    ("lora.target_modules=[q_proj],[v_proj]", "single values"),
])
def test_bad_params_are_user_errors_that_say_what_and_how(text, needle):
    with pytest.raises(UserError) as info:
        parse_param(text)
    assert needle in str(info.value)
    assert "Fix:" in str(info.value)


def test_a_key_searched_twice_is_refused():
    with pytest.raises(UserError, match="given twice"):
        parse_space(["lora.r=8,16", "lora.r=4..8"])


def test_default_spaces_per_method():
    lora = default_space(base_config())
    assert [(p.key, p.kind, p.log) for p in lora] == [("train.learning_rate", "float", True),
                                                       ("lora.r", "categorical", False),
                                                       ("train.num_train_epochs", "int", False)]
    assert (lora[0].low, lora[0].high, lora[1].choices) == (1e-4, 3e-3, (8, 16, 32))
    full = default_space(base_config(method="full"))
    assert [p.key for p in full] == ["train.learning_rate", "train.num_train_epochs"]
    assert (full[0].low, full[0].high) == (5e-6, 2e-4)
    # max_steps fixes the run's length, so searching epochs would change nothing
    assert [p.key for p in default_space(base_config(train={"max_steps": 50}))] == ["train.learning_rate", "lora.r"]


def test_alpha_follows_a_searched_rank_unless_searched_itself():
    space = default_space(base_config())
    assert derived({"lora.r": 16}, space, "lora") == {"lora.alpha": 32}
    with_alpha = [*space, parse_param("lora.alpha=8,64")]
    assert derived({"lora.r": 16, "lora.alpha": 8}, with_alpha, "lora") == {}
    assert derived({"train.learning_rate": 1e-4}, [space[0]], "lora") == {}


def test_trial_config_sets_values_and_the_trial_directory_without_touching_the_base():
    base = base_config()
    data = trial_config(base, {"train.learning_rate": 1e-5, "lora.r": 16, "lora.alpha": 32}, "sw/trial-003",
                        "exp-trial-003")
    assert data["train"]["learning_rate"] == 1e-5 and isinstance(data["train"]["learning_rate"], float)
    assert (data["lora"]["r"], data["lora"]["alpha"]) == (16, 32)
    assert (data["output_dir"], data["run_name"], data["train"]["resume"]) == ("sw/trial-003", "exp-trial-003", "auto")
    assert base["train"]["learning_rate"] == 1e-3 and base["output_dir"] == "runs/exp"


def test_both_ends_and_every_choice_are_validated_before_the_sweep():
    base = base_config()
    validate_space(base, default_space(base))
    with pytest.raises(UserError) as info:
        validate_space(base, [parse_param("lora.dropout=0.5..1.5")])
    assert "high ends of --param" in str(info.value) and "lora.dropout" in str(info.value)
    with pytest.raises(UserError) as info:
        validate_space(base, [parse_param("model.precision=fp32,fp8,bf16")])
    assert "--param model.precision=fp8" in str(info.value)
    with pytest.raises(UserError, match="low ends"):
        validate_space(base, [parse_param("train.per_device_train_batch_size=0..4")])


@pytest.mark.parametrize("data, expected", [({"eval_file": "e.jsonl", "val_size": 0}, True),
                                            ({"val_size": 0.1}, True), ({"val_size": 20}, True),
                                            ({"val_size": "auto"}, True), ({"val_size": 0.0}, False),
                                            ({"eval_file": None, "val_size": 0}, False)])
def test_eval_data_is_an_eval_file_or_a_split(data, expected):
    assert has_eval_data({"data": data}) is expected


def _frozen(number, state, value=None, params=None, evals=None, **attrs):
    start = datetime(2025, 1, 1, 12, 0, 0)
    params = params or {"train.learning_rate": 1e-3, "lora.r": 8}
    dists = {"train.learning_rate": FloatDistribution(1e-4, 1e-2, log=True),
             "lora.r": CategoricalDistribution([8, 16, 32])}
    trial = create_trial(state=state, value=value, params=params, distributions=dists, user_attrs=attrs,
                         intermediate_values=evals or {})
    trial.number = number
    trial.datetime_start = start
    trial.datetime_complete = start + timedelta(seconds=30) if state.is_finished() else None
    return trial


def fake_trials():
    return [
        _frozen(0, TrialState.COMPLETE, 1.5, evals={2: 1.7, 4: 1.5}, run_dir="sw/trial-000", wall_s=31.0),
        _frozen(1, TrialState.PRUNED, None, {"train.learning_rate": 1e-2, "lora.r": 32}, {2: 2.4, 4: 2.2},
                run_dir="sw/trial-001"),
        _frozen(2, TrialState.FAIL, None, run_dir="sw/trial-002", failed_run=True,
                note="exit code 2: error: model not found", log_tail=["loading", "error: model not found"]),
        _frozen(3, TrialState.COMPLETE, 1.2, {"train.learning_rate": 3e-3, "lora.r": 16}, {2: 1.2},
                run_dir="sw/trial-003"),
        _frozen(4, TrialState.FAIL, None, evals={2: 1.9}, run_dir="sw/trial-004", interrupted=True),
        _frozen(5, TrialState.RUNNING, None, run_dir="sw/trial-004", retry_of=4),
    ]


def test_leaderboard_ranks_complete_trials_then_pruned_running_failed():
    rows = board_rows(fake_trials(), now=datetime(2025, 1, 1, 12, 1, 0))
    assert [(r["rank"], r["trial"], r["state"]) for r in rows] == [
        (1, 3, "COMPLETE"), (2, 0, "COMPLETE"), (None, 1, "PRUNED"), (None, 5, "RUNNING"), (None, 4, "FAIL"),
        (None, 2, "FAIL")]  # within a state, by eval loss so far (trial 2 has none)
    by = {r["trial"]: r for r in rows}
    assert by[1]["eval_loss"] == 2.2 and by[1]["note"] == "pruned at step 4 (eval loss 2.2000)"
    assert by[2]["note"] == "exit code 2: error: model not found" and by[2]["log_tail"][-1] == "error: model not found"
    assert by[4]["note"] == "interrupted; retried as trial 5" and by[5]["note"] == "retries trial 4"
    assert (by[0]["wall_s"], by[3]["wall_s"], by[5]["wall_s"]) == (31.0, 30.0, 60.0)
    assert best_row(rows)["trial"] == 3


def test_leaderboard_files_and_table(tmp_path):
    rows = board_rows(fake_trials())
    write_board(tmp_path, rows, {"study": "exp", "trials_wanted": 6})
    md = (tmp_path / "leaderboard.md").read_text()
    assert "Best: trial 3, eval loss 1.2000, run sw/trial-003" in md
    assert "| rank | trial | state | eval loss | train.learning_rate | lora.r | wall s | run | note |" in md
    assert "| 1 | 3 | complete | 1.2000 | 0.003 | 16 | 30 | trial-003 |  |" in md
    board = json.loads((tmp_path / "leaderboard.json").read_text())
    assert board["study"] == "exp" and board["best"]["trial"] == 3 and len(board["trials"]) == 6
    assert not list(tmp_path.glob(".*tmp*"))  # written beside, then renamed
    short = board_markdown(rows, "top:", limit=2)
    assert short.count("complete") == 2 and "(4 more rows in leaderboard.md)" in short


def test_missing_counts_finished_running_and_failed_runs_but_not_interrupted_ones():
    study = optuna.create_study()
    for trial in fake_trials():
        study.add_trial(trial)
    # counted: 2 complete, 1 pruned, 1 failed run, 1 running; not: trial 4 (interrupted, its retry runs)
    assert missing(study, 8) == 3
    assert missing(study, 5) == 0


def _plan(tmp_path, space, base=None) -> SweepPlan:
    return SweepPlan(base or base_config(), space, tmp_path, "sqlite://", "exp", 4, 1, [], False)


def test_a_resumed_study_must_search_the_same_space_from_the_same_config(tmp_path):
    study = optuna.create_study()
    space = default_space(base_config())
    check_same_sweep(study, _plan(tmp_path, space))
    check_same_sweep(study, _plan(tmp_path, space))  # the same: resumes
    check_same_sweep(study, _plan(tmp_path, space, base_config(train={"logging_steps": 1})))  # neutral key
    with pytest.raises(UserError, match="give the same --param flags"):
        check_same_sweep(study, _plan(tmp_path, space[:1]))
    with pytest.raises(UserError, match="train.weight_decay: 0.0 -> 0.1"):
        check_same_sweep(study, _plan(tmp_path, space, base_config(train={"weight_decay": 0.1})))


def test_best_yaml_is_the_base_config_with_the_best_values_and_loads(tmp_path):
    base = base_config()
    study = optuna.create_study()
    check_same_sweep(study, _plan(tmp_path, default_space(base)))
    study.add_trial(_frozen(0, TrialState.COMPLETE, 1.1, {"train.learning_rate": 3e-4, "lora.r": 16},
                            run_dir=str(tmp_path / "trial-000"),
                            overrides={"train.learning_rate": 3e-4, "lora.r": 16, "lora.alpha": 32}))
    best = best_row(board_rows(study.get_trials()))
    path = write_best_config(study, _plan(tmp_path, default_space(base)), best)
    assert path.read_text().startswith("# best trial 0 of sweep 'exp': eval loss 1.1000")
    cfg = load_config(path)
    assert (cfg.train.learning_rate, cfg.lora.r, cfg.lora.alpha) == (3e-4, 16, 32)
    assert (cfg.output_dir, cfg.run_name, cfg.train.resume) == ("runs/exp", "exp", "auto")
    assert yaml.safe_load(path.read_text())["data"]["val_size"] == 0.1


def test_stale_running_trials():
    host, now = socket.gethostname(), time.time()
    dead = os.getpid() + 10_000_000  # above any pid_max, so no process has it
    trial = lambda worker, beat: SimpleNamespace(user_attrs={"worker": worker, "heartbeat": beat},
                                                 datetime_start=None)
    assert is_stale(trial(f"{host}:{dead}", now), now)                       # its sweep died on this machine
    assert not is_stale(trial(f"{host}:{os.getpid()}", now), now)            # alive and beating
    assert not is_stale(trial(f"elsewhere:{dead}", now - 60), now)           # another machine, recently alive
    assert is_stale(trial(f"elsewhere:{dead}", now - 3600), now)             # another machine, silent an hour


def test_read_new_returns_whole_lines_and_starts_over_when_the_file_is_rewritten(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_new(path, 0) == ([], 0)
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 1, "eval_')
    records, offset = read_new(path, 0)
    assert records == [{"step": 1, "loss": 2.0}]
    with open(path, "a") as handle:
        handle.write('loss": 1.5}\n')
    records, offset = read_new(path, offset)
    assert records == [{"step": 1, "eval_loss": 1.5}]
    path.write_text('{"step": 1}\n')  # a resumed run rewrites the file with what it keeps
    assert read_new(path, offset) == ([{"step": 1}], len('{"step": 1}\n'))


def test_log_tail_splits_progress_bar_redraws(tmp_path):
    path = tmp_path / "train.log"
    path.write_text("a\nshards 0%\rshards 100%\n\nerror: boom\n")
    assert log_tail(path, 2) == ["shards 100%", "error: boom"]
    assert log_tail(tmp_path / "absent.log") == []


def test_default_sweep_dir_and_study_name_come_from_run_name(tmp_path, monkeypatch):
    from instructkit import sweep_study

    monkeypatch.setattr(sweep_study, "visible_gpus", list)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"run_name": "exp", "model": {"name_or_path": "m"},
                                      "data": {"train_file": "t.jsonl", "val_size": 0.1}}))
    plan = sweep_study.plan_sweep(str(config), [], 3, [])
    assert (plan.sweep_dir, plan.study_name, plan.jobs) == (Path("sweeps/exp"), "exp", 1)
    assert plan.storage == f"sqlite:///{Path('sweeps/exp/study.db').resolve()}"
    monkeypatch.setattr(sweep_study, "visible_gpus", lambda: ["2", "5"])
    assert sweep_study.plan_sweep(str(config), [], 3, []).jobs == 2  # one trial per visible GPU


class FakeChild:
    """A running child process that records the signals it is sent."""

    def __init__(self):
        self.signals = []

    def poll(self):
        return None

    def send_signal(self, signum):
        self.signals.append(signum)


def _watched_trial(tmp_path, losses: list[float]):
    """A new trial beside two completed ones (eval loss 1.0 at steps 1 and 2), watched once after its run
    logged `losses` at steps 1, 2, ..."""
    import signal

    from instructkit.sweep import TrialRun, watch
    from instructkit.sweep_study import make_pruner

    study = optuna.create_study(pruner=make_pruner())
    for number in range(2):
        study.add_trial(_frozen(number, TrialState.COMPLETE, 1.0, evals={1: 1.0, 2: 1.0}))
    run_dir = tmp_path / "trial-002"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "eval_loss": loss}) + "\n"
                                                   for i, loss in enumerate(losses)))
    child = FakeChild()
    run = TrialRun(study.ask(), run_dir, 0, child, None)
    assert watch(run, study) is False  # still running
    return run, child.signals, signal.SIGINT


def test_a_trial_worse_than_the_median_is_pruned_from_its_second_eval_loss(tmp_path):
    run, signals, sigint = _watched_trial(tmp_path, [3.0])
    assert run.evals == {1: 3.0} and not run.pruned and signals == []  # one point says little: never pruned
    run, signals, sigint = _watched_trial(tmp_path / "b", [3.0, 2.5])
    assert run.pruned and signals == [sigint]  # the child is asked to checkpoint and stop
    run, signals, _ = _watched_trial(tmp_path / "c", [1.0, 0.5])
    assert not run.pruned and signals == []
