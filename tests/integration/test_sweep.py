"""`instructkit sweep` end to end on the tiny model: real trials in child processes, resume with --trials
as the total, the metric the first trial resolves fixed for the study and passed to the next trials, a
pruned trial stopped through SIGINT, Ctrl-C on the sweep and its resume, a failing trial, and bad input
that exits 2 before any trial."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from instructkit.cli import main
from instructkit.config import load_config
from instructkit.metrics import read_metrics
from tests.conftest import tree_digest

LR = "train.learning_rate=1e-3..1e-2:log"


def board(sweep: Path) -> dict[int, dict]:
    return {row["trial"]: row for row in json.loads((sweep / "leaderboard.json").read_text())["trials"]}


def manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def best_metric(run: Path) -> str:
    return yaml.safe_load((run / "config.yaml").read_text())["train"]["best_metric"]


@pytest.fixture
def sweep_config(tiny_config):
    """A tiny run with a held-out split and an evaluation at every step, trained to its last step: the tiny
    model's exact match stays flat, which would stop it early (patience 3) before a test can prune it."""
    def make(**train) -> Path:
        return tiny_config(data={"val_size": 2},
                           train={"max_steps": 6, "eval_steps": 1, "early_stopping_patience": None, **train})
    return make


class PruneTrialOne(optuna.pruners.BasePruner):
    """A pruner that stops trial 1 (at the first eval loss it is asked about), so a prune is certain."""

    def prune(self, study, trial) -> bool:
        return trial.number == 1


@pytest.mark.slow
def test_resume_runs_only_the_missing_trials_and_a_pruned_trial_stops_its_run(sweep_config, tmp_path, capsys,
                                                                              monkeypatch):
    from instructkit import sweep_study

    # 60 steps: the pruned trial must still be training when the sweep's SIGINT reaches it (with 12, the
    # tiny model sometimes finished first and the signal landed in its final save, leaving no checkpoint)
    config, sweep = sweep_config(max_steps=60), tmp_path / "sweep"
    args = ["sweep", str(config), "--sweep-dir", str(sweep), "--param", LR]
    assert main([*args, "--trials", "1"]) == 0
    out = capsys.readouterr().out
    assert f"best run directory: {sweep / 'trial-000'}" in out
    first = tree_digest(sweep / "trial-000")
    assert board(sweep)[0]["state"] == "COMPLETE"
    # train.best_metric: auto (the default): the first trial resolved it, and the study ranks by it from then on
    metric = best_metric(sweep / "trial-000")
    assert metric in ("eval_loss", "eval_exact_match") and f"the sweep ranks by {metric}" in out
    leaderboard = json.loads((sweep / "leaderboard.json").read_text())
    assert (leaderboard["metric"], leaderboard["best"]["metric"]) == (metric, metric)
    assert leaderboard["best"]["value"] is not None and leaderboard["best"]["eval_loss"] is not None
    study = optuna.load_study(study_name=leaderboard["study"], storage=f"sqlite:///{sweep / 'study.db'}")
    assert study.user_attrs["metric"] == metric  # what a resumed sweep and other workers rank by

    monkeypatch.setattr(sweep_study, "make_pruner", PruneTrialOne)
    assert main([*args, "--trials", "2"]) == 0
    out = capsys.readouterr().out
    assert "1 of 2 trials done or running, 1 to start" in out and "trial 1: pruned at step 2" in out
    rows = board(sweep)
    assert sorted(rows) == [0, 1]  # one new trial; the finished one was kept as it was
    assert tree_digest(sweep / "trial-000") == first
    assert (rows[0]["rank"], rows[1]["state"]) == (1, "PRUNED")
    pruned = sweep / "trial-001"
    assert best_metric(pruned) == metric  # passed to the trial: it selects its weights by what it is ranked by
    assert manifest(pruned)["status"] == "interrupted"  # stopped gracefully: checkpointed, exit 130
    assert list((pruned / "checkpoints").iterdir())
    assert max(r["step"] for r in read_metrics(pruned)) < 60  # stopped before its last step
    best = load_config(sweep / "best.yaml")  # loadable by train: trial 0 trained the config as given
    assert rows[0]["params"] == {} and rows[0]["note"] == "the config as given"
    assert best.train.learning_rate == load_config(config).train.learning_rate
    assert best.train.best_metric == metric
    assert best.output_dir == str(tmp_path / "run")
    md = (sweep / "leaderboard.md").read_text()
    assert "| 1 | 0 | complete |" in md and "| - | 1 | pruned |" in md

    assert main([*args, "--trials", "2"]) == 0  # nothing missing: no trial runs
    assert "0 to start" in capsys.readouterr().out and sorted(board(sweep)) == [0, 1]
    assert main(["report", str(sweep)]) == 0
    report = (sweep / "report/report.md").read_text()
    assert "| trials | 2 (1 complete, 1 pruned); --trials 2 |" in report and (sweep / f"report/{metric}.png").is_file()
    assert f"| ranked by | {metric} (" in report


@pytest.mark.slow
def test_ctrl_c_stops_the_trial_gracefully_and_the_same_command_resumes_it(sweep_config, tmp_path, capsys):
    # 200 steps: the signal, passed on by the sweep, must reach the trial while it trains (30 finished first once)
    config, sweep = sweep_config(max_steps=200, eval_steps=100, logging_steps=1), tmp_path / "sweep"
    args = ["sweep", str(config), "--sweep-dir", str(sweep), "--trials", "1", "--param", LR]
    proc = subprocess.Popen([sys.executable, "-m", "instructkit", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    run = sweep / "trial-000"
    deadline = time.time() + 120
    while not any("loss" in r for r in read_metrics(run)):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "sweep stopped by SIGINT; run the same command to continue" in out and "Traceback" not in out
    assert manifest(run)["status"] == "interrupted" and list((run / "checkpoints").iterdir())
    rows = board(sweep)
    assert rows[0]["state"] == "FAIL" and rows[0]["note"] == "the config as given; interrupted; retried as trial 1"
    assert rows[1]["state"] == "WAITING"

    assert main(args) == 0  # the same command: the interrupted trial resumes in its own directory
    rows = board(sweep)
    assert (rows[1]["state"], rows[1]["run_dir"], rows[1]["rank"]) == ("COMPLETE", str(run), 1)
    assert manifest(run)["status"] == "completed" and manifest(run)["resumed"]
    assert not (sweep / "trial-001").exists()
    assert f"best run directory: {run}" in capsys.readouterr().out


@pytest.mark.slow
def test_a_failing_trial_is_marked_with_its_log_and_the_sweep_goes_on(sweep_config, tmp_path, capsys):
    config, sweep = sweep_config(), tmp_path / "sweep"
    missing = [str(tmp_path / "no-model-a"), str(tmp_path / "no-model-b")]
    # the config as given (trial 0) fails too: its model is missing as well
    assert main(["sweep", str(config), f"model.name_or_path={tmp_path / 'no-model-c'}", "--sweep-dir", str(sweep),
                 "--trials", "2", "--param", f"model.name_or_path={','.join(missing)}"]) == 1
    assert "no trial completed" in capsys.readouterr().err
    rows = board(sweep)
    assert [r["state"] for r in rows.values()] == ["FAIL", "FAIL"]  # both ran: one failure does not stop it
    for row in rows.values():
        assert "exit code 2: error:" in row["note"] and "model.name_or_path" in row["note"]
        assert row["log_tail"] and not (sweep / "best.yaml").exists()


def _bad(tiny_config, tmp_path, case: str) -> tuple[list[str], str]:
    with_eval = {"data": {"val_size": 2}, "train": {"max_steps": 2}}
    cases = {
        "unknown key": (["--param", "train.lr=1e-4..1e-2"], "'train.lr' is not a config key"),
        "reversed range": (["--param", "train.learning_rate=1e-2..1e-4:log"], "the range is reversed"),
        "empty range": (["--param", "lora.r=8..8"], "the range is empty"),
        "log of zero": (["--param", "train.learning_rate=0..1e-2:log"], "a log range needs bounds above 0"),
        "malformed": (["--param", "train.learning_rate:1e-4"], "is not of the form KEY=RANGE"),
        "invalid high end": (["--param", "lora.dropout=0.1..1.5"], "high ends of --param"),
        "invalid choice": (["--param", "model.precision=fp32,fp64"], "--param model.precision=fp64"),
        "no trials": (["--trials", "0"], "--trials 0"),
        "no jobs": (["--jobs", "0"], "--jobs 0"),
        "no eval data": ([], "the config has no eval data"),
        "bad storage": (["--storage", "nosuchdb://host/db"], "cannot open the study storage nosuchdb://host/db"),
    }
    extra, needle = cases[case]
    config = tiny_config(**({"data": {"val_size": 0}} if case == "no eval data" else with_eval))
    trials = [] if "--trials" in extra else ["--trials", "2"]
    return ["sweep", str(config), "--sweep-dir", str(tmp_path / "sweep"), *trials, *extra], needle


@pytest.mark.parametrize("case", ["unknown key", "reversed range", "empty range", "log of zero", "malformed",
                                  "invalid high end", "invalid choice", "no trials", "no jobs", "no eval data",
                                  "bad storage"])
def test_bad_input_exits_2_before_any_trial(tiny_config, tmp_path, capsys, case):
    args, needle = _bad(tiny_config, tmp_path, case)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and "Fix:" in err
    assert not (tmp_path / "sweep").exists()  # nothing written, no study created


def test_bad_input_through_the_real_process_has_no_traceback(tiny_config, tmp_path):
    args, needle = _bad(tiny_config, tmp_path, "unknown key")
    result = subprocess.run([sys.executable, "-m", "instructkit", *args], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120, check=False)
    assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr


def test_a_resumed_sweep_must_search_the_same_space(tiny_config, tmp_path, capsys):
    from instructkit import sweep_study

    config, sweep = tiny_config(data={"val_size": 2}, train={"max_steps": 2}), tmp_path / "sweep"
    plan = sweep_study.plan_sweep(str(config), [], 1, [LR], str(sweep))
    sweep_study.open_study(plan)  # a study that searched the learning rate
    assert main(["sweep", str(config), "--sweep-dir", str(sweep), "--trials", "1", "--param", "lora.r=4,8"]) == 2
    assert "give the same --param flags to resume it" in capsys.readouterr().err


def test_a_resumed_sweep_must_rank_by_the_same_metric(tiny_config, tmp_path, capsys):
    from instructkit import sweep_study

    config, sweep = tiny_config(data={"val_size": 2}, train={"max_steps": 2}), tmp_path / "sweep"
    plan = sweep_study.plan_sweep(str(config), [], 1, [LR], str(sweep), metric="eval_loss")
    sweep_study.open_study(plan)  # a study ranked by eval loss
    args = ["sweep", str(config), "--sweep-dir", str(sweep), "--trials", "1", "--param", LR]
    assert main([*args, "--metric", "eval_exact_match"]) == 2
    err = capsys.readouterr().err
    assert "ranks its trials by eval_loss, this command by eval_exact_match" in err and "Fix:" in err
    assert optuna.load_study(study_name=plan.study_name, storage=plan.storage).user_attrs["metric"] == "eval_loss"
