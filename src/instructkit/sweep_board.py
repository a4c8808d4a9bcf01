"""The leaderboard of a sweep: one row per Optuna trial, ranked by the sweep's metric (best first), as a
table for the terminal, `leaderboard.md` and `leaderboard.json`.

It reads only finished-trial records (Optuna's FrozenTrial: number, state, value, params, intermediate
values, user attributes), so it is tested on a fake study and `instructkit report` can show the JSON
without Optuna. Optuna holds told values (see sweep_metric.objective); rows hold natural ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from instructkit.files import write_json, write_text
from instructkit.sweep_metric import AUTO, direction, objective, rank_key

# Display order of the states: ranked results first, what never produced one last.
STATE_ORDER = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "WAITING": 3, "FAIL": 4}
NOTE_CHARS = 160


def _wall_s(trial: Any, now: datetime) -> float | None:
    if "wall_s" in trial.user_attrs:
        return trial.user_attrs["wall_s"]
    if trial.datetime_start is None:
        return None
    return round(((trial.datetime_complete or now) - trial.datetime_start).total_seconds(), 1)


def _told(trial: Any, state: str) -> float | None:
    """What Optuna holds for the trial: its objective when complete, else the best value reported so far."""
    if state == "COMPLETE" and trial.value is not None:
        return trial.value
    values = [v for v in trial.intermediate_values.values() if math.isfinite(v)]
    return min(values) if values else None


def _eval_loss(trial: Any, metric: str, told: float | None) -> float | None:
    """The eval loss of the evaluation the trial is ranked by (kept for readers of leaderboard.json that
    predate the metric): the value itself when ranking by loss, else what the sweep kept of that evaluation."""
    if metric == "eval_loss":
        return told
    return trial.user_attrs.get("best_eval", {}).get("eval_loss")


def _note(trial: Any, state: str, retried_as: dict[int, int], metric: str) -> str:
    attrs = trial.user_attrs
    parts = ["the config as given"] if attrs.get("as_given") else []
    if "retry_of" in attrs:
        parts.append(f"retries trial {attrs['retry_of']}")
    if trial.number in retried_as:
        why = "interrupted" if attrs.get("interrupted") else "its sweep stopped while it ran"
        parts.append(f"{why}; retried as trial {retried_as[trial.number]}")
    elif state == "PRUNED" and trial.intermediate_values and metric != AUTO:
        last = max(trial.intermediate_values)  # a percent of training, or a step in studies begun before that
        step = attrs.get("pruned_at", last)
        parts.append(f"pruned at step {step} ({metric} {objective(metric, trial.intermediate_values[last]):.4f})")
    if attrs.get("note"):
        parts.append(attrs["note"])
    return "; ".join(parts)


def board_rows(trials: Iterable[Any], metric: str, now: datetime | None = None) -> list[dict]:
    """Rows in display order: complete trials by `metric`, best first (ranked 1, 2, ...), then pruned ones by
    their best value so far, running, waiting, failed. A pruned or failed trial's value is from before it
    stopped. `value` is the metric's natural value (None while the metric is still `auto`)."""
    trials = list(trials)
    now = now or datetime.now()
    retried_as = {t.user_attrs["retry_of"]: t.number for t in trials if "retry_of" in t.user_attrs}
    told, rows = {}, []
    for t in trials:
        state = t.state.name
        told[t.number] = _told(t, state) if metric != AUTO else None
        rows.append({"rank": None, "trial": t.number, "state": state, "metric": metric,
                     "value": None if told[t.number] is None else objective(metric, told[t.number]),
                     "eval_loss": _eval_loss(t, metric, told[t.number]), "params": dict(t.params),
                     "wall_s": _wall_s(t, now), "run_dir": t.user_attrs.get("run_dir"),
                     "note": _note(t, state, retried_as, metric), "log_tail": t.user_attrs.get("log_tail")})
    # Optuna's told values are minimised whatever the metric, so the lowest told value ranks first.
    # Equal accuracies (they move in steps of one eval example) rank by the lower eval loss.
    rows.sort(key=lambda r: (STATE_ORDER.get(r["state"], 9),
                             *(rank_key(metric, r["value"], r["eval_loss"]) if r["value"] is not None
                               else (math.inf, math.inf)), r["trial"]))
    for rank, row in enumerate((r for r in rows if r["state"] == "COMPLETE"), start=1):
        row["rank"] = rank
    return rows


def best_row(rows: list[dict]) -> dict | None:
    return next((r for r in rows if r["rank"] == 1), None)


def cell(value: Any) -> str:
    """A value as the tables show it: floats to 4 significant digits, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def param_keys(rows: list[dict]) -> list[str]:
    """Every searched key, in the order they first appear."""
    return list(dict.fromkeys(k for r in rows for k in r["params"]))


def metric_header(metric: str) -> str:
    return "metric (auto: not resolved yet)" if metric == AUTO else f"{metric} ({direction(metric)})"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def board_table(rows: list[dict], metric: str) -> tuple[list[str], list[list[str]]]:
    """The header and cells shared by the terminal, Markdown and HTML tables: the metric's natural value,
    and the eval loss of the same evaluation beside an accuracy (what the loss said of the chosen weights)."""
    keys = param_keys(rows)
    loss = [] if metric == "eval_loss" else ["eval loss"]
    header = ["rank", "trial", "state", metric_header(metric), *loss, *keys, "wall s", "run", "note"]
    cells = []
    for r in rows:
        note = r["note"] if len(r["note"]) <= NOTE_CHARS else r["note"][:NOTE_CHARS - 3] + "..."
        run = Path(r["run_dir"]).name if r["run_dir"] else "-"
        cells.append([cell(r["rank"]), str(r["trial"]), r["state"].lower(), _number(r.get("value", r["eval_loss"])),
                      *([_number(r["eval_loss"])] if loss else []), *(cell(r["params"].get(k)) for k in keys),
                      "-" if r["wall_s"] is None else f"{r['wall_s']:.0f}", run, note or ""])
    return header, cells


def best_text(best: dict) -> str:
    """`eval_exact_match 0.5200 (higher is better)`: the best row's value as the summaries say it (a
    leaderboard.json from before the metric has only its eval loss)."""
    metric = best.get("metric", "eval_loss")
    return f"{metric} {best.get('value', best.get('eval_loss')):.4f} ({direction(metric)})"


def markdown_table(header: list[str], cells: list[list[str]]) -> str:
    def clean(text: Any) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    return "\n".join(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
                     + ["| " + " | ".join(clean(c) for c in row) + " |" for row in cells])


def board_markdown(rows: list[dict], title: str, metric: str, limit: int | None = None) -> str:
    """The leaderboard as Markdown (it reads well in a terminal too); `limit`: only the first rows."""
    header, cells = board_table(rows, metric)
    shown = cells if limit is None else cells[:limit]
    more = f"\n\n({len(cells) - len(shown)} more rows in leaderboard.md)" if len(shown) < len(cells) else ""
    return f"{title}\n\n{markdown_table(header, shown)}{more}"


def write_board(sweep_dir: Path, rows: list[dict], summary: dict) -> None:
    """leaderboard.md and leaderboard.json, each replaced in one rename (a reader never sees half)."""
    best = best_row(rows)
    title = f"# Sweep {summary.get('study', '')}: {len(rows)} trials"
    lines = [title]
    if best:
        lines += [(f"Best: trial {best['trial']}, {best_text(best)}, run {best['run_dir']}; "
                   f"its config: {sweep_dir / 'best.yaml'}")]
    header, cells = board_table(rows, summary["metric"])
    write_text(sweep_dir / "leaderboard.md", "\n\n".join([*lines, markdown_table(header, cells)]) + "\n")
    write_json(sweep_dir / "leaderboard.json", {**summary, "best": best, "trials": rows})
