"""Metric sinks: metrics.jsonl always, TensorBoard when asked. One `log` call feeds them all."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """Append one JSON object per call to metrics.jsonl and mirror numbers to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None:  # drop what the interrupted run logged after its checkpoint
            kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = {"purge_step": resume_step + 1} if resume_step is not None else {}
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), **purge)

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key.replace("eval_", "eval/") if key.startswith("eval_") else f"train/{key}",
                                        value, step)
            self._tb.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def matmul_peak_tflops(dtype_name: str = "float32", device: str = "cpu", size: int = 1024, reps: int = 6) -> float:
    """TFLOP/s of a square matmul in `dtype_name` on `device`, measured now: the peak MFU is taken against."""
    import time

    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * size**3 * reps / (time.perf_counter() - start) / 1e12


def training_flops(config, method: str, tokens: int, supervised: int, context: float) -> float:
    """FLOPs a training step needs, counted the same way for any implementation: body matmuls
    (forward 2N, backward 2N for activations, plus 2N for weight gradients when the weights train),
    causal attention scores over the mean `context` length, and the LM head only where a label is
    supervised (the rest of its output is never used)."""
    h, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    body = layers * (h * h * 2 + h * kv * 2 + 3 * h * config.intermediate_size)
    factor = 6 if method == "full" else 4
    attention = 3 * 2 * 2 * layers * h * context / 2
    return tokens * (factor * body + attention) + supervised * factor * h * vocab


def device_stats(device) -> dict:
    """Peak GPU memory (GiB) and, where nvidia-ml-py is installed, GPU utilisation (%)."""
    import torch

    if not str(device).startswith("cuda"):
        return {}
    stats = {"gpu_mem_peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.device(device).index or 0)
        stats["gpu_util_pct"] = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
    except Exception:  # noqa: BLE001 - utilisation is optional
        pass
    return stats
