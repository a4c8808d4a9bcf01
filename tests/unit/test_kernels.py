"""model.kernels: what auto resolves to and why, the error for liger where it cannot run, and the loss's hook."""

import json

import pytest
import torch

from instructkit.cli import main
from instructkit.errors import UserError
from instructkit.kernels import KernelChoice, apply_kernels, check_kernels, kernels_of, resolve_kernels

LIGER = frozenset({"llama", "qwen2", "mistral"})


def test_none_is_none_whatever_the_machine():
    assert resolve_kernels("none", "llama", True, LIGER) == KernelChoice("none", "set in the config")


def test_auto_takes_liger_where_it_can_run():
    choice = resolve_kernels("auto", "qwen2", True, LIGER)
    assert choice.value == "liger" and "qwen2" in choice.why


@pytest.mark.parametrize("model_type, cuda, support, reason", [
    ("llama", False, LIGER, "no CUDA GPU"),
    ("llama", True, "liger-kernel is not installed", "not installed"),
    ("gpt2", True, LIGER, "no kernels for the 'gpt2' architecture"),
])
def test_auto_falls_back_to_none_and_says_why(model_type, cuda, support, reason):
    choice = resolve_kernels("auto", model_type, cuda, support)
    assert choice.value == "none" and reason in choice.why


@pytest.mark.parametrize("model_type, cuda, support, fix", [
    ("llama", False, LIGER, "run on a CUDA GPU"),
    ("llama", True, "liger-kernel is not installed", "pip install"),
    ("gpt2", True, LIGER, "use a model of an architecture Liger supports"),
])
def test_liger_where_it_cannot_run_is_bad_input(model_type, cuda, support, fix):
    with pytest.raises(UserError) as err:
        resolve_kernels("liger", model_type, cuda, support)
    message = str(err.value)
    assert message.startswith("model.kernels: liger cannot be used") and f"Fix: {fix}" in message
    assert "; or set model.kernels to auto" in message


def test_liger_with_an_unknown_architecture_checks_only_the_machine():
    assert resolve_kernels("liger", None, True, LIGER).value == "liger"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal; a CUDA machine may run Liger")
def test_check_refuses_liger_without_cuda_and_passes_auto():
    check_kernels("auto")
    check_kernels("none")
    with pytest.raises(UserError, match="no CUDA GPU is usable here"):
        check_kernels("liger")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal; a CUDA machine may run Liger")
def test_train_with_liger_on_cpu_exits_2_before_anything_is_written(tiny_config, capsys):
    config = tiny_config(model={"kernels": "liger"})
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "model.kernels" in err and "Fix:" in err and "Traceback" not in err
    assert not (config.parent / "run").exists()


def test_the_choice_is_recorded_on_the_model_and_read_through_a_peft_wrapper(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert kernels_of(model).value == "none"  # never resolved
    choice = apply_kernels(model, "auto")
    if not torch.cuda.is_available():
        assert choice.value == "none" and "no CUDA GPU" in choice.why
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert kernels_of(wrapped) == choice


def test_the_fused_head_loss_sees_only_supervised_rows(tiny_model_dir, monkeypatch):
    """Liger's fused loss (here a stand-in, Liger needs CUDA) gets the supervised positions only, and its
    result is the loss; where it declines (None) the chunked head computes the same value."""
    from transformers import AutoModelForCausalLM

    import instructkit.loss as loss_module

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.randint(0, 200, (2, 12))
    labels = ids.clone()
    labels[0, :7], labels[1, :3] = -100, -100  # 5 + 9 supervised next-token targets (of 11 per row)
    seen = []

    def make(answer):
        def head_loss(head, hidden, targets):
            seen.append((hidden.shape[0], targets.tolist()))
            return answer(head, hidden, targets)
        return lambda _model: head_loss

    plain = loss_module.SupervisedLoss(model)(ids, labels)
    monkeypatch.setattr(loss_module, "fused_head_loss", make(
        lambda head, h, y: torch.nn.functional.cross_entropy(head(h).float(), y, reduction="sum")))
    fused = loss_module.SupervisedLoss(model)(ids, labels)
    assert seen == [(5 + 9, labels[:, 1:][labels[:, 1:] != -100].tolist())]
    assert torch.allclose(fused, plain)
    monkeypatch.setattr(loss_module, "fused_head_loss", make(lambda *a: None))
    assert torch.allclose(loss_module.SupervisedLoss(model)(ids, labels), plain)


def test_the_manifest_records_the_resolved_kernels(finished_tiny_run):
    kernels = json.loads((finished_tiny_run / "manifest.json").read_text())["kernels"]
    assert set(kernels) == {"value", "why"} and kernels["value"] in ("liger", "none")
    if not torch.cuda.is_available():
        assert kernels == {"value": "none",
                           "why": "no CUDA GPU is usable here (Liger's kernels are Triton GPU kernels)"}
