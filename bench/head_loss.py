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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="Alpaca-style JSONL (default: the quickstart's train set and template)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from instructkit import loss as loss_module
    from instructkit.data.packing import padding_free_batch
    from interleaved import alternate, setup, shuffled_groups, train_step

    _, examples, run, objective = setup("/tmp/head-loss-bench", args.max_length, args.data)
    batches = [padding_free_batch(g) for g in shuffled_groups(examples, args.batches)]
    step = train_step(objective, run.plan.compute_precision)
    sides = {"recompute": lambda head: False, "gradient in forward": loss_module.frozen_head}

    def on(side: str, batch: dict) -> float:
        loss_module.frozen_head = sides[side]  # SupervisedLoss looks it up at each call
        return step(batch)

    supervised = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    print(f"{run.plan.compute_precision}, {len(batches)} batches of 8, {supervised} supervised tokens")
    for side in sides:
        print(f"{side}: first losses {[round(on(side, b), 3) for b in batches[:2]]}")
    alternate({side: (lambda i, side=side: on(side, batches[i])) for side in sides}, len(batches), args.repeats)

if __name__ == "__main__":
    main()
