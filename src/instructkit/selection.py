"""Validation that steers: keep the weights of the best evaluation, and stop when it stops improving.

The best weights live in RUN/best/ (the trainable parameters as safetensors and best.json), written
atomically at each new best; the tracker's state travels in every checkpoint's state.json, so a
resumed run continues choosing exactly as an uninterrupted one would. At the end, `final/` gets the
best weights (train.final_weights: best) or the last ones (last).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from instructkit.checkpoint import Ranks, import_tensor, trainable_state
from instructkit.files import atomic_path

if TYPE_CHECKING:
    import torch

    from instructkit.checkpoint import TrainingProgress

BEST_DIR = "best"


@dataclass
class Tracker:
    """The best value of the selection metric so far, its step, evaluations since (for early stopping), and
    the step whose weights best/ holds. eval_loss is minimised; accuracies are maximised.

    For an accuracy the held weights are those of the latest evaluation within one standard error of the
    best (sqrt(p(1 - p) / n) over the n eval examples or tokens): on a small split an early spike is noise
    more often than a better model, and later weights have trained longer. On the development suite the
    strict best of a 25-row split picked step 30 of 120 (32.5% exact match on the test prompts)."""

    metric: str
    patience: int | None
    best_value: float | None = None
    best_step: int | None = None
    since_best: int = 0
    best_loss: float | None = None  # breaks ties of an accuracy, which moves in steps of 1 / eval examples
    held_step: int | None = None  # the step whose weights best/ holds

    @classmethod
    def resumed(cls, metric: str, patience: int | None, progress: TrainingProgress | None) -> Tracker:
        if progress is None:
            return cls(metric, patience)
        return cls(metric, patience, progress.best_value, progress.best_step, progress.evals_since_best,
                   progress.best_tie_loss, progress.held_step)

    def better(self, metrics: dict[str, float]) -> bool:
        value, loss = metrics[self.metric], metrics["eval_loss"]
        if self.best_value is None:
            return True
        if self.metric == "eval_loss":
            return value < self.best_value
        return value > self.best_value or (value == self.best_value and loss < (self.best_loss or math.inf))

    def within_noise(self, metrics: dict[str, float]) -> bool:
        """An accuracy within one standard error of the best: as good as far as this split can tell."""
        if self.metric == "eval_loss" or self.best_value is None:
            return False
        n = metrics.get("n_tokens" if self.metric == "eval_accuracy" else "n_examples", 0)
        error = math.sqrt(self.best_value * (1 - self.best_value) / n) if n else 0.0
        return metrics[self.metric] >= self.best_value - error

    def update(self, step: int, metrics: dict[str, float]) -> bool:
        """Record an evaluation; True when best/ should now hold this step's weights (a new best, or an
        accuracy within noise of it). An accuracy that ties the best counts as better when its eval loss is
        lower."""
        if self.better(metrics):
            self.best_value, self.best_loss = metrics[self.metric], metrics["eval_loss"]
            self.best_step, self.since_best, self.held_step = step, 0, step
            return True
        self.since_best += 1
        if self.within_noise(metrics):
            self.held_step = step
            return True
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.since_best >= self.patience

    def progress_fields(self) -> dict:
        """What a checkpoint's state.json stores of the tracker."""
        return {"best_value": self.best_value, "best_step": self.best_step, "evals_since_best": self.since_best,
                "best_tie_loss": self.best_loss, "held_step": self.held_step}


def save_best(run_dir: Path, model: torch.nn.Module, step: int, metric: str, value: float, ranks: Ranks) -> None:
    """Write RUN/best/ (every rank calls it: gathering FSDP shards is collective; rank 0 writes)."""
    from safetensors.torch import save_file

    weights = trainable_state(model)
    if ranks.main:
        with atomic_path(run_dir / BEST_DIR, tmp_name=".best.tmp") as tmp:
            tmp.mkdir(parents=True)
            save_file(weights, str(tmp / "trainable.safetensors"))
            (tmp / "best.json").write_text(json.dumps({"step": step, metric: value}))
    ranks.barrier()


def restore_best(run_dir: Path, model: torch.nn.Module, step: int) -> bool:
    """Load RUN/best/ into the model's trainable parameters when it holds `step`; False when it does not."""
    import torch
    from safetensors.torch import load_file

    meta_path = run_dir / BEST_DIR / "best.json"
    if not meta_path.is_file() or json.loads(meta_path.read_text()).get("step") != step:
        return False
    weights = load_file(str(run_dir / BEST_DIR / "trainable.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(import_tensor(tensor, params[name], sharded=False))
    return True
