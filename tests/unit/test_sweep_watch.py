"""`instructkit sweep` watching its trials, without training: evaluations filed with Optuna at the percent of
a trial's training, pruning by the median rule, a finished trial told the value of what its final/ holds,
and a metric that only the first trial's child resolves."""

import json
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from instructkit.sweep_board import board_rows
from instructkit.sweep_metric import StudyMetric
from tests.unit.test_sweep import _frozen

optuna.logging.set_verbosity(optuna.logging.WARNING)


class FakeChild:
    """A child process that records the signals it is sent: running, or exited with `code`."""

    def __init__(self, code=None):
        self.signals, self.code = [], code

    def poll(self):
        return self.code

    def send_signal(self, signum):
        self.signals.append(signum)


def _metrics(run_dir: Path, records: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _evals(metric: str, values: list[float], **more) -> list[dict]:
    """Evaluation records at steps 1, 2, ... with `metric` at `values` (and `more` at every step)."""
    return [{"step": i + 1, metric: value, **more} for i, value in enumerate(values)]


def _watched_trial(tmp_path, records: list[dict], metric="eval_loss", told=1.0, code=None, others=None,
                   manifest=None, by_percent=True):
    """A new trial beside two completed ones (told `told` at 5% and 10% of their training, or `others`
    intermediate values, as Optuna holds values: eval loss, or 1 - accuracy), watched once after its run
    logged `records`; its manifest plans 20 steps (so step n is 5n%) unless `manifest` says otherwise."""
    import signal

    from instructkit.sweep import TrialRun, watch
    from instructkit.sweep_study import make_pruner

    study = optuna.create_study(pruner=make_pruner())
    study.set_user_attr("metric", metric)
    for number in range(2):
        evals = (others[number] if isinstance(others, list) else others) or {5: told, 10: told}
        study.add_trial(_frozen(number, TrialState.COMPLETE, told, evals=evals))
    run_dir = tmp_path / "trial-002"
    _metrics(run_dir, records)
    child = FakeChild(code)
    log = None if code is None else open(tmp_path / "train.log", "w")  # noqa: SIM115 - finish() closes it
    run = TrialRun(study.ask(), run_dir, 0, child, log, StudyMetric(study, metric), by_percent=by_percent)
    (run_dir / "manifest.json").write_text(json.dumps(manifest or {"total_steps": 20}))  # the child's, after start
    assert watch(run, study) is (code is not None)  # True once the child has exited and the trial is told
    return run, child.signals, signal.SIGINT


def test_a_trial_worse_than_the_median_is_pruned_from_its_second_eval_loss(tmp_path):
    run, signals, sigint = _watched_trial(tmp_path, _evals("eval_loss", [3.0]))
    assert run.evals == {1: 3.0} and not run.pruned and signals == []  # one point says little: never pruned
    run, signals, sigint = _watched_trial(tmp_path / "b", _evals("eval_loss", [3.0, 2.5]))
    assert run.pruned and signals == [sigint]  # the child is asked to checkpoint and stop
    run, signals, _ = _watched_trial(tmp_path / "c", _evals("eval_loss", [1.0, 0.5]))
    assert not run.pruned and signals == []


def test_an_exact_match_trial_is_pruned_on_1_minus_exact_match(tmp_path):
    # the others reached exact match 0.5 (told 0.5); this one 0.1 then 0.2, with a far lower eval loss
    run, signals, sigint = _watched_trial(tmp_path, _evals("eval_exact_match", [0.1, 0.2], eval_loss=0.01),
                                          "eval_exact_match", told=0.5)
    assert run.evals == {1: 0.1, 2: 0.2} and run.pruned and signals == [sigint]
    assert run.trial.study.trials[2].intermediate_values == pytest.approx({5: 0.9, 10: 0.8})  # 1 - exact match
    run, signals, _ = _watched_trial(tmp_path / "b", _evals("eval_exact_match", [0.6, 0.7], eval_loss=9.0),
                                     "eval_exact_match", told=0.5)
    assert not run.pruned and signals == []  # better than the median by exact match, whatever its loss


def test_trials_of_different_lengths_are_compared_at_the_same_percent_of_their_training(tmp_path):
    # two complete 4-step trials evaluated at steps 2 and 4; this one plans 12 steps and is slower to start
    records = _evals("eval_loss", [1.3, 1.1])
    records.append({"step": 6, "eval_loss": 0.95})
    records[1]["step"] = 4
    records[0]["step"] = 2
    run, signals, _ = _watched_trial(tmp_path, records, others={50: 1.0, 100: 0.8}, manifest={"total_steps": 12})
    assert run.trial.study.trials[2].intermediate_values == {15: 1.3, 35: 1.1, 50: 0.95}  # nearest 5%
    assert not run.pruned and signals == []  # at 50% of its training it is better than theirs at 50% (1.0)
    # the same trials filed by step (a study begun before percents): at step 4 (a third of its training) it
    # met their last value (0.8) and was pruned
    run, signals, sigint = _watched_trial(tmp_path / "b", records, others={2: 1.0, 4: 0.8}, by_percent=False)
    assert run.pruned and signals == [sigint] and run.trial.user_attrs["pruned_at"] == 4
    assert run.trial.study.trials[2].intermediate_values == {2: 1.3, 4: 1.1}  # nothing filed after the prune


def test_a_trial_is_pruned_only_against_at_least_two_trials_evaluated_at_the_same_point(tmp_path):
    worse = _evals("eval_loss", [3.0, 2.5])  # 5% and 10% of its 20 steps
    run, signals, _ = _watched_trial(tmp_path, worse, others=[{5: 1.0, 10: 1.0}, {5: 1.0, 25: 1.0}])
    assert not run.pruned and signals == []  # at 10% only one trial was evaluated: its value alone says little
    run, signals, sigint = _watched_trial(tmp_path / "b", worse, others=[{5: 1.0, 10: 1.0}, {10: 1.0}])
    assert run.pruned and signals == [sigint]


def test_an_old_runs_manifest_in_the_trial_directory_is_not_read_as_the_trials(tmp_path):
    import os

    run, _, _ = _watched_trial(tmp_path, _evals("eval_loss", [0.5, 0.5]), manifest={"total_steps": 40})
    assert run.total_steps == 40 and not run.pruned
    old = run.run_dir / "manifest.json"
    os.utime(old, (run.started - 60, run.started - 60))  # as if left by an earlier study's trial
    run.total_steps, run.evals, run.offset = None, {}, 0
    from instructkit.sweep import watch

    watch(run, run.trial.study)
    assert run.total_steps is None and run.evals == {}  # its records wait for the child's own manifest


def test_a_pruned_trial_is_noted_with_its_step_and_the_value_it_was_pruned_on():
    pruned = _frozen(3, TrialState.PRUNED, None, evals={25: 0.5, 50: 0.4}, run_dir="sw/trial-003", pruned_at=60)
    row = board_rows([pruned], "eval_exact_match")[0]
    assert row["note"] == "pruned at step 60 (eval_exact_match 0.6000)"


def test_a_trial_waits_for_its_manifest_before_its_evaluations_are_filed(tmp_path):
    run, _, _ = _watched_trial(tmp_path, _evals("eval_loss", [3.0, 2.5]), manifest={"status": "running"})
    assert run.evals == {} and run.offset == 0  # read again once the manifest says how long it trains
    (run.run_dir / "manifest.json").write_text(json.dumps({"total_steps": 4}))
    from instructkit.sweep import watch

    watch(run, run.trial.study)
    assert run.evals == {1: 3.0, 2: 2.5} and run.trial.study.trials[2].intermediate_values == {25: 3.0, 50: 2.5}


def test_a_finished_trial_is_told_the_value_its_final_weights_had(tmp_path):
    records = _evals("eval_exact_match", [0.4, 0.6, 0.6, 0.56], eval_loss=1.0)
    records[1]["eval_loss"] = 2.0  # the loss rises while more answers come out right
    held = {"total_steps": 100, "final_weights": "best", "held_step": 4, "last_step": 4}
    run, _, _ = _watched_trial(tmp_path / "held", records, "eval_exact_match", told=0.5, code=0, manifest=held)
    trial = run.trial.study.trials[2]
    assert trial.state == TrialState.COMPLETE and trial.value == pytest.approx(0.44)  # 1 - what final/ holds
    assert trial.user_attrs["best_eval"] == {"step": 4, "eval_exact_match": 0.56, "eval_loss": 1.0}
    last = {"total_steps": 100, "final_weights": "last", "held_step": 3, "last_step": 1}
    run, _, _ = _watched_trial(tmp_path / "last", records, "eval_exact_match", told=0.5, code=0, manifest=last)
    assert run.trial.study.trials[2].user_attrs["best_eval"]["step"] == 1  # final/ holds the last weights
    unlogged = {**last, "last_step": 5}  # stopped after an evaluation-less step: the latest before it
    run, _, _ = _watched_trial(tmp_path / "unlogged", records, "eval_exact_match", code=0, manifest=unlogged)
    assert run.trial.study.trials[2].user_attrs["best_eval"]["step"] == 4
    run, _, _ = _watched_trial(tmp_path, records, "eval_exact_match", told=0.5, code=0)  # no held step written
    trial = run.trial.study.trials[2]
    assert trial.state == TrialState.COMPLETE and trial.value == pytest.approx(0.4)  # 1 - the best, 0.6
    assert trial.user_attrs["best_eval"] == {"step": 3, "eval_exact_match": 0.6, "eval_loss": 1.0}  # lower loss
    run, _, _ = _watched_trial(tmp_path / "b", _evals("eval_loss", [2.0, 1.5, 1.7]), code=0)
    assert run.trial.study.trials[2].value == 1.5
    run, _, _ = _watched_trial(tmp_path / "c", _evals("eval_loss", [2.0]), "eval_accuracy", code=0)
    trial = run.trial.study.trials[2]
    assert trial.state == TrialState.FAIL and trial.user_attrs["note"].startswith("the run logged no eval_accuracy")


def test_a_trial_waits_for_its_child_to_resolve_an_auto_metric(tmp_path):
    from instructkit.sweep import TrialRun, watch

    study = optuna.create_study(pruner=optuna.pruners.NopPruner())
    study.set_user_attr("metric", "auto")
    run_dir = tmp_path / "trial-000"
    _metrics(run_dir, _evals("eval_exact_match", [0.3], eval_loss=1.0))
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"train": {"best_metric": "auto"}}))
    run = TrialRun(study.ask(), run_dir, 0, FakeChild(), None, StudyMetric(study, "auto"))
    (run_dir / "manifest.json").write_text(json.dumps({"total_steps": 20}))
    assert watch(run, study) is False and run.evals == {}  # nothing is reported by an unknown metric
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"train": {"best_metric": "eval_exact_match"}}))
    assert watch(run, study) is False and run.evals == {1: 0.3}
    assert study.user_attrs["metric"] == "eval_exact_match"
    assert study.trials[0].intermediate_values == pytest.approx({5: 0.7})  # step 1 of 20: 5%


