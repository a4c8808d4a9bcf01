"""Padded micro-batches against the same micro-batches padding-free (data.padding_free), interleaved in one process.

    python bench/padding_free.py                                   # the quickstart's rows and settings
    python bench/make_alpaca_rows.py --rows 300 --out /tmp/alpaca300.jsonl
    python bench/padding_free.py --data /tmp/alpaca300.jsonl --max-length 512

Builds the quickstart's LoRA model (configs/quickstart.yaml: SmolLM2-135M, r8 q/v, dropout 0.05, precision auto)
and times forward + backward of the training loss on the same shuffled micro-batches of 8, padded and
padding-free, alternating batch by batch so that both see the same machine; the optimizer step, which does not
depend on the layout, is left out. Reports tokens computed, the first losses of each (equal up to rounding) and,
per layout, the sum over batches of each batch's fastest and median time. A difference of a few percent needs
this: whole runs on a shared 2-core machine vary by 10% from one to the next.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="Alpaca-style JSONL (default: the quickstart's train set and template)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    from instructkit import prepare
    from instructkit.config import load_config
    from instructkit.data.collate import pad_batch
    from instructkit.data.packing import padding_free_batch

    overrides = ["output_dir=/tmp/padding-free-bench", f"model.precision={args.precision}",
                 f"data.max_length={args.max_length}", "data.cache=false"]
    if args.data:
        overrides += [f"data.train_file={args.data}", "data.eval_file=null", "data.val_size=0", "data.template=alpaca"]
    cfg = load_config(ROOT / "configs/quickstart.yaml", overrides)
    model_path, tokenizer, data = prepare.setup_data(cfg)
    run = prepare.setup_runtime(cfg)
    objective = prepare.setup_objective(cfg, prepare.setup_model(cfg, model_path, run.plan)).train()  # dropout on
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0)).tolist()
    groups = [[data.train[i] for i in order[k:k + 8]] for k in range(0, 8 * args.batches, 8)]
    layouts = {"padded": [pad_batch(g, tokenizer.pad_token_id) for g in groups],
               "padding-free": [padding_free_batch(g) for g in groups]}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.plan.compute_precision)

    def step(batch: dict) -> float:
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = objective(**batch)
        loss.backward()
        objective.zero_grad(set_to_none=True)
        return loss.item()

    print(f"{run.plan.compute_precision}, {run.plan.attn_implementation}, {len(groups)} batches of 8")
    for name, batches in layouts.items():
        print(f"{name}: {sum(b['input_ids'].numel() for b in batches)} tokens computed, first losses "
              f"{[round(step(b), 3) for b in batches[:2]]}")
    times = {name: [[] for _ in groups] for name in layouts}
    for _ in range(args.repeats):
        for i in range(len(groups)):
            for name, batches in layouts.items():
                start = time.perf_counter()
                step(batches[i])
                times[name][i].append(time.perf_counter() - start)
    for name, per_batch in times.items():
        print(f"{name}: fastest {sum(min(t) for t in per_batch):.2f} s, median "
              f"{sum(statistics.median(t) for t in per_batch):.2f} s (summed over batches)")


if __name__ == "__main__":
    main()
