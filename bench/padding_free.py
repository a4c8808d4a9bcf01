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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="Alpaca-style JSONL (default: the quickstart's train set and template)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    from instructkit.data.collate import pad_batch
    from instructkit.data.packing import padding_free_batch
    from interleaved import alternate, setup, shuffled_groups, train_step

    tokenizer, examples, run, objective = setup("/tmp/padding-free-bench", args.max_length, args.data,
                                                [f"model.precision={args.precision}"])
    groups = shuffled_groups(examples, args.batches)
    layouts = {"padded": [pad_batch(g, tokenizer.pad_token_id) for g in groups],
               "padding-free": [padding_free_batch(g) for g in groups]}
    step = train_step(objective, run.plan.compute_precision)
    print(f"{run.plan.compute_precision}, {run.plan.attn_implementation}, {len(groups)} batches of 8")
    for name, batches in layouts.items():
        print(f"{name}: {sum(b['input_ids'].numel() for b in batches)} tokens computed, first losses "
              f"{[round(step(b), 3) for b in batches[:2]]}")
    alternate({name: (lambda i, b=b: step(b[i])) for name, b in layouts.items()}, len(groups), args.repeats)


if __name__ == "__main__":
    main()
