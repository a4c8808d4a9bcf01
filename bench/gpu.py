"""GPU training benchmark pieces, on random-initialised Llama-architecture models built from configs (nothing is
downloaded).

    bash bench/gpu.sh                  # the step benchmark on one H100/H200: 135M and 1B, full and LoRA, < 8 minutes
    python bench/gpu.py --smoke        # a few steps of a tiny model on the CPU (what the test runs)
    python bench/gpu.py build|baseline|probe ...   # the parts bench/gpu_check.py runs (see their --help)

The step benchmark times instructkit's training step (the supervised-position loss, packed padding-free rows
with restarting position_ids, AdamW fused on CUDA, bf16 autocast over fp32 master weights for full fine-tuning,
bf16 base weights for LoRA) and reports tokens/s, MFU against the card's bf16 matmul peak measured on the spot,
and peak memory. flash-attn is used when installed, sdpa otherwise.

For the GPU check: `build` saves random models with a tokenizer and measures the matmul peaks, `baseline` runs
the seed article's recipe (HF Trainer) or TRL's SFTTrainer on the same model and rows and prints per-step
records, `probe` says which optional packages import.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

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




# ---- the parts bench/gpu_check.py runs, each in its own process ----

OPTIONAL = ("pydantic", "yaml", "datasets", "gguf", "rouge_score", "fastapi", "uvicorn", "trl", "liger_kernel",
            "bitsandbytes", "flash_attn", "triton", "peft", "accelerate", "transformers", "torch")


def probe() -> dict:
    """module -> its version, or why it does not import (installed is not the same as usable)."""
    import importlib

    found = {}
    for name in OPTIONAL:
        try:
            found[name] = {"ok": True, "version": getattr(importlib.import_module(name), "__version__", "?")}
        except Exception as exc:  # noqa: BLE001 - any failure is a reason to skip what needs it
            found[name] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    import torch

    if torch.cuda.is_available():  # Liger's Triton kernels import fully only where CUDA is
        from instructkit.kernels import liger_support

        support = liger_support()
        found["liger_kernel"]["usable"] = not isinstance(support, str)
        found["liger_kernel"]["why"] = support if isinstance(support, str) else "supports llama"
    return {"modules": found, "cuda": torch.cuda.is_available()}


def load_tokenizer_from(source: str):
    """`byte`: the tests' byte-level tokenizer (one token per byte); else a tokenizer directory."""
    if source == "byte":
        sys.path.insert(0, str(ROOT))
        from tests.conftest import make_byte_tokenizer

        return make_byte_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


def alpaca_prompt(row: dict) -> str:
    """The seed article's Alpaca prompt (up to '### Response:'), as the seed recipe and TRL are given it."""
    from instructkit.data.templates import ALPACA_PREAMBLE, ALPACA_PREAMBLE_INPUT

    text = ALPACA_PREAMBLE_INPUT if row.get("input") else ALPACA_PREAMBLE
    text += f"### Instruction:\n{row['instruction']}\n\n"
    return text + (f"### Input:\n{row['input']}\n\n" if row.get("input") else "") + "### Response:\n"


def build_model(size: str, tokenizer, source: str, out: Path, device: str) -> dict:
    """Save a randomly initialised model of `size` (bf16 on CUDA) with the tokenizer: the 135m size takes the
    source's own config.json (SmolLM2's) where there is one."""
    import torch
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    own = Path(source) / "config.json"
    if size == "135m" and own.is_file():
        config = AutoConfig.from_pretrained(source)
    else:
        vocab = -(-len(tokenizer) // 64) * 64
        config = LlamaConfig(**{**SIZES[size], "vocab_size": vocab}, max_position_embeddings=4096,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16 if device == "cuda" else torch.float32).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1), "vocab": config.vocab_size,
            "layers": config.num_hidden_layers, "hidden": config.hidden_size, "path": str(out)}


def matmul_peaks(device: str) -> dict:
    """Measured matmul TFLOP/s (best of 3): bf16 and fp16 at 8192 on CUDA, fp32 and bf16 at 512 on a CPU."""
    from instructkit.metrics import matmul_peak_tflops

    names, size = (("bfloat16", "float16"), 8192) if device == "cuda" else (("float32", "bfloat16"), 512)
    return {n: round(matmul_peak_tflops(n, device, size=size, reps=10), 2) for n in names}


def build(source: str, sizes: list[str], out: Path, data: Path) -> dict:
    """The part `setup`: models, the mean example length of the rows (for attention FLOPs) and the peaks."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer_from(source)
    models = {size: build_model(size, tokenizer, source, out / size, device) for size in sizes}
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    lengths = [len(tokenizer(alpaca_prompt(r) + r["output"]).input_ids) + 1 for r in rows]
    return {"device": device, "tokenizer": source, "models": models, "examples": len(rows),
            "mean_example_tokens": round(sum(lengths) / len(lengths), 1), "max_example_tokens": max(lengths),
            "peak_tflops": matmul_peaks(device)}


class Counter:
    """Wraps a data collator; records each micro-batch's real tokens, supervised targets and examples."""

    def __init__(self, collate):
        self.collate, self.batches = collate, []

    def __call__(self, features):
        batch = self.collate(features)
        labels = batch["labels"]
        real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(labels.numel())
        examples = int((batch["position_ids"] == 0).sum()) if "position_ids" in batch else labels.shape[0]
        self.batches.append((real, int((labels[:, 1:] != -100).sum()), examples))
        return batch


def timed_train(trainer, counter: Counter, accumulation: int) -> dict:
    """Train; per optimizer step its seconds and its micro-batches' counts; the last loss; peak GPU memory."""
    import torch
    from transformers import TrainerCallback

    ends, losses = [], []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    trainer.add_callback(Clock())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    records = []
    for step in range(len(ends) - 1):
        group = counter.batches[step * accumulation:(step + 1) * accumulation]
        records.append({"seconds": ends[step + 1] - ends[step], "tokens": sum(g[0] for g in group),
                        "supervised": sum(g[1] for g in group), "examples": sum(g[2] for g in group)})
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None
    return {"records": records, "loss": losses[-1] if losses else None, "peak_mem_gib": peak}


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def run_seed(args, rows: list[dict]) -> dict:
    """The seed article's recipe: HF Trainer, Alpaca prompts, labels = input ids, padding to the longest in each
    batch of 4, accumulation 8, lr 2e-5, fp16 autocast over fp32 weights, LoRA r8 on q/v."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tok = load_tokenizer_from(args.model)
    tok.pad_token = tok.pad_token or tok.eos_token
    data = [tok(alpaca_prompt(r) + r["output"] + tok.eos_token, truncation=True, max_length=args.max_length)
            for r in rows]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = get_peft_model(model, _lora()) if args.method == "lora" else model
    counter = Counter(DataCollatorForLanguageModeling(tok, mlm=False))
    targs = TrainingArguments(output_dir=str(args.out), per_device_train_batch_size=args.batch,
                              gradient_accumulation_steps=args.accum, num_train_epochs=1, learning_rate=2e-5,
                              fp16=args.precision == "fp16", bf16=args.precision == "bf16", logging_steps=1,
                              save_strategy="no", report_to=[], seed=42, disable_tqdm=True)
    return timed_train(Trainer(model=model, args=targs, train_dataset=data, data_collator=counter), counter, args.accum)


def run_trl(args, rows: list[dict]) -> dict:
    """TRL's SFTTrainer as its docs set it up: prompt/completion rows, completion-only loss, packing into
    padding-free rows of max_length, the model in bf16 (fp32 on a CPU), LoRA r8 on q/v; gradient checkpointing
    off like the instructkit run it is compared with."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    tok = load_tokenizer_from(args.model)
    examples = [{"prompt": alpaca_prompt(r), "completion": r["output"] + tok.eos_token} for r in rows]
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    targs = SFTConfig(output_dir=str(args.out), per_device_train_batch_size=args.batch,
                      gradient_accumulation_steps=args.accum, num_train_epochs=1, learning_rate=2e-4, logging_steps=1,
                      save_strategy="no", report_to=[], packing=True, padding_free=True, completion_only_loss=True,
                      max_length=args.max_length, seed=42, disable_tqdm=True, bf16=args.precision == "bf16",
                      fp16=False, gradient_checkpointing=False)  # as instructkit's run (TRL's default is on)
    trainer = SFTTrainer(model=model, args=targs, processing_class=tok,
                         train_dataset=datasets.Dataset.from_list(examples),
                         peft_config=_lora() if args.method == "lora" else None)
    counter = Counter(trainer.data_collator)
    trainer.data_collator = counter
    return timed_train(trainer, counter, args.accum)


def part_main(argv: list[str]) -> None:
    """python bench/gpu.py build|baseline|probe ...: prints one line `RESULT {json}`."""
    parser = argparse.ArgumentParser(prog="bench/gpu.py")
    sub = parser.add_subparsers(dest="part", required=True)
    sub.add_parser("probe")
    b = sub.add_parser("build")
    b.add_argument("--tokenizer", default="byte")
    b.add_argument("--sizes", default="tiny")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--data", type=Path, required=True)
    r = sub.add_parser("baseline")
    r.add_argument("runner", choices=["seed", "trl"])
    for name, kind in (("--model", str), ("--data", Path), ("--out", Path), ("--method", str),
                       ("--precision", str), ("--batch", int), ("--accum", int), ("--max-length", int)):
        r.add_argument(name, type=kind, required=True)
    args = parser.parse_args(argv)
    if args.part == "probe":
        result = probe()
    elif args.part == "build":
        result = build(args.tokenizer, args.sizes.split(","), args.out, args.data)
    else:
        rows = [json.loads(line) for line in args.data.read_text().splitlines()]
        result = (run_seed if args.runner == "seed" else run_trl)(args, rows)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("build", "baseline", "probe"):
        part_main(sys.argv[1:])
    else:
        main()
