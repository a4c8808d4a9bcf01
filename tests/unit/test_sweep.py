"""`instructkit sweep` without training (the search space is in test_sweep_params.py, watching trials in
test_sweep_watch.py): trial counting and staleness, the leaderboard written from a fake study, and the metric
trials are ranked and pruned by (eval loss, or an accuracy told to Optuna as 1 - accuracy)."""

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
from instructkit.sweep_metric import StudyMetric, best_eval, requested_metric, stored_metric
from instructkit.sweep_params import default_space
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
    rows = board_rows(fake_trials(), "eval_loss", now=datetime(2025, 1, 1, 12, 1, 0))
    assert [(r["rank"], r["trial"], r["state"]) for r in rows] == [
        (1, 3, "COMPLETE"), (2, 0, "COMPLETE"), (None, 1, "PRUNED"), (None, 5, "RUNNING"), (None, 4, "FAIL"),
        (None, 2, "FAIL")]  # within a state, by eval loss so far (trial 2 has none)
    by = {r["trial"]: r for r in rows}
    assert by[1]["eval_loss"] == by[1]["value"] == 2.2 and by[1]["note"] == "pruned at step 4 (eval_loss 2.2000)"
    assert by[2]["note"] == "exit code 2: error: model not found" and by[2]["log_tail"][-1] == "error: model not found"
    assert by[4]["note"] == "interrupted; retried as trial 5" and by[5]["note"] == "retries trial 4"
    assert (by[0]["wall_s"], by[3]["wall_s"], by[5]["wall_s"]) == (31.0, 30.0, 60.0)
    assert best_row(rows)["trial"] == 3


def test_leaderboard_files_and_table(tmp_path):
    rows = board_rows(fake_trials(), "eval_loss")
    write_board(tmp_path, rows, {"study": "exp", "trials_wanted": 6, "metric": "eval_loss"})
    md = (tmp_path / "leaderboard.md").read_text()
    assert "Best: trial 3, eval_loss 1.2000 (lower is better), run sw/trial-003" in md
    assert "| rank | trial | state | eval_loss (lower is better) | train.learning_rate | lora.r | wall s |" in md
    assert "| 1 | 3 | complete | 1.2000 | 0.003 | 16 | 30 | trial-003 |  |" in md
    board = json.loads((tmp_path / "leaderboard.json").read_text())
    assert board["study"] == "exp" and board["best"]["trial"] == 3 and len(board["trials"]) == 6
    assert (board["best"]["run_dir"], board["best"]["eval_loss"]) == ("sw/trial-003", 1.2)  # as bench/ reads it
    assert not list(tmp_path.glob(".*tmp*"))  # written beside, then renamed
    short = board_markdown(rows, "top:", "eval_loss", limit=2)
    assert short.count("complete") == 2 and "(4 more rows in leaderboard.md)" in short


def test_missing_counts_finished_running_and_failed_runs_but_not_interrupted_ones():
    study = optuna.create_study()
    for trial in fake_trials():
        study.add_trial(trial)
    # counted: 2 complete, 1 pruned, 1 failed run, 1 running; not: trial 4 (interrupted, its retry runs)
    assert missing(study, 8) == 3
    assert missing(study, 5) == 0


def _plan(tmp_path, space, base=None, metric="eval_loss") -> SweepPlan:
    return SweepPlan(base or base_config(), space, tmp_path, "sqlite://", "exp", 4, 1, [], False, metric)


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
    best = best_row(board_rows(study.get_trials(), "eval_loss"))
    path = write_best_config(study, _plan(tmp_path, default_space(base)), best)
    # trial 0 is the config as given, queued when the study started (still waiting here)
    assert path.read_text().startswith("# best trial 1 of sweep 'exp': eval_loss 1.1000 (lower is better)")
    cfg = load_config(path)
    assert (cfg.train.learning_rate, cfg.lora.r, cfg.lora.alpha) == (3e-4, 16, 32)
    assert cfg.train.best_metric == "eval_loss"  # the metric that chose the trial, though the base says auto
    assert (cfg.output_dir, cfg.run_name, cfg.train.resume) == ("runs/exp", "exp", "auto")
    assert yaml.safe_load(path.read_text())["data"]["val_size"] == 0.1


def test_stale_running_trials():
    host, now = socket.gethostname(), time.time()
    dead = os.getpid() + 10_000_000  # above any pid_max, so no process has it

    def trial(worker, beat):
        return SimpleNamespace(user_attrs={"worker": worker, "heartbeat": beat}, datetime_start=None)

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


def test_best_eval_keeps_the_earliest_of_equals_like_the_run():
    records = [{"step": 1, "eval_loss": 1.0}, {"step": 2, "loss": 0.3}, {"step": 3, "eval_loss": 0.8},
               {"step": 4, "eval_loss": 0.8}, {"step": 5, "eval_loss": float("nan")}]
    assert best_eval(records, "eval_loss")["step"] == 3
    assert best_eval(records, "eval_accuracy") is None


def _em_trial(number, em, loss, evals=None, state=TrialState.COMPLETE):
    """A trial of an exact-match study as Optuna holds it: told 1 - exact match."""
    return _frozen(number, state, None if state != TrialState.COMPLETE else 1 - em,
                   evals=evals, run_dir=f"sw/trial-{number:03d}",
                   best_eval={"step": 4, "eval_exact_match": em, "eval_loss": loss})


def test_an_exact_match_leaderboard_ranks_the_higher_exact_match_first(tmp_path):
    trials = [_em_trial(0, 0.32, 0.90), _em_trial(1, 0.52, 1.10), _em_trial(2, 0.395, 1.00),
              _frozen(3, TrialState.PRUNED, None, evals={2: 0.9, 4: 0.8}, run_dir="sw/trial-003")]
    rows = board_rows(trials, "eval_exact_match")
    assert [(r["rank"], r["trial"]) for r in rows] == [(1, 1), (2, 2), (3, 0), (None, 3)]
    tied = board_rows([*trials, _em_trial(4, 0.52, 1.05)], "eval_exact_match")
    assert [r["trial"] for r in tied][:2] == [4, 1]  # equal exact match: the lower eval loss ranks first
    nan = [_em_trial(5, 0.52, float("nan")), *trials, _em_trial(4, 0.52, 1.05)]
    assert [r["trial"] for r in board_rows(nan, "eval_exact_match")][:3] == [4, 1, 5]  # a NaN loss ranks last
    by = {r["trial"]: r for r in rows}
    assert (by[1]["metric"], by[1]["value"], by[1]["eval_loss"]) == ("eval_exact_match", pytest.approx(0.52), 1.10)
    assert by[3]["value"] == pytest.approx(0.2) and by[3]["eval_loss"] is None
    assert by[3]["note"] == "pruned at step 4 (eval_exact_match 0.2000)"
    write_board(tmp_path, rows, {"study": "exp", "metric": "eval_exact_match"})
    md = (tmp_path / "leaderboard.md").read_text()
    assert "Best: trial 1, eval_exact_match 0.5200 (higher is better), run sw/trial-001" in md
    assert "| rank | trial | state | eval_exact_match (higher is better) | eval loss |" in md
    assert "| 1 | 1 | complete | 0.5200 | 1.1000 |" in md
    best = json.loads((tmp_path / "leaderboard.json").read_text())["best"]
    assert (best["run_dir"], best["value"], best["eval_loss"]) == ("sw/trial-001", pytest.approx(0.52), 1.10)


def test_the_metric_is_the_flag_else_the_config_and_is_stored_in_the_study(tmp_path):
    assert requested_metric("auto", base_config(train={"best_metric": "eval_accuracy"})) == "eval_accuracy"
    assert requested_metric("eval_loss", base_config(train={"best_metric": "eval_accuracy"})) == "eval_loss"
    assert requested_metric("auto", base_config()) == "auto"
    space = default_space(base_config())
    study = optuna.create_study()
    check_same_sweep(study, _plan(tmp_path, space, metric="eval_exact_match"))
    assert study.user_attrs["metric"] == "eval_exact_match"
    check_same_sweep(study, _plan(tmp_path, space, metric="auto"))  # auto resumes with the stored one
    check_same_sweep(study, _plan(tmp_path, space, metric="eval_exact_match"))
    with pytest.raises(UserError) as info:
        check_same_sweep(study, _plan(tmp_path, space, metric="eval_loss"))
    assert "ranks its trials by eval_exact_match, this command by eval_loss" in str(info.value)
    assert "--metric eval_exact_match" in str(info.value)
    assert study.user_attrs["metric"] == "eval_exact_match"


def test_a_pending_auto_metric_is_fixed_by_the_first_trial_or_an_explicit_flag(tmp_path):
    space = default_space(base_config())
    study = optuna.create_study()
    check_same_sweep(study, _plan(tmp_path, space, metric="auto"))
    assert stored_metric(study.user_attrs) == "auto"
    metric = StudyMetric(study, "auto")
    run_dir = tmp_path / "trial-000"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"train": {"best_metric": "auto"}}))  # the sweep's copy
    assert metric.adopt(run_dir) is None and metric.known() is None
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"train": {"best_metric": "eval_exact_match"}}))
    assert metric.adopt(run_dir) == "eval_exact_match" == study.user_attrs["metric"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"train": {"best_metric": "eval_loss"}}))
    assert metric.adopt(run_dir) == "eval_exact_match"  # fixed for the study: a later trial changes nothing
    assert StudyMetric(study, "auto").known() == "eval_exact_match"  # another worker reads it from the study

    pending = optuna.create_study()
    check_same_sweep(pending, _plan(tmp_path, space, metric="auto"))
    check_same_sweep(pending, _plan(tmp_path, space, metric="eval_accuracy"))
    assert pending.user_attrs["metric"] == "eval_accuracy"
    legacy = optuna.create_study()  # a study from before the metric: it ranked by eval loss
    legacy.set_user_attr("space", {p.key: p.describe() for p in space})
    legacy.set_user_attr("base_config", base_config())
    assert stored_metric(legacy.user_attrs) == "eval_loss"
    with pytest.raises(UserError, match="ranks its trials by eval_loss"):
        check_same_sweep(legacy, _plan(tmp_path, space, metric="eval_exact_match"))


def test_a_new_study_first_trains_the_config_as_given_and_a_retry_keeps_it_so(tmp_path):
    from instructkit.sweep_study import AS_GIVEN, retry

    study = optuna.create_study()
    check_same_sweep(study, _plan(tmp_path, default_space(base_config())))
    check_same_sweep(study, _plan(tmp_path, default_space(base_config())))  # resumed: not queued twice
    (first,) = study.get_trials()
    assert (first.state, first.params, first.user_attrs) == (TrialState.WAITING, {}, {AS_GIVEN: True})
    trial = study.ask()
    assert trial.number == 0 and trial.user_attrs[AS_GIVEN] and trial.params == {}
    retry(study, trial, str(tmp_path / "trial-000"))
    assert study.get_trials()[-1].user_attrs == {AS_GIVEN: True, "retry_of": 0, "run_dir": str(tmp_path / "trial-000")}
    rows = board_rows(study.get_trials(), "eval_loss")
    assert [r["note"] for r in rows if r["trial"] == 1] == ["the config as given; retries trial 0"]
