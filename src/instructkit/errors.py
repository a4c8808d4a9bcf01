"""The one exception type that means "the user's input is wrong" (exit code 2).

Everything else that escapes is an internal failure (exit code 1). Keeping this in its own
bottom-layer module lets every stage raise it without importing the CLI.
"""

from __future__ import annotations

import signal
from pathlib import Path


class UserError(Exception):
    """Bad input: config, data, arguments or paths. The message says what, where, and the fix."""


def user_error(what: str, where: str | None = None, fix: str | None = None) -> UserError:
    """Build a UserError whose message reads as one paragraph: what, where, how to fix."""
    parts = [f"{where}: {what}" if where else what]
    if fix:
        parts.append(f"Fix: {fix}")
    return UserError(" ".join(p.rstrip(".") + "." for p in parts))


class TrainingInterrupted(Exception):
    """A signal stopped training after a checkpoint was written (exit 130 for SIGINT, 128+N otherwise)."""

    def __init__(self, signum: int, checkpoint: Path | None):
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint: {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; nothing is saved over the good checkpoints."""

    def __init__(self, step: int, loss: float, lr: float, precision: str):
        hint = " or use bf16/fp32 instead of fp16" if precision == "fp16" else ""
        super().__init__(f"the loss is {loss} at step {step}, so training stopped; the checkpoints already written "
                         f"are intact. Fix: lower train.learning_rate (now {lr:.2e}){hint}, check "
                         "train.max_grad_norm, then resume from the last checkpoint or start over.")
        self.step = step
