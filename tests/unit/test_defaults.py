"""What `auto` resolves to, and that a resume keeps what its start resolved."""

import pytest

from instructkit.config import RunConfig
from instructkit.defaults import (
    Choice,
    auto_accumulation,
    auto_best_metric,
    auto_epochs,
    auto_eval_steps,
    auto_learning_rate,
    auto_val_size,
    resolve,
    resolve_eval,
)
from instructkit.errors import UserError


def config(**train) -> RunConfig:
    return RunConfig.model_validate({"model": {"name_or_path": "m"}, "data": {"train_file": "t.jsonl"},
                                     "train": train})


def test_val_split_only_when_there_is_enough_data_and_no_eval_file():
    assert auto_val_size("auto", 150, False).value == 0
    assert auto_val_size("auto", 500, False).value == 25
    assert auto_val_size("auto", 300, False).value == 20  # at least 20 rows
    assert auto_val_size("auto", 1_000_000, False).value == 1000  # at most 1,000
    assert auto_val_size("auto", 5000, True).value == 0
    assert auto_val_size(0.1, 50, False).value == 0.1  # explicit sizes pass through


def test_small_data_gets_small_batches_and_several_passes():
    assert auto_accumulation(500, 8, 1).value == 1
    assert auto_accumulation(500, 2, 1).value == 4
    assert auto_accumulation(100_000, 8, 1).value == 4  # global batch 32
    assert auto_accumulation(100_000, 8, 8).value == 1
    assert [auto_epochs(n).value for n in (100, 300, 479, 1000, 5000)] == [3, 3, 2, 1, 1]
    assert auto_eval_steps(63).value == 16 and auto_eval_steps(2).value == 1


def test_learning_rate_by_method_and_model_size():
    assert auto_learning_rate("lora", None).value == 1e-3
    assert auto_learning_rate("full", 135_000_000).value == 5e-5
    assert auto_learning_rate("full", 7_000_000_000).value == 2e-5
    with pytest.raises(UserError, match="train.learning_rate"):
        auto_learning_rate("full", None)


def test_resolve_replaces_only_auto_and_says_why():
    val = Choice("data.val_size", 25, "held out")
    cfg, choices = resolve(config(learning_rate=3e-4), 479, val, 1, None)
    assert cfg.train.learning_rate == 3e-4 and cfg.train.gradient_accumulation_steps == 1
    assert cfg.train.num_train_epochs == 2 and cfg.data.val_size == 25
    assert {c.key for c in choices} == {"data.val_size", "train.gradient_accumulation_steps", "train.num_train_epochs"}
    assert all(c.why for c in choices)
    # A resume keeps what the run started with, even if the rules would now say otherwise.
    previous = {"train": {"gradient_accumulation_steps": 2, "num_train_epochs": 1, "eval_steps": 7}}
    cfg, choices = resolve(config(), 479, val, 1, None, previous)
    assert (cfg.train.gradient_accumulation_steps, cfg.train.num_train_epochs) == (2, 1)
    assert resolve_eval(cfg, 60, [3, 4], previous)[0].train.eval_steps == 7
    resolved, choices = resolve_eval(cfg, 60, [3, 4])
    assert (resolved.train.eval_steps, resolved.train.best_metric) == (15, "eval_exact_match")
    assert resolve_eval(cfg, 60, [])[0].train.eval_steps is None


def test_short_answers_are_chosen_by_exact_match_long_ones_by_loss():
    assert auto_best_metric([1, 2, 3, 40]).value == "eval_exact_match"
    assert auto_best_metric([100, 200, 300]).value == "eval_loss"
    assert auto_best_metric([]).value == "eval_loss"


def test_tracker_breaks_accuracy_ties_by_loss_and_counts_evaluations_since_the_best():
    from instructkit.selection import Tracker

    tracker = Tracker("eval_exact_match", patience=2)
    assert tracker.update(1, {"eval_exact_match": 0.4, "eval_loss": 2.0})
    assert tracker.update(2, {"eval_exact_match": 0.4, "eval_loss": 1.5})  # a tie with a lower loss moves the best
    assert tracker.update(3, {"eval_exact_match": 0.4, "eval_loss": 1.7})  # held (a tie), but not a new best
    assert not tracker.should_stop and (tracker.best_step, tracker.held_step, tracker.since_best) == (2, 3, 1)
    assert not tracker.update(4, {"eval_exact_match": 0.36, "eval_loss": 1.0})  # lower loss, worse accuracy
    assert tracker.should_stop
    by_loss = Tracker("eval_loss", patience=None)
    assert by_loss.update(1, {"eval_loss": 2.0}) and not by_loss.update(2, {"eval_loss": 2.0})
    assert not by_loss.should_stop
    fields = tracker.progress_fields()
    assert Tracker.resumed("eval_exact_match", 2, type("P", (), {
        "best_value": fields["best_value"], "best_step": fields["best_step"],
        "evals_since_best": fields["evals_since_best"], "best_tie_loss": fields["best_tie_loss"],
        "held_step": fields["held_step"]})()) == tracker


def test_the_latest_accuracy_within_one_standard_error_of_the_best_is_held():
    from instructkit.selection import Tracker

    tracker = Tracker("eval_exact_match", patience=None)
    n = {"n_examples": 25, "n_tokens": 100}
    assert tracker.update(30, {"eval_exact_match": 0.52, "eval_loss": 1.2, **n})  # a spike on 25 examples
    assert tracker.update(90, {"eval_exact_match": 0.44, "eval_loss": 1.4, **n})  # 0.52 - 0.10 <= 0.44: noise
    assert not tracker.update(105, {"eval_exact_match": 0.36, "eval_loss": 1.3, **n})  # clearly worse
    assert (tracker.best_step, tracker.held_step, tracker.since_best) == (30, 90, 2)
    assert tracker.update(120, {"eval_exact_match": 0.60, "eval_loss": 1.5, **n})
    assert (tracker.best_step, tracker.held_step) == (120, 120)
    strict = Tracker("eval_exact_match", patience=None)  # without a count there is no noise estimate
    strict.update(1, {"eval_exact_match": 0.5, "eval_loss": 1.0})
    assert not strict.update(2, {"eval_exact_match": 0.45, "eval_loss": 1.0}) and strict.held_step == 1


def test_a_resumed_run_keeps_its_held_out_split():
    from instructkit.defaults import keep_split

    assert keep_split(config(), {"data": {"val_size": 25}}).data.val_size == 25
    assert keep_split(config(), {"data": {"val_size": 0.0}}).data.val_size == 0  # a run from before auto
    assert keep_split(config(), None).data.val_size == "auto"
