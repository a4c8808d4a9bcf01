"""Side-by-side training benchmark: the seed recipe, TRL's SFTTrainer and instructkit, one after the other.

    python bench/bench.py                      # LoRA and full, 3 repeats each, writes bench/results.json + .md
    python bench/bench.py --methods lora --repeats 1 --steps 6

Same model (smollm2-135m-instruct), same data (the quickstart set, or --data), same number of optimizer steps and
the same tokens per step (packed variants get as many packed rows as hold the padded variants'
tokens). Each run is a fresh process, so peak RSS is its own. Steps 2..N are timed (step 1 warms up).

Reported per run: real (non-pad) tokens/s, supervised tokens/s, seconds per optimizer step, peak RSS,
final loss, and MFU: model FLOPs per second over a matmul peak measured on the spot. Model FLOPs are
counted the same way for every variant (`instructkit.metrics.training_flops`), so MFU ratios equal work-rate ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpu import Counter  # bench/gpu.py: the same batch counter (bench/, the script's folder, leads sys.path)
from instructkit.metrics import matmul_peak_tflops, training_flops

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples/data/train.jsonl"
MAX_LENGTH = 256
# name -> (runner, instructkit overrides); each runner trains and returns per-step records.
VARIANTS = {
    "seed": ("seed", []),
    "trl": ("trl", []),
    "instructkit": ("instructkit", []),
    "instructkit-packed": ("instructkit", ["data.packing=true"]),
    "instructkit-padded": ("instructkit", ["data.padding_free=false"]),  # where auto is padding-free: its gain
    "instructkit-bf16": ("instructkit", ["model.precision=bf16"]),
    "instructkit-fp32": ("instructkit", ["model.precision=fp32"]),  # where auto picks bf16: what that gains
    "instructkit-grouped": ("instructkit", ["train.group_by_length=true"]),
    "instructkit-compile": ("instructkit", ["train.compile=true", "train.group_by_length=true"]),
}


def rows(n: int) -> list[dict]:
    return [json.loads(line) for line in DATA.read_text().splitlines()[:n]]


def _trainer_records(trainer, counter: Counter) -> list[dict]:
    from transformers import TrainerCallback

    times, losses = [], {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            times.append([time.perf_counter(), None])

        def on_step_end(self, args, state, control, **kw):
            times[-1][1] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses[state.global_step] = logs["loss"]

    trainer.add_callback(Clock())
    trainer.train()
    return [{"step": i + 1, "seconds": t1 - t0, "tokens": tok, "supervised": sup, "loss": losses.get(i + 1)}
            for i, ((t0, t1), (tok, sup, _)) in enumerate(zip(times, counter.batches))]


def _lora(method: str):
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                      task_type="CAUSAL_LM") if method == "lora" else None


def run_seed(model_path: str, method: str, steps: int, batch: int, out: Path, _overrides) -> list[dict]:
    """The seed article's recipe: HF Trainer, the Alpaca template, labels = input ids, dynamic padding."""
    import datasets
    from peft import get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                              TrainingArguments)

    from instructkit.data.templates import ALPACA_PREAMBLE, ALPACA_PREAMBLE_INPUT

    tok = AutoTokenizer.from_pretrained(model_path)
    tok.pad_token = tok.pad_token or tok.eos_token

    def fmt(row):
        head = ALPACA_PREAMBLE_INPUT if row.get("input") else ALPACA_PREAMBLE
        text = head + f"### Instruction:\n{row['instruction']}\n\n"
        text += f"### Input:\n{row['input']}\n\n" if row.get("input") else ""
        return tok(text + f"### Response:\n{row['output']}{tok.eos_token}", truncation=True, max_length=MAX_LENGTH)

    data = datasets.Dataset.from_list(rows(steps * batch))
    data = data.map(fmt, remove_columns=data.column_names)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    if method == "lora":
        model = get_peft_model(model, _lora(method))
    counter = Counter(DataCollatorForLanguageModeling(tok, mlm=False))
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps,
                             learning_rate=2e-4, logging_steps=1, save_strategy="no", report_to=[],
                             dataloader_num_workers=0, seed=42, disable_tqdm=True)
    return _trainer_records(Trainer(model=model, args=args, train_dataset=data, data_collator=counter), counter)


def run_trl(model_path: str, method: str, steps: int, batch: int, out: Path, _overrides) -> list[dict]:
    """TRL SFTTrainer: prompt/completion, completion-only loss, packing with padding-free batches."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from instructkit.data.templates import ALPACA_PREAMBLE, ALPACA_PREAMBLE_INPUT

    tok = AutoTokenizer.from_pretrained(model_path)
    examples = []
    for row in rows(steps * batch):
        head = ALPACA_PREAMBLE_INPUT if row.get("input") else ALPACA_PREAMBLE
        prompt = head + f"### Instruction:\n{row['instruction']}\n\n"
        prompt += f"### Input:\n{row['input']}\n\n" if row.get("input") else ""
        examples.append({"prompt": prompt + "### Response:\n", "completion": row["output"] + tok.eos_token})
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=packed_rows(batch), max_steps=steps,
                     learning_rate=2e-4, logging_steps=1, save_strategy="no", report_to=[], packing=True,
                     padding_free=True, completion_only_loss=True, max_length=MAX_LENGTH, seed=42, disable_tqdm=True,
                     bf16=False, fp16=False)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_path), args=args, processing_class=tok,
                         train_dataset=datasets.Dataset.from_list(examples), peft_config=_lora(method))
    counter = Counter(trainer.data_collator)
    trainer.data_collator = counter
    return _trainer_records(trainer, counter)


def packed_rows(batch: int) -> int:
    """Packed rows of MAX_LENGTH that hold about as many tokens as `batch` padded examples."""
    lengths = [len(json.dumps(r)) / 4 + 45 for r in rows(64)]  # rough token estimate, refined below
    try:
        from instructkit.models import load_tokenizer, resolve_model

        tok = load_tokenizer(resolve_model("smollm2-135m-instruct"))
        lengths = [len(tok(r["instruction"] + r.get("input", "") + r["output"]).input_ids) + 45 for r in rows(64)]
    except Exception:  # noqa: BLE001 - the estimate is good enough without a tokenizer
        pass
    return max(1, round(batch * statistics.mean(lengths) / MAX_LENGTH))


def run_instructkit(model_path: str, method: str, steps: int, batch: int, out: Path, overrides) -> list[dict]:
    import yaml

    from instructkit.config import load_config
    from instructkit.metrics import read_metrics
    from instructkit.train import train

    data = out / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(steps * batch)))
    packed = "data.packing=true" in overrides
    cfg = {"run_name": "bench", "output_dir": str(out / "run"), "seed": 42,
           "model": {"name_or_path": "smollm2-135m-instruct"}, "method": method,
           "lora": {"r": 8, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
           "data": {"train_file": str(data), "template": "alpaca", "max_length": MAX_LENGTH, "cache": False,
                    "overlength": "truncate"},  # as the seed and TRL runs cut long rows
           "train": {"per_device_train_batch_size": packed_rows(batch) if packed else batch,
                     "gradient_accumulation_steps": 1, "max_steps": steps, "learning_rate": 2e-4, "warmup_ratio": 0,
                     "logging_steps": 1, "save_strategy": "no", "report_to": []}}
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    train(load_config(path, list(overrides)), overwrite=True)
    # precision: auto resolves per machine (bf16 where it measures faster); MFU needs what the run used
    precision = json.loads((out / "run/manifest.json").read_text())["precision"]
    return [{"step": m["step"], "seconds": m["elapsed_s"], "tokens": round(m["tokens_per_s"] * m["elapsed_s"]),
             "supervised": m["supervised_tokens"], "loss": m["loss"], "precision": precision}
            for m in read_metrics(out / "run") if "loss" in m]


RUNNERS = {"seed": run_seed, "trl": run_trl, "instructkit": run_instructkit}


def one(variant: str, method: str, steps: int, batch: int) -> dict:
    """Run one variant in this process and summarise it."""
    from transformers import AutoConfig

    from instructkit.models import resolve_model

    model_path = resolve_model("smollm2-135m-instruct")
    runner, overrides = VARIANTS[variant]
    with tempfile.TemporaryDirectory() as tmp:
        records = RUNNERS[runner](model_path, method, steps, batch, Path(tmp), overrides)
    timed = records[1:]  # step 1 warms up
    seconds = sum(r["seconds"] for r in timed)
    tokens, supervised = sum(r["tokens"] for r in timed), sum(r["supervised"] for r in timed)
    context = tokens / max(len(timed), 1) / max(batch, 1)
    flops = training_flops(AutoConfig.from_pretrained(model_path), method, tokens, supervised, context)
    losses = [r["loss"] for r in records if r["loss"] is not None]
    precision = {"bf16": "bfloat16", "fp16": "float16"}.get(records[-1].get("precision"), "float32")
    return {"variant": variant, "method": method, "precision": precision, "steps": len(records),
            "tokens_per_s": tokens / seconds,
            "supervised_tokens_per_s": supervised / seconds, "s_per_step": statistics.median(r["seconds"] for r in timed),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "final_loss": losses[-1] if losses else None,
            "model_tflops_per_s": flops / seconds / 1e12}


def markdown(results: list[dict], peaks: dict, command: str) -> str:
    lines = [f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
             f"date {time.strftime('%Y-%m-%d')}; command: `{command}`",
             f"Measured matmul peak: fp32 {peaks['float32']:.3g} TFLOP/s, bf16 {peaks['bfloat16']:.3g} TFLOP/s.", ""]
    for method in sorted({r["method"] for r in results}):
        rows_ = [r for r in results if r["method"] == method]
        base = {r["variant"]: r for r in rows_}
        lines += [f"### {method}", "", "| variant | real tok/s | supervised tok/s | s/step | peak RSS MB | final loss "
                  "| MFU (own precision) | MFU vs best peak | vs seed | vs trl | runs (tok/s) |", "|" + " --- |" * 11]
        for r in rows_:
            mfu32 = r["model_tflops_per_s"] / peaks[r["precision"]]
            mfu16 = r["model_tflops_per_s"] / max(peaks.values())
            ratio = lambda other: f"{r['tokens_per_s'] / base[other]['tokens_per_s']:.2f}x" if other in base else "-"  # noqa: E731
            loss = f"{r['final_loss']:.3f}" if r["final_loss"] is not None else "-"
            lines.append(f"| {r['variant']} | {r['tokens_per_s']:.0f} | {r['supervised_tokens_per_s']:.1f} | "
                         f"{r['s_per_step']:.2f} | {r['peak_rss_mb']:.0f} | {loss} | {mfu32:.1%} | {mfu16:.1%} | "
                         f"{ratio('seed')} | {ratio('trl')} | {', '.join(f'{x:.0f}' for x in r['runs'])} |")
        lines.append("")
    return "\n".join(lines)


def median_of(runs: list[dict]) -> dict:
    middle = sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]
    return {**middle, "runs": [r["tokens_per_s"] for r in runs]}


def main() -> None:
    global DATA, MAX_LENGTH
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "bench/results"))
    parser.add_argument("--data", default=str(DATA), help="Alpaca-style JSONL (default: the quickstart set; "
                        "bench/make_alpaca_rows.py writes long-tailed rows)")
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH)
    args = parser.parse_args()
    DATA, MAX_LENGTH = Path(args.data), args.max_length
    if args.one:
        variant, method = args.one.split(":")
        print("RESULT " + json.dumps(one(variant, method, args.steps, args.batch)), flush=True)
        return
    peaks = {d: matmul_peak_tflops(d, size=2048, reps=8) for d in ("float32", "bfloat16")}
    results = []
    for method in args.methods.split(","):
        for variant in args.variants.split(","):
            runs = []
            for repeat in range(args.repeats):
                proc = subprocess.run([sys.executable, __file__, "--one", f"{variant}:{method}", "--steps",
                                       str(args.steps), "--batch", str(args.batch), "--data", args.data,
                                       "--max-length", str(args.max_length)], capture_output=True, text=True,
                                      env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
                found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if proc.returncode != 0 or not found:
                    sys.exit(f"{variant}/{method} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
                runs.append(json.loads(found[0][7:]))
                print(f"{method} {variant} run {repeat + 1}: {runs[-1]['tokens_per_s']:.0f} tok/s", flush=True)
            results.append(median_of(runs))
    command = "python bench/bench.py " + " ".join(sys.argv[1:])
    Path(args.out + ".json").write_text(json.dumps({"peaks": peaks, "results": results, "command": command}, indent=1))
    Path(args.out + ".md").write_text(markdown(results, peaks, command.strip()))
    print(markdown(results, peaks, command.strip()))


if __name__ == "__main__":
    main()
