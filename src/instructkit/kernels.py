"""Fused GPU kernels for training (`model.kernels: auto | liger | none`).

Liger Kernel's Triton kernels replace a supported architecture's RMSNorm, rotary embedding and SwiGLU MLP on
the loaded model, and its fused linear cross entropy replaces the LM head and loss of `SupervisedLoss`: the
fused loss is given the same rows the chunked path computes, the supervised positions only, so the loss
keeps its meaning while the logits are never materialised. Triton kernels need CUDA, so `auto` takes Liger
where it can run (installed, CUDA present, architecture supported) and says why not where it cannot; `liger`
where it cannot run is bad input (exit 2).

The choice is made on the loaded model (its architecture decides), recorded on it for the loss and the
manifest, and printed at start with its reason.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

from instructkit.errors import user_error

KERNELS = ("auto", "liger", "none")
LIGER_INSTALL = "pip install 'instructkit[gpu]' (or pip install liger-kernel)"
_ATTR = "instructkit_kernels"  # where the choice is kept on the model
# Liger's patch functions take these switches; the cross-entropy ones stay off (SupervisedLoss owns the head).
_LIGER_SWITCHES = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                   "fused_linear_cross_entropy": False}


@dataclass(frozen=True)
class KernelChoice:
    """What `model.kernels` resolved to (liger | none) and why."""

    value: str
    why: str

    def as_dict(self) -> dict[str, str]:
        return {"value": self.value, "why": self.why}


NONE = KernelChoice("none", "set in the config")


def liger_support() -> frozenset[str] | str:
    """The model types Liger can patch, or why it cannot be used here (not installed, fails to import)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed"
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception as exc:  # noqa: BLE001 - an old transformers, Triton without a GPU: said, not raised
        return f"liger-kernel cannot be imported ({type(exc).__name__}: {exc})"
    return frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)


def _problems(model_type: str | None, cuda: bool, support: frozenset[str] | str | None) -> list[tuple[str, str]]:
    """(what stops Liger here, how to fix it) for each obstacle; `support` None: not looked up (no CUDA)."""
    problems = [] if cuda else [("no CUDA GPU is usable here (Liger's kernels are Triton GPU kernels)",
                                 "run on a CUDA GPU")]
    if isinstance(support, str):
        problems.append((support, LIGER_INSTALL if "not installed" in support else "reinstall liger-kernel"))
    elif support is not None and model_type is not None and model_type not in support:
        problems.append((f"Liger has no kernels for the '{model_type}' architecture (it has them for: "
                         f"{', '.join(sorted(support))})", "use a model of an architecture Liger supports"))
    return problems


def resolve_kernels(setting: str, model_type: str | None, cuda: bool,
                    support: frozenset[str] | str | None) -> KernelChoice:
    """auto -> liger where it can run, else none with the reason; liger where it cannot run -> UserError.
    `model_type` None: the architecture is not known yet (checked again once the model is loaded)."""
    if setting == "none":
        return NONE
    problems = _problems(model_type, cuda, support)
    if not problems:
        return KernelChoice("liger", "set in the config" if setting == "liger" else
                            f"liger-kernel is installed, CUDA is present and Liger supports '{model_type}'")
    if setting == "liger":
        raise user_error(f"liger cannot be used: {'; '.join(p for p, _ in problems)}", "model.kernels",
                         f"{'; '.join(f for _, f in problems)}; or set model.kernels to auto (Liger where it "
                         "can run) or none")
    return KernelChoice("none", "; ".join(p for p, _ in problems))


def check_kernels(setting: str) -> None:
    """Refuse `liger` before anything is loaded where it cannot run whatever the model (no CUDA, not installed)."""
    if setting != "liger":
        return
    import torch

    cuda = torch.cuda.is_available()
    resolve_kernels(setting, None, cuda, liger_support() if cuda else None)


def apply_kernels(model: Any, setting: str) -> KernelChoice:
    """Resolve `setting` for this loaded model, patch it with Liger's kernels where chosen, and record the
    choice on it (kernels_of reads it back)."""
    import torch

    cuda = torch.cuda.is_available()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    support = liger_support() if setting != "none" and cuda else None
    choice = resolve_kernels(setting, model_type, cuda, support)
    if choice.value == "liger":
        _patch_with_liger(model, model_type)
    setattr(model, _ATTR, choice)
    return choice


def _patch_with_liger(model: Any, model_type: str) -> None:
    import inspect

    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    patch = MODEL_TYPE_TO_APPLY_LIGER_FN[model_type]
    accepted = inspect.signature(patch).parameters
    patch(model=model, **{k: v for k, v in _LIGER_SWITCHES.items() if k in accepted})


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def kernels_of(model: Any) -> KernelChoice:
    """The kernels a model was loaded with (none for a model that apply_kernels never saw)."""
    return getattr(_base(model), _ATTR, None) or KernelChoice("none", "not requested")


HeadLoss = Callable[[Any, Any, Any], Any]


def fused_head_loss(model: Any) -> HeadLoss | None:
    """For a model loaded with Liger's kernels: (head, hidden, targets) -> summed cross entropy of head(hidden)
    against targets through Liger's fused linear cross entropy, or None where the head is not a plain
    full-weight linear layer (a LoRA-adapted head, weights partitioned by ZeRO-3): the caller then computes it
    itself. Without Liger: None."""
    if kernels_of(model).value != "liger":
        return None
    import torch
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    fused = LigerFusedLinearCrossEntropyLoss(reduction="sum")

    def head_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        weight = getattr(head, "weight", None)
        plain = type(head) is torch.nn.Linear and type(weight) is torch.nn.Parameter
        if not plain or weight.numel() != head.in_features * head.out_features or hidden.shape[0] == 0:
            return None
        return fused(weight, hidden, targets, head.bias)

    return head_loss
