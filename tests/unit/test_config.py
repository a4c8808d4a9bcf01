from pathlib import Path

import pytest
import yaml

from instructkit.config import RunConfig, apply_overrides, dump_config, load_config
from instructkit.config_reference import reference_rows
from instructkit.errors import UserError

MINIMAL = {"model": {"name_or_path": "m"}, "data": {"train_file": "t.jsonl"}}


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_defaults_are_chosen_for_results_not_copied_from_the_7b_recipe(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.method == "lora"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) == (16, 32, 0.0, "all-linear")
    tc = cfg.train
    assert (tc.gradient_accumulation_steps, tc.learning_rate, tc.num_train_epochs, tc.eval_steps) == ("auto",) * 4
    assert cfg.data.val_size == "auto" and tc.final_weights == "best" and tc.early_stopping_patience is None
    # The article's recipe stays available as a shipped config, with its own values.
    article = load_config(Path(__file__).parents[2] / "configs/llama2-7b-lora.yaml")
    assert (article.lora.r, article.lora.target_modules, article.train.gradient_accumulation_steps) == (
        8, ["q_proj", "v_proj"], 8)
    assert article.data.template == "alpaca_short" and article.train.final_weights == "last"
    assert cfg.data.template == "auto" and cfg.data.train_on_inputs is False and cfg.data.overlength == "drop"
    assert cfg.output_dir == "runs/run"


def test_all_errors_reported_at_once_with_key_paths(tmp_path):
    bad = {"model": {"name_or_path": "m", "precison": "bf16"}, "data": {"train_file": "t.jsonl", "max_length": "long"},
           "train": {"learning_rate": -1}, "lora": {"target_modules": 5}}
    with pytest.raises(UserError) as err:
        load_config(write(tmp_path, bad))
    text = str(err.value)
    assert "4 problems" in text
    assert "model.precison: unknown key; allowed here: name_or_path, precision" in text
    assert "data.max_length:" in text and "'long'" in text
    assert "train.learning_rate:" in text and "greater than 0" in text
    assert "lora.target_modules" in text


def test_missing_required_key(tmp_path):
    with pytest.raises(UserError, match=r"data: required key is missing"):
        load_config(write(tmp_path, {"model": {"name_or_path": "m"}}))


def test_yaml_syntax_error_names_line(tmp_path):
    with pytest.raises(UserError, match=r"c\.yaml:3:\d+: not valid YAML"):
        load_config(write(tmp_path, "model:\n  name_or_path: m\n  bad: x: y\n"))


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, MINIMAL)
    cfg = load_config(path, ["train.learning_rate=1e-4", "lora.r=16", "lora.target_modules=all-linear",
                             "data.train_file=[a.jsonl, b.jsonl]"])
    assert cfg.train.learning_rate == 1e-4 and cfg.lora.r == 16 and cfg.lora.target_modules == "all-linear"
    assert [s.path for s in cfg.data.train_specs] == ["a.jsonl", "b.jsonl"]
    with pytest.raises(UserError, match="train.learnig_rate: unknown key"):
        load_config(path, ["train.learnig_rate=1"])
    with pytest.raises(UserError, match="key.path=value"):
        load_config(path, ["lora.r"])
    with pytest.raises(UserError, match="is not a section"):
        apply_overrides({"method": "lora"}, ["method.x=1"])
    # YAML 1.1 reads an unquoted `no` as false; `save_strategy: no` means "no"
    assert load_config(path, ["train.save_strategy=no"]).train.save_strategy == "no"
    with pytest.raises(UserError, match="train.save_strategy"):
        load_config(path, ["train.save_strategy=true"])


def test_cross_field_checks(tmp_path):
    with pytest.raises(UserError, match="load_in_4bit needs method: lora"):
        load_config(write(tmp_path, MINIMAL), ["model.load_in_4bit=true", "method=full"])
    with pytest.raises(UserError, match="eval_steps is set but there is no eval data"):
        load_config(write(tmp_path, MINIMAL), ["train.eval_steps=10", "data.val_size=0"])
    with pytest.raises(UserError, match="not both"):
        load_config(write(tmp_path, MINIMAL), ["data.eval_file=e.jsonl", "data.val_size=0.1"])


def test_padding_free_true_is_refused_where_it_would_be_ignored(tmp_path):
    with pytest.raises(UserError, match="data.padding_free with objective: dpo.*set data.padding_free: false"):
        load_config(write(tmp_path, MINIMAL), ["data.padding_free=true", "objective=dpo"])
    with pytest.raises(UserError, match="packed rows hold no padding already"):
        load_config(write(tmp_path, MINIMAL), ["data.padding_free=true", "data.packing=true"])
    assert load_config(write(tmp_path, MINIMAL), ["objective=dpo"]).data.padding_free == "auto"  # auto pads pairs
    assert load_config(write(tmp_path, MINIMAL), ["data.packing=true"]).data.packing


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["seed=7"])
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert again == cfg


def test_every_leaf_key_is_documented():
    rows = reference_rows()
    assert len(rows) > 30
    assert all(meaning for _, _, meaning in rows), [k for k, _, m in rows if not m]


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[2].glob("configs/*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    assert isinstance(load_config(path), RunConfig)
