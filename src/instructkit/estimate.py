"""`instructkit estimate`: the expected peak memory per device of a config's training, under full,
LoRA and QLoRA fine-tuning and DDP, FSDP, ZeRO-2 and ZeRO-3, and which choices fit.

The model is built on the meta device from its config (nothing is downloaded beyond config.json),
so parameter counts are exact; activations come from the decoder's shapes at the configured batch
and length. The per-token activation coefficients were measured on Llama-architecture models with
saved-tensor hooks (see `activation_elements`), and the whole estimate is checked against measured
peak memory of real training steps on CPU (tests/integration/test_estimate.py, bench/memory.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from instructkit.config import RunConfig
from instructkit.errors import user_error

GIB = 1024**3
METHODS = ("full", "lora", "qlora")
STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")
LOSS_CHUNK = 1024  # tokens whose logits the loss holds at once (loss.SupervisedLoss.chunk_tokens)
MATMUL_MAX_SCORES = 3 * 2**20  # cpu_kernels.MATMUL_MAX_SCORES (that module imports torch; this one does not)
CUDA_CONTEXT = 0.75 * GIB  # CUDA context, cuBLAS/NCCL workspaces: paid once per GPU process


@dataclass(frozen=True)
class Shape:
    """What memory depends on, counted on the meta-device model."""

    total: int  # parameters
    not_quantized: int  # embeddings, untied LM head, norms: QLoRA keeps these in 16 bit
    largest_unit: int  # parameters of one decoder layer (FSDP / ZeRO-3 gather one or two at a time)
    lora: int  # trainable parameters of the config's LoRA adapter
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int
    heads: int
    vocab: int
    # input features of the LoRA-adapted linears of one decoder layer: each keeps its (dropped-out) input
    lora_inputs: int = 0
    # the same when peft does not copy them (no dropout, adapter in the compute dtype): inputs shared by
    # several adapted linears (q/k/v, gate/up) are kept once
    lora_shared_inputs: int = 0


def model_shape(cfg: RunConfig) -> Shape:
    import torch
    from transformers import AutoModelForCausalLM

    from instructkit.models import apply_lora, check_remote_code, load_model_config, training_source

    check_remote_code(cfg.model)
    path = training_source(cfg.model.name_or_path, cfg.model.allow_pickle).path
    try:
        config = load_model_config(path, cfg.model.trust_remote_code, cfg.model.revision)
    except (OSError, ValueError) as exc:
        raise user_error(f"cannot read the model config of {path} ({exc})", "model.name_or_path",
                         "give a model directory with a config.json, or a hub id reachable from here") from exc
    config.__dict__.pop("quantization_config", None)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
        total = sum(p.numel() for p in model.parameters())
        linear = sum(m.weight.numel() for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings())
        layer_types = set(getattr(model, "_no_split_modules", None) or [])
        units = [sum(p.numel() for p in m.parameters()) for m in model.modules() if type(m).__name__ in layer_types]
        lora = apply_lora(model, cfg.lora)
        adapter = sum(p.numel() for p in lora.parameters() if p.requires_grad)
        adapted = [m for n, m in lora.named_modules() if hasattr(m, "lora_A") and ".layers.0." in f".{n}."]
        lora_inputs = sum(m.in_features for m in adapted)
        shared = {SHARED_INPUT.get(n.rsplit(".", 1)[-1], n): m.in_features for n, m in lora.named_modules()
                  if hasattr(m, "lora_A") and ".layers.0." in f".{n}."}
        lora_shared_inputs = sum(shared.values())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return Shape(total=total, not_quantized=total - linear, largest_unit=max(units, default=total), lora=adapter,
                 lora_inputs=lora_inputs, lora_shared_inputs=lora_shared_inputs,
                 layers=text.num_hidden_layers, hidden=text.hidden_size, intermediate=text.intermediate_size,
                 kv_dim=getattr(text, "num_key_value_heads", heads) * head_dim, heads=heads, vocab=text.vocab_size)


# Linears that read the same input tensor (the attention's and the MLP's normed input).
SHARED_INPUT = {"q_proj": "attention input", "k_proj": "attention input", "v_proj": "attention input",
                "gate_proj": "mlp input", "up_proj": "mlp input"}


def activation_elements(shape: Shape, method: str, copies: bool = True) -> int:
    """Elements autograd keeps per token per decoder layer. Measured with saved-tensor hooks on
    SmolLM2 (sdpa): full fine-tuning 11,197 vs 8h + 2kv + 4I = 11,136; LoRA on q/v 9,600 vs
    4h + 4I + 2h (the two adapted inputs) = 9,600: frozen linears keep no inputs, adapted ones keep theirs."""
    h, kv, inter = shape.hidden, shape.kv_dim, shape.intermediate
    if method == "full":
        return 8 * h + 2 * kv + 4 * inter
    if not copies:  # lora.dropout 0 in fp32: the adapters save the layer's own input tensors
        return 4 * h + 4 * inter + (shape.lora_shared_inputs or h)
    return 4 * h + 4 * inter + (shape.lora_inputs or 2 * h)


def breakdown(shape: Shape, method: str, strategy: str, world: int, compute_bytes: int, batch: int, length: int,
              checkpointing: bool, eager_attention: bool = False, gpu: bool = True,
              input_copies: bool = True) -> dict[str, float]:
    """Bytes per device by kind: weights, gradients, optimizer, activations, overhead (see `peak`)."""
    p, trainable = shape.total, (shape.total if method == "full" else shape.lora)
    if method == "full":  # fp32 master weights; autocast caches a 16-bit copy during forward
        weights = 4 * p + (2 * p if compute_bytes == 2 else 0)
    elif method == "lora":
        weights = compute_bytes * p + 4 * shape.lora  # adapters are kept in fp32
    else:  # NF4 with double quantisation: 4 bits plus about 0.127 bits of constants per weight
        weights = (p - shape.not_quantized) * (4.127 / 8) + 2 * shape.not_quantized + 4 * shape.lora
    gradients, optimizer = 4 * trainable, 8 * trainable  # fp32 gradients; AdamW's two fp32 moments
    sharded_params = strategy in ("fsdp", "zero3")
    if sharded_params:
        weights = weights / world + 2 * shape.largest_unit * compute_bytes  # this unit and the prefetched next
    if strategy != "ddp":
        gradients, optimizer = gradients / world, optimizer / world
    tokens = batch * length
    per_layer = activation_elements(shape, method, input_copies) * tokens * compute_bytes
    if checkpointing:  # each layer's input is kept; one layer is recomputed at a time in backward
        activations = shape.layers * tokens * shape.hidden * compute_bytes + per_layer
    else:
        activations = shape.layers * per_layer
    if eager_attention:  # eager attention materialises batch x heads x length^2 scores per layer
        activations += (1 if checkpointing else shape.layers) * 2 * batch * shape.heads * length**2 * compute_bytes
    # the loss: one chunk of fp32 logits with its softmax and gradient, and the hidden states it reads;
    # in backward, one layer's activation gradients (MLP-wide) exist on top of what is saved
    activations += 3 * min(tokens, LOSS_CHUNK) * shape.vocab * 4 + tokens * shape.hidden * compute_bytes
    activations += (2 * shape.intermediate + 2 * shape.hidden) * tokens * compute_bytes
    overhead = CUDA_CONTEXT if gpu else 0.0
    return {"weights": weights, "gradients": gradients, "optimizer": optimizer, "activations": activations,
            "overhead": overhead}


def peak(parts: dict[str, float]) -> float:
    """Gradients are created as backward frees the activations, so the two peak one after the other:
    weights + optimizer state + the larger of them (+ overhead)."""
    return parts["weights"] + parts["optimizer"] + max(parts["activations"], parts["gradients"]) + parts["overhead"]


def parse_memory(text: str) -> float:
    """'80GB', '80GiB', '24G', '40' (GiB) -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*(G|GB|GiB|M|MB|MiB|T|TB|TiB)?\s*", text, re.IGNORECASE)
    if not match:
        raise user_error(f"cannot read the memory size {text!r}", "--gpu-memory", "write it like 80GB or 24GiB")
    unit = (match.group(2) or "G")[0].upper()
    return float(match.group(1)) * {"M": 1024**2, "G": GIB, "T": 1024**4}[unit]


def estimate_table(cfg: RunConfig, gpus: int, gpu_memory: float | None, shape: Shape | None = None,
                   gpu: bool = True) -> dict:
    """Per-device peak for every method x strategy at the config's batch, length and precision."""
    shape = shape or model_shape(cfg)
    compute_bytes = 4 if cfg.model.precision == "fp32" or (not gpu and cfg.model.precision == "auto") else 2
    # A preference micro-batch of B pairs runs 2B sequences (chosen and rejected) through one forward pass;
    # DPO's reference log-probs are computed before training, so no second model is held.
    sequences = cfg.train.per_device_train_batch_size * (1 if cfg.objective == "sft" else 2)
    # bf16 on a CPU: attention of small score tensors runs as matmuls that keep the L x L weights, and so do a
    # packed row's examples, attended in small batches (cpu_kernels.py): at most the padded batch's scores
    matmul_attention = (not gpu and compute_bytes == 2 and cfg.model.attn_implementation == "auto"
                        and (cfg.data.packing or sequences * shape.heads * cfg.data.max_length**2 <= MATMUL_MAX_SCORES))
    rows = []
    for method in METHODS if gpu else ("full", "lora"):  # QLoRA's 4-bit kernels need CUDA
        for strategy in STRATEGIES:
            if gpus == 1 and strategy != "ddp":
                continue  # one device: sharding has nothing to spread over
            parts = breakdown(shape, method, strategy, gpus, compute_bytes, sequences, cfg.data.max_length,
                              cfg.model.gradient_checkpointing,
                              cfg.model.attn_implementation == "eager" or matmul_attention, gpu,
                              # peft copies an adapted input for dropout, or to cast it to the fp32 adapter
                              input_copies=cfg.lora.dropout > 0 or compute_bytes != 4)
            total = peak(parts)
            rows.append({"method": method, "strategy": strategy if gpus > 1 else "single", "bytes": total,
                         "parts": parts, "fits": None if gpu_memory is None else total <= gpu_memory})
    return {"parameters": shape.total, "trainable_lora": shape.lora, "gpus": gpus, "gpu_memory": gpu_memory,
            "batch": cfg.train.per_device_train_batch_size, "sequences": sequences, "objective": cfg.objective,
            "length": cfg.data.max_length,
            "compute_bytes": compute_bytes, "gradient_checkpointing": cfg.model.gradient_checkpointing, "rows": rows}


def format_table(table: dict, configured: tuple[str, str]) -> str:
    gib = lambda b: f"{b / GIB:.1f}"  # noqa: E731
    lines = [f"model: {table['parameters'] / 1e9:.2f}B parameters (LoRA adapter {table['trainable_lora'] / 1e6:.1f}M); "
             f"batch {table['batch']}"
             + (f" pairs ({table['sequences']} sequences)" if table["sequences"] != table["batch"] else "")
             + f" x length {table['length']}, {8 * table['compute_bytes']}-bit compute, gradient "
             f"checkpointing {'on' if table['gradient_checkpointing'] else 'off'}; {table['gpus']} device(s)"
             + (f" of {gib(table['gpu_memory'])} GiB" if table["gpu_memory"] else ""),
             "", f"{'method':<7}{'strategy':<9}{'GiB/device':>11}{'weights':>9}{'grads':>8}{'optim':>8}{'activ':>8}  fits",
             ]
    for row in table["rows"]:
        p = row["parts"]
        mark = " <- config" if (row["method"], row["strategy"]) == configured else ""
        fits = "-" if row["fits"] is None else ("yes" if row["fits"] else "no")
        lines.append(f"{row['method']:<7}{row['strategy']:<9}{gib(row['bytes']):>11}{gib(p['weights']):>9}"
                     f"{gib(p['gradients']):>8}{gib(p['optimizer']):>8}{gib(p['activations']):>8}  {fits}{mark}")
    fitting = [r for r in table["rows"] if r["fits"]]
    if table["gpu_memory"]:
        lines.append("")
        lines.append("fits: " + (", ".join(f"{r['method']}/{r['strategy']}" for r in fitting) if fitting else
                                 "nothing at this batch and length: lower per_device_train_batch_size or "
                                 "data.max_length, turn on model.gradient_checkpointing, or add GPUs"))
    return "\n".join(lines)


def report(cfg: RunConfig, gpus: int = 0, gpu_memory: str | None = None, as_json: bool = False) -> str:
    """`instructkit estimate`: for the visible GPUs unless told otherwise; on a machine without GPUs
    and without --gpus/--gpu-memory, for training on this CPU."""
    import json

    import torch

    cuda = torch.cuda.is_available()
    gpu = bool(gpus or gpu_memory or cuda)
    gpus = gpus or (torch.cuda.device_count() if cuda else 1)
    memory = parse_memory(gpu_memory) if gpu_memory else (
        torch.cuda.get_device_properties(0).total_memory if cuda else None)
    table = estimate_table(cfg, gpus, memory, gpu=gpu)
    if as_json:
        return json.dumps(table, indent=1)
    method = "qlora" if cfg.model.load_in_4bit else cfg.method
    engine = cfg.distributed.strategy
    strategy = ("single" if gpus == 1 else "fsdp" if engine == "fsdp" else
                ("zero2" if cfg.distributed.deepspeed_config == "zero2" else "zero3") if engine == "deepspeed" else "ddp")
    return format_table(table, (method, strategy))
