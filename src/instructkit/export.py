"""Use the tuned model elsewhere: merge a LoRA adapter into its base (`merge`) and write a GGUF file
for llama.cpp and Ollama (`export_gguf`), both carrying the chat template the run trained with.

Merging happens in fp32 and is cast afterwards, so the merged model's logits equal base + adapter.
The GGUF writer is the `gguf` package's; tensor names, the q/k row order llama.cpp expects and the
tokenizer metadata follow llama.cpp's own converter, and a test reads every file back through
transformers' GGUF loader.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from instructkit.config import DTYPES
from instructkit.errors import user_error
from instructkit.files import atomic_path
from instructkit.models import load_generation_config, load_pretrained, stored_precision

if TYPE_CHECKING:
    import numpy as np
    import torch
    from transformers import PreTrainedTokenizerBase

# Hugging Face architecture -> GGUF architecture. Mistral is a Llama in GGUF terms.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
LAYER_TENSORS = {  # suffix after model.layers.N. -> after blk.N.
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}


def load_merged(source: str, allow_pickle: bool = False) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, Path | str]:
    """(model in fp32 on the CPU with any LoRA adapter merged in, tokenizer, where it came from)."""
    loaded = load_pretrained(source, "float32", merge=True, allow_pickle=allow_pickle)
    return loaded.model, loaded.tokenizer, loaded.source


def merge_lora(source: str, out: str, dtype: str | None = None, overwrite: bool = False,
               max_shard_size: str = "2GB", allow_pickle: bool = False) -> Path:
    """A standalone model directory: merged weights in `dtype` (default: the precision the base model
    was published in; safetensors, sharded above `max_shard_size`), the tokenizer with the trained chat
    template, and the run's generation config."""
    import torch

    target = Path(out).expanduser()
    if target.exists() and any(target.iterdir() if target.is_dir() else [target]) and not overwrite:
        raise user_error(f"{target} already exists and is not empty", "--out",
                         "choose another --out, or pass --overwrite to replace it")
    dtype = dtype or stored_precision(source, allow_pickle)
    model, tokenizer, model_dir = load_merged(source, allow_pickle)
    model = model.to(getattr(torch, DTYPES[dtype]))
    generation_config = load_generation_config(model_dir)
    with atomic_path(target) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
    return target


def gguf_tensor_name(name: str) -> str | None:
    if name in TOP_TENSORS:
        return TOP_TENSORS[name]
    parts = name.split(".", 3)  # model, layers, N, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in LAYER_TENSORS:
        return f"blk.{parts[2]}.{LAYER_TENSORS[parts[3]]}"
    return None


def llama_cpp_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary layout for q/k rows: within each head, the two rotated halves interleaved
    (the inverse of what transformers' GGUF loader undoes)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _check_supported(config) -> str:
    arch = ARCHITECTURES.get((config.architectures or [""])[0])
    if arch is None:
        raise user_error(f"GGUF export supports {', '.join(ARCHITECTURES)}; this model is {config.architectures}",
                         "MODEL_OR_RUN", "merge it (instructkit merge) and use llama.cpp's convert_hf_to_gguf.py")
    scaling = getattr(config, "rope_scaling", None) or {}
    if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
        raise user_error(f"GGUF export does not write rope scaling {scaling}", "MODEL_OR_RUN",
                         "merge it (instructkit merge) and use llama.cpp's convert_hf_to_gguf.py")
    return arch


def token_type(token: str | None, added: dict | None, kind: str) -> int:
    """llama.cpp's token types: 1 normal, 3 control (special), 4 user-defined (added, not special),
    5 unused (padding rows), 6 byte (<0xNN> pieces of byte-fallback vocabularies)."""
    if token is None:
        return 5
    if added is not None:
        return 3 if added.get("special") else 4
    if kind == "llama" and re.fullmatch(r"<0x[0-9A-F]{2}>", token):
        return 6
    return 1


def tokenizer_metadata(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> dict:
    """The tokenizer as GGUF describes it: byte-level BPE ("gpt2") or byte-fallback BPE ("llama")."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model["type"] != "BPE":
        raise user_error(f"GGUF export supports BPE tokenizers; this one is {model['type']}", "MODEL_OR_RUN",
                         "use llama.cpp's convert_hf_to_gguf.py on the merged model")
    kind = "llama" if model.get("byte_fallback") else "gpt2"
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    tokens, types = [], []
    for i in range(vocab_size):  # embedding rows beyond the tokenizer's vocabulary are padding
        token = by_id.get(i)
        tokens.append(token if token is not None else f"[PAD{i}]")
        types.append(token_type(token, added.get(i), kind))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = json.dumps(spec.get("pre_tokenizer"))
    pre_name = ("smollm" if '"Digits"' in pre else "llama-bpe" if "\\\\p{N}{1,3}" in pre else
                "qwen2" if "\\\\p{N}|" in pre else "default" if kind == "llama" else "gpt-2")
    return {"model": kind, "pre": pre_name, "tokens": tokens, "token_types": types, "merges": merges,
            "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
            "unk": tokenizer.unk_token_id, "add_bos": bool(getattr(tokenizer, "add_bos_token", False)),
            "chat_template": tokenizer.chat_template}


def export_gguf(source: str, out: str, dtype: str = "f16", overwrite: bool = False,
                allow_pickle: bool = False) -> Path:
    """Write `out` (.gguf) from a run, adapter or model directory; f16 or q8_0 weights, f32 norms."""
    import gguf

    target = Path(out).expanduser()
    if target.suffix != ".gguf":
        raise user_error(f"{target} does not end in .gguf", "--out", "name the file like model.gguf")
    if target.exists() and not overwrite:
        raise user_error(f"{target} already exists", "--out", "choose another --out, or pass --overwrite")
    model, tokenizer, _ = load_merged(source, allow_pickle)
    arch = _check_supported(model.config)
    tok = tokenizer_metadata(tokenizer, model.config.vocab_size)
    with atomic_path(target) as tmp:
        _write_gguf(gguf.GGUFWriter(str(tmp), arch), model, tokenizer, tok, arch, dtype, Path(str(source)).name)
    return target


def _write_gguf(writer, model, tokenizer, tok: dict, arch: str, dtype: str, name: str) -> None:
    """Metadata (llama.cpp's keys), tokenizer and tensors, in the order llama.cpp's converter writes them."""
    import gguf
    import numpy as np

    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None)
                                    or (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if dtype == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model(tok["model"])
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["token_types"])
    if tok["merges"]:
        writer.add_token_merges(tok["merges"])
    else:  # a vocabulary without merges (every token a byte or a special): readers then rank by score
        writer.add_token_scores([0.0] * len(tok["tokens"]))
    for key, value in (("bos", tok["bos"]), ("eos", tok["eos"]), ("pad", tok["pad"]), ("unk", tok["unk"])):
        if value is not None and value < len(tok["tokens"]):  # an unset token can report an id past the end
            getattr(writer, f"add_{key}_token_id")(value)
    writer.add_add_bos_token(tok["add_bos"])
    if tok["chat_template"]:
        writer.add_chat_template(tok["chat_template"])
    tied = getattr(config, "tie_word_embeddings", False)
    for name, tensor in model.state_dict().items():
        gguf_name = gguf_tensor_name(name)
        if gguf_name is None or (tied and gguf_name == "output.weight"):
            continue
        data = tensor.float().numpy()
        if arch == "llama" and gguf_name.endswith("attn_q.weight"):
            data = llama_cpp_rows(data, heads)
        elif arch == "llama" and gguf_name.endswith("attn_k.weight"):
            data = llama_cpp_rows(data, kv_heads)
        if data.ndim == 1:
            writer.add_tensor(gguf_name, data.astype(np.float32))
        elif dtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            quantized = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name, data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
