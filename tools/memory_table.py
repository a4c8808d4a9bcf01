"""The README's memory table: `instructkit estimate` for Llama-2 7B/13B/70B shapes on 8 GPUs.

    python tools/memory_table.py

The shapes are the published Llama-2 configs (no download: the configs are written here); batch 1 x
2048 tokens, bf16, gradient checkpointing on, LoRA r=16 on all linear layers.
"""

from __future__ import annotations

import tempfile

from transformers import LlamaConfig

from instructkit.config import RunConfig
from instructkit.estimate import GIB, estimate_table

SHAPES = {  # hidden, intermediate, layers, heads, kv heads
    "7B": (4096, 11008, 32, 32, 32),
    "13B": (5120, 13824, 40, 40, 40),
    "70B": (8192, 28672, 80, 64, 8),
}
LABELS = {"ddp": "DDP", "zero2": "ZeRO-2", "fsdp": "FSDP / ZeRO-3"}
COLUMNS = [("full", "ddp"), ("full", "zero2"), ("full", "fsdp"), ("lora", "ddp"), ("lora", "fsdp"), ("qlora", "ddp")]


def main() -> None:
    print("| model | " + " | ".join(f"{m} {LABELS[s]}" for m, s in COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for name, (hidden, inter, layers, heads, kv) in SHAPES.items():
        with tempfile.TemporaryDirectory() as tmp:
            LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv).save_pretrained(tmp)
            cfg = RunConfig.model_validate({
                "model": {"name_or_path": tmp, "precision": "bf16", "gradient_checkpointing": True},
                "lora": {"r": 16, "target_modules": "all-linear"},
                "data": {"train_file": "unused.jsonl", "max_length": 2048},
                "train": {"per_device_train_batch_size": 1}})
            table = estimate_table(cfg, 8, 80 * GIB)
        cells = {(r["method"], r["strategy"]): r["bytes"] / GIB for r in table["rows"]}
        print(f"| Llama-2 {name} | " + " | ".join(f"{cells[c]:.0f} GiB" for c in COLUMNS) + " |")


if __name__ == "__main__":
    main()
