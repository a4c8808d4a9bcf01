"""Measured peak memory of real training steps on this machine's CPU next to `instructkit estimate`.

    python bench/memory.py CONFIG [key=value ...] [--steps 3]

In one process: the model is loaded as training loads it (precision plan, gradient checkpointing,
LoRA) and full optimizer steps run on batches of exactly per_device_train_batch_size x
data.max_length tokens, every token supervised (the estimate's worst case: its loss term holds logits
for every token of a chunk). Measured = the peak of resident *anonymous* memory (sampled every
millisecond) minus its value just before the model was loaded. Prints one JSON line.

Three things keep the measure about tensors, which is what the estimate (like a GPU's
max_memory_allocated) counts: anonymous memory only, because file-backed pages (library code faulted
in by kernels the run reaches later) moved the total RSS peak by 80 MB between two runs of the same
config in different parent processes (the weights, which transformers memory-maps from safetensors,
are therefore copied into process memory after loading, as a move to a GPU would); a warm-up step with one short row first, so lazily imported
modules are resident before the baseline; and a fixed glibc mmap threshold (MALLOC_MMAP_THRESHOLD_),
because glibc's dynamic threshold otherwise keeps freed activation buffers in the heap, which added up
to 30% on SmolLM2 LoRA runs here (allocator fragmentation, not training state).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def anon_rss() -> int:
    """Resident anonymous memory (heap, tensors): resident minus file-backed and shared pages, so code
    pages of libraries faulted in later do not count as training memory."""
    with open("/proc/self/statm") as handle:
        fields = handle.read().split()
    return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    """The highest anon_rss() seen, sampled every millisecond in a thread (torch releases the GIL in
    its kernels, so the sampler runs while they do)."""

    def __init__(self):
        self.peak, self._stop = anon_rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, anon_rss())
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon_rss())


def run_steps(cfg, path: str, ids, labels, n: int) -> None:
    """`n` optimizer steps as training runs them, the model loaded as training loads it."""
    import torch

    from instructkit.models import plan_loading
    from instructkit.prepare import setup_model, setup_objective

    model = setup_model(cfg, path, plan_loading(cfg.model, cfg.method, training=True))
    with torch.no_grad():  # out of the memory-mapped file into process memory, as a move to a GPU would
        for param in model.parameters():  # (tied weights are one Parameter: copied once, still tied)
            param.data = param.data.clone()
    model.train()
    loss_fn = setup_objective(cfg, model)
    # A preference batch is chosen rows then rejected rows; DPO's reference log-probs come with it.
    extra = {"ref_logps": torch.zeros(ids.shape[0])} if cfg.objective == "dpo" else {}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    for _ in range(n):
        loss_fn(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids), **extra).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def main() -> int:
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    import torch

    from instructkit.config import load_config
    from instructkit.estimate import estimate_table
    from instructkit.models import training_source

    cfg = load_config(args.config, args.overrides)
    path = training_source(cfg.model.name_or_path).path
    table = estimate_table(cfg, 1, None, gpu=False)
    batch, length = cfg.train.per_device_train_batch_size, cfg.data.max_length
    rows = batch * (1 if cfg.objective == "sft" else 2)  # pairs: a chosen and a rejected row each
    ids = torch.randint(0, 200, (rows, length))
    labels = ids.clone()  # all supervised, as the estimate assumes (half made the head's logits half the size)
    run_steps(cfg, path, ids[:2, -8:], labels[:2, -8:], 1)  # warm-up: code and imports, not measured
    gc.collect()
    before = anon_rss()
    with PeakSampler() as sampler:
        run_steps(cfg, path, ids, labels, args.steps)
    measured = sampler.peak - before

    (row,) = [r for r in table["rows"] if r["method"] == cfg.method]
    print(json.dumps({"config": args.config, "overrides": args.overrides, "method": cfg.method,
                      "objective": cfg.objective,
                      "batch": batch, "length": length, "gradient_checkpointing": cfg.model.gradient_checkpointing,
                      "measured_bytes": measured, "estimated_bytes": row["bytes"], "parts": row["parts"],
                      "ratio": row["bytes"] / measured}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
