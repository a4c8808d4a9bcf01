"""GPU checks: run on a CUDA machine (`make test-gpu`); skipped, with the reason shown, elsewhere."""

import importlib.util
import json

import pytest
import torch

from instructkit.cli import main
from instructkit.metrics import read_metrics
from instructkit.hardware import resolve_precision

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_auto_precision_is_half_on_gpu():
    assert resolve_precision("auto") == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")


@pytest.mark.parametrize("method", ["lora", "full"])
def test_mixed_precision_training_on_gpu(tiny_config, method):
    # with eval data: eval batches are not prepared by accelerate, so they must be moved to the GPU too
    config = tiny_config(method=method, data={"val_size": 0.25}, train={"max_steps": 6, "eval_steps": 3})
    assert main(["train", str(config)]) == 0
    run = config.parent / "run"
    assert json.loads((run / "manifest.json").read_text())["device"].startswith("cuda:")
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert [m["step"] for m in read_metrics(run) if "eval_loss" in m] == [3, 6]


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


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@two_gpus
@pytest.mark.parametrize("engine", [[], ["distributed.strategy=fsdp", "model.precision=bf16", "method=full"]],
                         ids=["ddp", "fsdp-bf16"])
def test_two_gpus_with_nccl(tiny_config, engine):
    import subprocess
    import sys

    config = tiny_config(train={"max_steps": 4, "save_strategy": "steps", "save_steps": 2})
    out = subprocess.run([sys.executable, "-m", "instructkit", "train", str(config), "--nproc", "2", *engine],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "x 2 process(es)" in out.stdout
    assert any((config.parent / "run/final").glob("*.safetensors"))


@two_gpus
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs the deepspeed package")
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_zero_trains_and_saves(tiny_config, stage):
    import subprocess
    import sys

    config = tiny_config(train={"max_steps": 4, "gradient_accumulation_steps": 2})
    out = subprocess.run([sys.executable, "-m", "instructkit", "train", str(config), "--nproc", "2",
                          "distributed.strategy=deepspeed", f"distributed.deepspeed_config={stage}",
                          "model.precision=bf16"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (config.parent / "run/final/adapter_model.safetensors").is_file()
