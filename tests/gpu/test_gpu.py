"""GPU checks: run on a CUDA machine (`make test-gpu`); skipped, with the reason shown, elsewhere."""

import importlib.util
import json

import pytest
import torch

from instructkit.cli import main
from instructkit.metrics import read_metrics
from instructkit.models import resolve_precision

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_auto_precision_is_half_on_gpu():
    assert resolve_precision("auto") == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")


@pytest.mark.parametrize("method", ["lora", "full"])
def test_mixed_precision_training_on_gpu(tiny_config, method):
    config = tiny_config(method=method, train={"max_steps": 6})
    assert main(["train", str(config)]) == 0
    run = config.parent / "run"
    assert json.loads((run / "manifest.json").read_text())["device"].startswith("cuda:")
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="QLoRA needs bitsandbytes")
def test_qlora_trains(tiny_config):
    config = tiny_config(model={"load_in_4bit": True}, lora={"target_modules": "all-linear"})
    assert main(["train", str(config)]) == 0
    assert (config.parent / "run/final/adapter_model.safetensors").is_file()


def test_generate_with_device_map_auto(tiny_config, capsys):
    config = tiny_config()
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    assert main(["generate", str(config.parent / "run"), "--prompt", "Say yes.", "--max-new-tokens", "4"]) == 0
