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
