"""The metric a sweep ranks and prunes trials by: the one its runs choose their best weights by
(`train.best_metric`), so the trial the sweep calls best is the one whose final/ scores best.

The Optuna study always minimises (studies made before the metric existed keep working), so what Optuna
is told is `eval_loss` itself, or `1 - eval_exact_match` / `1 - eval_accuracy` for the accuracies, which
are maximised. The transform is its own inverse: `objective` turns a natural value into what Optuna is
told and back. The leaderboard shows natural values.

`auto` (the flag and the config key) is what a run resolves at start from its eval data; the sweep
cannot know it before, so the first trial trains with `auto`, and the value it writes into its
`config.yaml` is fixed for the study (its user attribute `metric`, which a resumed sweep and other
workers read).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from instructkit.errors import user_error

AUTO = "auto"
METRICS = ("eval_loss", "eval_exact_match", "eval_accuracy")
# Studies written before the sweep had a metric (they have a `space` but no `metric`) ranked by eval loss.
LEGACY_METRIC = "eval_loss"


def minimised(metric: str) -> bool:
    return metric == "eval_loss"


def direction(metric: str) -> str:
    return "lower is better" if minimised(metric) else "higher is better"


def objective(metric: str, value: float) -> float:
    """A natural value as Optuna is told it (the study minimises), and a told value back as the natural one."""
    return value if minimised(metric) else 1.0 - value


def metric_value(record: dict, metric: str) -> float | None:
    """The record's value of `metric` when it holds a finite number."""
    value = record.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def best_eval(records: list[dict], metric: str, manifest: dict | None = None) -> dict | None:
    """The evaluation record of the weights final/ holds, as the run's manifest says: with final_weights
    best, its held step (for an accuracy the latest evaluation within noise of the best); with last, the
    latest evaluation up to its last step. Without a manifest that says, the best by `metric`, ties broken as
    the run's tracker breaks them (an accuracy's by the lower eval loss, then the earliest). None when no
    record has the metric."""
    scored = [r for r in records if metric_value(r, metric) is not None and isinstance(r.get("step"), int)]
    if not scored:
        return None
    manifest = manifest or {}
    if manifest.get("final_weights") == "best" and isinstance(held := manifest.get("held_step"), int):
        if found := [r for r in scored if r["step"] == held]:
            return found[-1]
    if manifest.get("final_weights") == "last" and isinstance(last := manifest.get("last_step"), int):
        if found := [r for r in scored if r["step"] <= last]:
            return max(found, key=lambda r: r["step"])
    return min(scored, key=lambda r: rank_key(metric, metric_value(r, metric), r.get("eval_loss")))


def rank_key(metric: str, value: float, eval_loss: float | None) -> tuple[float, float]:
    """Lower is better: the objective, then for an accuracy (which moves in steps of one example) the eval
    loss of the same evaluation (a missing or non-finite loss last)."""
    finite = isinstance(eval_loss, (int, float)) and math.isfinite(eval_loss)
    tie = 0.0 if metric == "eval_loss" else (eval_loss if finite else math.inf)
    return objective(metric, value), tie


def eval_fields(record: dict) -> dict:
    """The step and eval_* values of a record (kept with a trial, so the leaderboard can show its eval loss
    beside an accuracy)."""
    return {k: v for k, v in record.items() if k == "step" or k.startswith("eval_")}


def stored_metric(attrs: dict) -> str:
    """The study's metric from its user attributes: a metric, or AUTO while its first trial resolves it."""
    if "metric" in attrs:
        return attrs["metric"]
    return LEGACY_METRIC if "space" in attrs else AUTO


def requested_metric(flag: str, base: dict) -> str:
    """What the command asks for: --metric when given, else the config's train.best_metric (maybe AUTO)."""
    return flag if flag != AUTO else base["train"].get("best_metric", AUTO)


def settle_metric(study: Any, requested: str, name: str) -> str:
    """Store the requested metric in a new study; in a resumed one, fix a pending AUTO to an explicit request
    and refuse a request that differs from the metric its trials were ranked by."""
    attrs = study.user_attrs
    stored = stored_metric(attrs) if "space" in attrs else None
    if stored is None or (stored == AUTO and requested != AUTO):
        study.set_user_attr("metric", requested)
        return requested
    if requested not in (AUTO, stored):
        raise user_error(f"study '{name}' ranks its trials by {stored}, this command by {requested}", "--metric",
                         f"give --metric {stored} (or auto) to resume it, or a new --sweep-dir/--study-name")
    return stored


def resolved_in(run_dir: Path) -> str | None:
    """train.best_metric as a trial's child resolved it: the child rewrites config.yaml at start, after
    resolving every auto; None while it still reads `auto` (the sweep's own copy) or is unreadable."""
    import yaml  # here: the CLI imports this module for --metric's choices and must answer --help at once

    try:
        value = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("train", {}).get("best_metric")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return value if value in METRICS else None


class StudyMetric:
    """The study's metric as this worker knows it: fixed once known (never changes after), AUTO until the
    first trial resolves it here or another worker stores it in the study."""

    def __init__(self, study: Any, name: str):
        self.study, self.name = study, name

    def known(self) -> str | None:
        if self.name == AUTO:  # another worker's first trial may have fixed it
            self.name = stored_metric(self.study.user_attrs)
        return None if self.name == AUTO else self.name

    def adopt(self, run_dir: Path) -> str | None:
        """The metric, fixed from this trial's resolved config.yaml when nobody fixed it yet."""
        if self.known() is not None:
            return self.name
        resolved = resolved_in(run_dir)
        if resolved is not None:
            self.study.set_user_attr("metric", resolved)
            self.name = resolved
        return resolved
