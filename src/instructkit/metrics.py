"""What a user watches while training: metric sinks (metrics.jsonl always, TensorBoard when asked),
the logging window (loss, learning rate, tokens/s, MFU) and the progress bar or its log lines."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig


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


def matmul_peak_tflops(dtype_name: str = "float32", device: str = "cpu", size: int = 1024, reps: int = 6,
                       trials: int = 3) -> float:
    """TFLOP/s of a square matmul in `dtype_name` on `device`, measured now: the peak MFU is taken against.
    The best of `trials` timings (fewer when one takes over a second): on a shared machine a single timing
    reads anywhere from half the peak to all of it, and a low peak would inflate every MFU taken against it."""
    import time

    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(max(trials, 1)):
        sync()
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        elapsed = time.perf_counter() - start
        best = max(best, 2 * size**3 * reps / elapsed / 1e12)
        if elapsed > 1.0:
            break
    return best


def training_flops(config: PretrainedConfig, method: str, tokens: int, supervised: int, context: float) -> float:
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


def _finish_queued_work(device: torch.device | str) -> None:
    """Wait for the kernels queued on a CUDA device (a no-op elsewhere), so that the clock read next counts them."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def device_stats(device: torch.device | str) -> dict:
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


@dataclass
class Window:
    """Counters of one logging window, summed over the optimizer steps (and processes) in it: the loss
    components' sums and units (one pair for SFT: loss and supervised tokens), the objective's own
    statistics (preference rewards), and the token counts that throughput and MFU are computed from."""

    parts: list[float] = field(default_factory=list)
    units: list[float] = field(default_factory=list)
    stats: list[float] = field(default_factory=list)
    supervised: int = 0
    tokens: int = 0
    sequences: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, out: dict) -> None:
        self.parts = _plus(self.parts, out["loss_parts"])
        self.units = _plus(self.units, out["units"])
        self.stats = _plus(self.stats, out.get("stats") or [])
        self.supervised += out["supervised"]
        self.tokens += out["tokens"]
        self.sequences += out["sequences"]

    @property
    def loss(self) -> float:
        """Each component's mean over its units, summed: the loss of all the window's steps as one batch."""
        return sum(p / max(u, 1) for p, u in zip(self.parts, self.units))


def _plus(total: list[float], more: list[float]) -> list[float]:
    return [a + b for a, b in zip(total, more)] if total else list(more)


def model_flops(config: PretrainedConfig, method: str, window: Window) -> float | None:
    """Model FLOPs of a logging window, or None for an architecture whose config lacks the sizes."""
    try:
        return training_flops(config, method, window.tokens, window.supervised,
                              window.tokens / max(window.sequences, 1))
    except (AttributeError, TypeError):
        return None


class TrainingMonitor:
    """Turns finished optimizer steps into records every `logging_steps` (and at the last step): to the
    sinks and the progress bar on the main process, the bar only on a terminal (a log file gets one
    line per record instead of the bar's redraws)."""

    def __init__(self, log: MetricsLog | None, total_steps: int, step: int, logging_steps: int,
                 flops: Callable[[Window], float | None], peak_tflops: float, world: int, device,
                 summarize: Callable[[list[float]], dict[str, float]] | None = None,
                 remeasure: Callable[[], float] | None = None) -> None:
        from tqdm.auto import tqdm

        self.summarize = summarize  # the objective's statistics (preference rewards) as named metrics
        self.log, self.total_steps, self.logging_steps = log, total_steps, logging_steps
        self.flops, self.peak, self.world, self.device = flops, peak_tflops, world, device
        self.remeasure = remeasure  # the peak again, when training outran the one measured at start
        self.remeasures_left = 3  # a FLOP count that overcounts some architecture must not cost every window
        self.window, self.last_loss = Window(), float("nan")
        self.bar = tqdm(total=total_steps, initial=step, desc="train", unit="step",
                        disable=log is None or not sys.stderr.isatty(), dynamic_ncols=True)

    def step_done(self, step: int, epoch: float, out: dict, lr: float) -> None:
        self.bar.update(1)
        self.window.add(out)
        if step % self.logging_steps and step != self.total_steps:
            return
        self.last_loss = self.window.loss
        record = self._record(step, epoch, out, lr)
        if self.log is not None:
            self.log.log(record)
            mfu = f"{record['mfu']:.1%}" if record["mfu"] is not None else "?"
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
                                 mfu=mfu)
            self.bar.write(f"step {step}/{self.total_steps} epoch {epoch:.2f} loss {record['loss']:.4f} "
                           f"lr {lr:.2e} tokens/s {record['tokens_per_s']:.0f} MFU {mfu}")
        self.window = Window()

    def _record(self, step: int, epoch: float, out: dict, lr: float) -> dict:
        _finish_queued_work(self.device)  # the window's last optimizer step may still be running on a GPU
        w, elapsed = self.window, time.perf_counter() - self.window.start
        flops = self.flops(w)
        if flops:
            self.check_peak(flops / elapsed / 1e12 / self.world, step)
        extra = {k: round(v, 6) for k, v in self.summarize(w.stats).items()} if self.summarize and w.stats else {}
        return {"step": step, "epoch": round(epoch, 4), "loss": round(w.loss, 6), **extra,
                "lr": lr, "grad_norm": None if out["grad_norm"] is None else float(out["grad_norm"]),
                "tokens_per_s": round(w.tokens / elapsed, 1), "supervised_tokens": w.supervised,
                "elapsed_s": round(elapsed, 3),
                "mfu": flops and round(flops / elapsed / 1e12 / (self.peak * self.world), 4),
                "matmul_peak_tflops": round(self.peak, 4),
                **device_stats(self.device)}

    def check_peak(self, reached: float, step: int) -> None:
        """A window that reached more TFLOP/s than the peak says the peak was measured low (another process
        had the cores for that moment: 0.27 instead of 0.7 TFLOP/s once, which read as 147% MFU): measure it
        again and keep the higher (each record names the peak its MFU is taken against). This runs before the
        next window starts, so no window counts its time."""
        if reached <= self.peak or self.remeasure is None or self.log is None or not self.remeasures_left:
            return
        self.remeasures_left -= 1
        try:
            again = self.remeasure()
        except (RuntimeError, MemoryError) as exc:  # out of memory on a full GPU: MFU may read high, training goes on
            self.bar.write(f"step {step}: the matmul peak could not be measured again ({exc}); MFU stays against "
                           f"{self.peak:.3f} TFLOP/s")
            return
        if again > self.peak:
            self.bar.write(f"step {step}: training reached {reached:.3f} TFLOP/s, above the matmul peak measured at "
                           f"start ({self.peak:.3f}); measured again: {again:.3f} TFLOP/s, MFU is taken against it")
            self.peak = again

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluation, checkpointing) is left out of the window's elapsed time: tokens/s and
        MFU measure training, and a window holding an evaluation would otherwise read as a slow one."""
        _finish_queued_work(self.device)  # training's queued GPU work belongs to the window, not to the pause
        start = time.perf_counter()
        try:
            yield
        finally:
            self.window.start += time.perf_counter() - start

    def eval_done(self, step: int, metrics: dict[str, float]) -> None:
        """Log an evaluation: eval_loss, its perplexity, and the accuracies where the objective gives them."""
        if self.log is not None:
            record = {"eval_loss": metrics["eval_loss"],
                      **{k: v for k, v in metrics.items() if k.startswith("eval_") and k != "eval_loss"}}
            if "eval_pref_accuracy" not in metrics:  # a perplexity only where the loss is per-token cross entropy
                record["eval_ppl"] = math.exp(min(metrics["eval_loss"], 50))
            self.log.log({"step": step, **{k: round(v, 6) for k, v in record.items()}})
            self.bar.write(f"step {step} " + " ".join(f"{k} {v:.4f}" for k, v in record.items()))

    def close(self) -> None:
        self.bar.close()
        if self.log is not None:
            self.log.close()
