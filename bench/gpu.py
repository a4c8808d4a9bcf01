"""GPU training benchmark: random-initialised Llama-architecture models (about 135M and 1B parameters,
built from configs: nothing is downloaded), packed rows of 2048 tokens, bf16, full and LoRA.

    bash bench/gpu.sh                  # on one H100/H200: both sizes, full and LoRA, under 8 minutes
    python bench/gpu.py --smoke        # a few steps of a tiny model on the CPU (what the test runs)

It times instructkit's training step (the supervised-position loss, packed padding-free rows with
restarting position_ids, AdamW fused on CUDA, bf16 autocast over fp32 master weights for full
fine-tuning, bf16 base weights for LoRA) and reports tokens/s, MFU against the card's bf16 matmul peak
measured on the spot, and peak memory. flash-attn is used when installed, sdpa otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time

SIZES = {
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
}


def packed_row(length: int, vocab: int, example: int, device):
    """One padding-free row of `length` tokens: examples of `example` tokens, half of each supervised."""
    import torch

    ids = torch.randint(0, vocab, (1, length), device=device)
    positions = (torch.arange(length, device=device) % example).unsqueeze(0)
    labels = ids.clone()
    labels[(positions < example // 2)] = -100
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def run(size: str, method: str, device: str, length: int, steps: int, warmup: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from instructkit.loss import SupervisedLoss, count_supervised
    from instructkit.metrics import device_stats, matmul_peak_tflops, training_flops

    cuda = device.startswith("cuda")
    attn = "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") else "sdpa"
    config = LlamaConfig(**SIZES[size], max_position_embeddings=length, attn_implementation=attn)
    half = torch.bfloat16 if cuda else torch.float32
    model = LlamaForCausalLM(config).to(device=device, dtype=half if method == "lora" else torch.float32)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                                 task_type="CAUSAL_LM"))
    loss_fn = SupervisedLoss(model).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=cuda or None)
    batch = packed_row(length, config.vocab_size, 512 if length >= 1024 else max(length // 4, 2), device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
            loss = loss_fn(**batch) / max(count_supervised(batch), 1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    seconds = sum(times)
    tokens, supervised = length * steps, count_supervised(batch) * steps
    flops = training_flops(config, method, tokens, supervised, context=512 if length >= 1024 else length / 4)
    peak = matmul_peak_tflops("bfloat16" if cuda else "float32", device, size=8192 if cuda else 512)
    parameters = sum(p.numel() for p in model.parameters())
    return {"size": size, "parameters_m": round(parameters / 1e6), "method": method, "attention": attn,
            "tokens_per_s": round(tokens / seconds), "mfu": round(flops / seconds / 1e12 / peak, 3),
            "peak_tflops": round(peak, 1), "loss": round(float(loss), 3), **device_stats(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, CPU, 2 steps")
    parser.add_argument("--sizes", default="135m,1b")
    parser.add_argument("--methods", default="full,lora")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    if args.smoke:
        results = [run("tiny", m, "cpu", 64, 2, 1) for m in ("full", "lora")]
    else:
        results = [run(s, m, "cuda", args.length, args.steps, 3) for s in args.sizes.split(",")
                   for m in args.methods.split(",")]
    print("| model | method | attention | tokens/s | MFU (bf16 peak) | peak memory GiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['size']} ({r['parameters_m']}M) | {r['method']} | {r['attention']} | {r['tokens_per_s']} | "
              f"{r['mfu']:.1%} | {r.get('gpu_mem_peak_gib', '-')} |")
    print("JSON " + json.dumps(results))


if __name__ == "__main__":
    main()
