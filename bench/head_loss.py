"""The LM head's loss on a frozen head: gradient in forward (FrozenHeadCE) against logits recomputed in backward.

    python bench/make_alpaca_rows.py --rows 300 --out /tmp/alpaca300.jsonl
    python bench/head_loss.py --data /tmp/alpaca300.jsonl --max-length 512

LoRA leaves the LM head frozen. SupervisedLoss then computes each chunk's gradient with respect to the hidden
states in forward and frees the logits (loss.FrozenHeadCE); before, a chunk whose fp32 logits exceeded
KEEP_LOGITS_BYTES (64 MiB: 341 tokens of SmolLM2's 49,152-word vocabulary) was checkpointed and its head matmul,
cast and log-softmax recomputed in backward. This times forward + backward of the training loss on the same
padding-free micro-batches of 8 both ways, alternating batch by batch in one process (the quickstart's LoRA
model and precision; the optimizer step is left out), and reports the supervised tokens, the first losses
both ways and per side the sum over batches of each batch's fastest and median time. Long answers show the
difference; on the quickstart's short ones (a few dozen supervised tokens a batch, logits kept) both sides do
the same work.
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
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from instructkit import loss as loss_module
    from instructkit import prepare
    from instructkit.config import load_config
    from instructkit.data.packing import padding_free_batch

    overrides = ["output_dir=/tmp/head-loss-bench", f"data.max_length={args.max_length}", "data.cache=false"]
    if args.data:
        overrides += [f"data.train_file={args.data}", "data.eval_file=null", "data.val_size=0", "data.template=alpaca"]
    cfg = load_config(ROOT / "configs/quickstart.yaml", overrides)
    model_path, tokenizer, data = prepare.setup_data(cfg)
    run = prepare.setup_runtime(cfg)
    objective = prepare.setup_objective(cfg, prepare.setup_model(cfg, model_path, run.plan)).train()
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [padding_free_batch([data.train[i] for i in order[k:k + 8]]) for k in range(0, 8 * args.batches, 8)]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.plan.compute_precision)
    frozen_head = loss_module.frozen_head
    sides = {"recompute": lambda head: False, "gradient in forward": frozen_head}

    def step(batch: dict, side: str) -> float:
        loss_module.frozen_head = sides[side]
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = objective(**batch)
        loss.backward()
        objective.zero_grad(set_to_none=True)
        return loss.item()

    supervised = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    print(f"{run.plan.compute_precision}, {len(batches)} batches of 8, {supervised} supervised tokens")
    for side in sides:
        print(f"{side}: first losses {[round(step(b, side), 3) for b in batches[:2]]}")
    times: dict[str, list[list[float]]] = {side: [[] for _ in batches] for side in sides}
    for _ in range(args.repeats):
        for i, batch in enumerate(batches):
            for side in sides:
                start = time.perf_counter()
                step(batch, side)
                times[side][i].append(time.perf_counter() - start)
    for side, per_batch in times.items():
        print(f"{side}: fastest {sum(min(t) for t in per_batch):.2f} s, median "
              f"{sum(statistics.median(t) for t in per_batch):.2f} s (summed over batches)")


if __name__ == "__main__":
    main()
