"""`instructkit estimate` against measured peak memory of real training steps (bench/memory.py, CPU):
within 25% for the tiny model and for SmolLM2, with and without LoRA and gradient checkpointing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from instructkit.cli import main

ROOT = Path(__file__).parents[2]


def measure(config: Path, *overrides: str, steps: int = 2) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "bench/memory.py"), str(config), *overrides,
                          "--steps", str(steps)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def write(tmp_path: Path, model: str, batch: int, length: int) -> Path:
    path = tmp_path / "memory.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": model, "precision": "fp32"},
                                    "data": {"train_file": str(ROOT / "examples/data/train.jsonl"),
                                             "max_length": length},
                                    "train": {"per_device_train_batch_size": batch}}))
    return path


@pytest.mark.parametrize("overrides", [["method=full"], ["method=lora", "model.gradient_checkpointing=true"],
                                       ["method=full", "objective=dpo", "train.per_device_train_batch_size=8"],
                                       ["method=lora", "objective=orpo", "train.per_device_train_batch_size=8"]])
def test_estimate_is_within_25_percent_of_the_tiny_models_measured_peak(tmp_path, tiny_model_dir, overrides):
    result = measure(write(tmp_path, str(tiny_model_dir), 16, 1024), *overrides)
    assert result["measured_bytes"] > 50 * 2**20  # activations dominate: a measurement, not noise
    assert 0.75 <= result["ratio"] <= 1.25, result


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [["method=lora"], ["method=full", "model.gradient_checkpointing=true"]])
def test_estimate_is_within_25_percent_of_smollm2s_measured_peak(tmp_path, overrides):
    result = measure(write(tmp_path, "smollm2-135m-instruct", 2, 256), *overrides, steps=2)
    assert 0.75 <= result["ratio"] <= 1.25, result


def test_estimate_counts_the_models_parameters_exactly(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from instructkit.config import load_config
    from instructkit.estimate import model_shape
    from instructkit.models import apply_lora

    cfg = load_config(write(tmp_path, str(tiny_model_dir), 1, 64))
    shape = model_shape(cfg)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert shape.total == sum(p.numel() for p in model.parameters())
    lora = apply_lora(model, cfg.lora)
    assert shape.lora == sum(p.numel() for p in lora.parameters() if p.requires_grad)


def test_sharding_divides_what_it_shards():
    from instructkit.estimate import Shape, breakdown

    shape = Shape(total=7_000_000_000, not_quantized=270_000_000, largest_unit=200_000_000, lora=4_000_000,
                  layers=32, hidden=4096, intermediate=11008, kv_dim=4096, heads=32, vocab=32000)
    args = dict(compute_bytes=2, batch=1, length=512, checkpointing=True)
    ddp, zero2, fsdp = (breakdown(shape, "full", s, 8, **args) for s in ("ddp", "zero2", "fsdp"))
    assert ddp["optimizer"] == 8 * 7e9 and zero2["optimizer"] == fsdp["optimizer"] == 7e9
    assert zero2["weights"] == ddp["weights"] and fsdp["weights"] < ddp["weights"] / 4
    assert ddp["activations"] == fsdp["activations"]
    qlora = breakdown(shape, "qlora", "ddp", 1, **args)
    assert qlora["weights"] < breakdown(shape, "lora", "ddp", 1, **args)["weights"] / 3


def test_estimate_cli_says_what_fits(tmp_path, tiny_model_dir, capsys):
    config = write(tmp_path, str(tiny_model_dir), 4, 256)
    assert main(["estimate", str(config), "--gpus", "8", "--gpu-memory", "1GB"]) == 0
    out = capsys.readouterr().out
    assert "full   fsdp" in out and "lora   ddp" in out and "<- config" in out and "fits: " in out
    assert main(["estimate", str(config), "--gpu-memory", "lots"]) == 2
    assert main(["estimate", str(config), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert {r["method"] for r in table["rows"]} == {"full", "lora"}  # no QLoRA on a CPU
