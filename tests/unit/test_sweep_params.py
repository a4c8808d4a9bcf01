"""`instructkit sweep`'s search space: --param forms, the default spaces per method, derived values, trial
configs, and the checks that exit 2 before any trial."""

import pytest

from instructkit.errors import UserError
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
from tests.unit.test_sweep import base_config


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
    ("train.best_metric=eval_loss,eval_accuracy", "the sweep sets train.best_metric itself"),
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
