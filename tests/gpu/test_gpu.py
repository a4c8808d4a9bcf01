"""GPU checks: run on a CUDA machine (`make test-gpu`, and bench/gpu_check.sh); skipped elsewhere, each skip
saying exactly what is missing."""

import importlib.util
import json

import pytest
import torch

from instructkit.cli import main
from instructkit.env import gpu_problem
from instructkit.hardware import resolve_precision
from instructkit.kernels import liger_support
from instructkit.metrics import read_metrics


def _cuda_missing(gpus: int) -> list[str]:
    wanted = "a CUDA GPU" if gpus == 1 else f"{gpus} CUDA GPUs (NCCL between processes)"
    if not torch.cuda.is_available():
        info = {"cuda_available": False, "gpu_count": 0, "torch_cuda_build": torch.version.cuda}
        return [f"{wanted}, which torch {torch.__version__} does not see: {gpu_problem(info)}"]
    count = torch.cuda.device_count()
    return [f"{wanted}; this machine has {count}"] if count < gpus else []


def _liger_missing() -> list[str]:
    if importlib.util.find_spec("liger_kernel") is None:
        problem = "not installed"
    elif torch.cuda.is_available():
        problem = liger_support() if isinstance(liger_support(), str) else None
    else:
        return []  # installed; its Triton kernels are only imported where CUDA is
    return [f"liger-kernel for model.kernels: liger ({problem}; pip install 'instructkit[gpu]')"] if problem else []


def _package_missing(name: str, purpose: str) -> list[str]:
    if importlib.util.find_spec(name) is not None:
        return []
    return [f"the {name} package for {purpose} (pip install {'instructkit[gpu]' if name == 'bitsandbytes' else name})"]


def needs(gpus: int = 1, liger: bool = False, **packages: str) -> pytest.MarkDecorator:
    """Skip unless this machine has `gpus` CUDA GPUs and each package (name=what it is for); the reason lists
    everything missing, not just the first."""
    missing = _cuda_missing(gpus) + (_liger_missing() if liger else [])
    missing += [m for name, purpose in packages.items() for m in _package_missing(name, purpose)]
    return pytest.mark.skipif(bool(missing), reason="needs " + "; and ".join(missing))


pytestmark = pytest.mark.gpu


@needs()
def test_auto_precision_is_half_on_gpu():
    assert resolve_precision("auto") == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")


@needs()
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


@needs(bitsandbytes="4-bit QLoRA")
def test_qlora_trains(tiny_config):
    config = tiny_config(model={"load_in_4bit": True}, lora={"target_modules": "all-linear"})
    assert main(["train", str(config)]) == 0
    assert (config.parent / "run/final/adapter_model.safetensors").is_file()


@needs()
def test_generate_with_device_map_auto(tiny_config, capsys):
    config = tiny_config()
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    assert main(["generate", str(config.parent / "run"), "--prompt", "Say yes.", "--max-new-tokens", "4"]) == 0


@needs(gpus=2)
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


@needs(gpus=2, deepspeed="ZeRO-2/3 training")
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


def _tiny_loss(model_dir, kernels: str, batch: dict) -> tuple[float, list[torch.Tensor], bool]:
    """(summed loss, gradients, whether Liger's fused head ran) of one fp32 step of the tiny model on CUDA."""
    from instructkit.config import ModelConfig
    from instructkit.loss import SupervisedLoss
    from instructkit.models import LoadPlan, load_model

    plan = LoadPlan("float32", "fp32", "sdpa")
    model = load_model(str(model_dir), ModelConfig(name_or_path=str(model_dir), kernels=kernels), plan).cuda()
    loss_fn = SupervisedLoss(model)
    loss = loss_fn(**{k: v.cuda() for k, v in batch.items()})
    loss.backward()
    return float(loss), [p.grad.detach().clone() for p in model.parameters()], loss_fn._fused_ce is not None


# Last in the file: Liger patches transformers' Llama module for the whole process once applied.
@needs(liger=True)
def test_liger_kernels_keep_the_supervised_loss(tiny_model_dir):
    torch.manual_seed(0)
    ids = torch.randint(0, 200, (2, 64))
    labels = ids.clone()
    labels[:, :40] = -100  # the prompt: never supervised, never seen by the fused head
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(64).repeat(2, 1)}
    plain, plain_grads, fused_plain = _tiny_loss(tiny_model_dir, "none", batch)
    liger, liger_grads, fused = _tiny_loss(tiny_model_dir, "liger", batch)
    assert fused and not fused_plain
    assert liger == pytest.approx(plain, rel=1e-4)
    for a, b in zip(plain_grads, liger_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@needs(liger=True)
def test_training_with_liger_records_it(tiny_config):
    config = tiny_config(model={"kernels": "liger", "precision": "bf16"}, data={"packing": True})
    assert main(["train", str(config)]) == 0
    manifest = json.loads((config.parent / "run/manifest.json").read_text())
    assert manifest["kernels"] == {"value": "liger", "why": "set in the config"}
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in read_metrics(config.parent / "run") if "loss" in m)
