"""What the interleaved A/B scripts share (padding_free.py, head_loss.py, compiled_parts.py): the quickstart's
LoRA model on its rows or given Alpaca-style rows, shuffled micro-batches, a forward + backward step of the
training loss in the run's precision, and the batch-by-batch alternation of the two sides with its report.
Alternating in one process is what shows a difference of a few percent: whole runs on a shared 2-core machine
vary by 10% from one to the next."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]


def setup(output_dir: str, max_length: int, data: str | None = None, extra: list[str] | None = None):
    """(tokenizer, train examples, runtime, objective in train mode: LoRA's dropout on) for configs/quickstart.yaml."""
    from instructkit import prepare
    from instructkit.config import load_config

    overrides = [f"output_dir={output_dir}", f"data.max_length={max_length}", "data.cache=false", *(extra or [])]
    if data:
        overrides += [f"data.train_file={data}", "data.eval_file=null", "data.val_size=0", "data.template=alpaca"]
    cfg = load_config(ROOT / "configs/quickstart.yaml", overrides)
    model_path, tokenizer, datasets = prepare.setup_data(cfg)
    run = prepare.setup_runtime(cfg)
    objective = prepare.setup_objective(cfg, prepare.setup_model(cfg, model_path, run.plan)).train()
    return tokenizer, datasets.train, run, objective


def shuffled_groups(examples, batches: int, size: int = 8) -> list[list]:
    """The first `batches` micro-batches of a seeded shuffle: the same on every run."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    return [[examples[i] for i in order[k:k + size]] for k in range(0, size * batches, size)]


def train_step(objective: torch.nn.Module, precision: str) -> Callable[[dict], float]:
    """Forward + backward of the training loss under the run's autocast; gradients dropped, loss returned."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step(batch: dict) -> float:
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = objective(**batch)
        loss.backward()
        objective.zero_grad(set_to_none=True)
        return loss.item()

    return step


def alternate(sides: dict[str, Callable[[int], object]], batches: int, repeats: int) -> None:
    """Run batch i on every side in turn, `repeats` times over all batches; print per side the sum over batches
    of each batch's fastest and median time."""
    times = {side: [[] for _ in range(batches)] for side in sides}
    for _ in range(repeats):
        for i in range(batches):
            for side, run in sides.items():
                start = time.perf_counter()
                run(i)
                times[side][i].append(time.perf_counter() - start)
    for side, per_batch in times.items():
        print(f"{side}: fastest {sum(min(t) for t in per_batch):.2f} s, median "
              f"{sum(statistics.median(t) for t in per_batch):.2f} s (summed over {batches} batches)")
