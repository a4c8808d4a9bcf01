"""The leaderboard of a sweep: one row per Optuna trial, ranked by eval loss, as a table for the terminal,
`leaderboard.md` and `leaderboard.json`.

It reads only finished-trial records (Optuna's FrozenTrial: number, state, value, params, intermediate
values, user attributes), so it is tested on a fake study and `instructkit report` can show the JSON
without Optuna.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from instructkit.files import write_json, write_text

# Display order of the states: ranked results first, what never produced one last.
STATE_ORDER = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "WAITING": 3, "FAIL": 4}
NOTE_CHARS = 160


def _wall_s(trial: Any, now: datetime) -> float | None:
    if "wall_s" in trial.user_attrs:
        return trial.user_attrs["wall_s"]
    if trial.datetime_start is None:
        return None
    return round(((trial.datetime_complete or now) - trial.datetime_start).total_seconds(), 1)


def _eval_loss(trial: Any, state: str) -> float | None:
    if state == "COMPLETE" and trial.value is not None:
        return trial.value
    values = [v for v in trial.intermediate_values.values() if math.isfinite(v)]
    return min(values) if values else None


def _note(trial: Any, state: str, retried_as: dict[int, int]) -> str:
    attrs = trial.user_attrs
    parts = []
    if "retry_of" in attrs:
        parts.append(f"retries trial {attrs['retry_of']}")
    if trial.number in retried_as:
        why = "interrupted" if attrs.get("interrupted") else "its sweep stopped while it ran"
        parts.append(f"{why}; retried as trial {retried_as[trial.number]}")
    elif state == "PRUNED" and trial.intermediate_values:
        step = max(trial.intermediate_values)
        parts.append(f"pruned at step {step} (eval loss {trial.intermediate_values[step]:.4f})")
    if attrs.get("note"):
        parts.append(attrs["note"])
    return "; ".join(parts)


def board_rows(trials: Iterable[Any], now: datetime | None = None) -> list[dict]:
    """Rows in display order: complete trials by eval loss (ranked 1, 2, ...), then pruned ones by their best
    eval loss so far, running, waiting, failed. A pruned or failed trial's loss is from before it stopped."""
    trials = list(trials)
    now = now or datetime.now()
    retried_as = {t.user_attrs["retry_of"]: t.number for t in trials if "retry_of" in t.user_attrs}
    rows = []
    for t in trials:
        state = t.state.name
        rows.append({"rank": None, "trial": t.number, "state": state, "eval_loss": _eval_loss(t, state),
                     "params": dict(t.params), "wall_s": _wall_s(t, now), "run_dir": t.user_attrs.get("run_dir"),
                     "note": _note(t, state, retried_as), "log_tail": t.user_attrs.get("log_tail")})
    rows.sort(key=lambda r: (STATE_ORDER.get(r["state"], 9),
                             r["eval_loss"] if r["eval_loss"] is not None else math.inf, r["trial"]))
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


def board_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The header and cells shared by the terminal, Markdown and HTML tables."""
    keys = param_keys(rows)
    header = ["rank", "trial", "state", "eval loss", *keys, "wall s", "run", "note"]
    cells = []
    for r in rows:
        note = r["note"] if len(r["note"]) <= NOTE_CHARS else r["note"][:NOTE_CHARS - 3] + "..."
        run = Path(r["run_dir"]).name if r["run_dir"] else "-"
        cells.append([cell(r["rank"]), str(r["trial"]), r["state"].lower(),
                      "-" if r["eval_loss"] is None else f"{r['eval_loss']:.4f}",
                      *(cell(r["params"].get(k)) for k in keys),
                      "-" if r["wall_s"] is None else f"{r['wall_s']:.0f}", run, note or ""])
    return header, cells


def markdown_table(header: list[str], cells: list[list[str]]) -> str:
    clean = lambda c: str(c).replace("|", "\\|").replace("\n", " ")
    return "\n".join(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
                     + ["| " + " | ".join(clean(c) for c in row) + " |" for row in cells])


def board_markdown(rows: list[dict], title: str, limit: int | None = None) -> str:
    """The leaderboard as Markdown (it reads well in a terminal too); `limit`: only the first rows."""
    header, cells = board_table(rows)
    shown = cells if limit is None else cells[:limit]
    more = f"\n\n({len(cells) - len(shown)} more rows in leaderboard.md)" if len(shown) < len(cells) else ""
    return f"{title}\n\n{markdown_table(header, shown)}{more}"


def write_board(sweep_dir: Path, rows: list[dict], summary: dict) -> None:
    """leaderboard.md and leaderboard.json, each replaced in one rename (a reader never sees half)."""
    best = best_row(rows)
    title = f"# Sweep {summary.get('study', '')}: {len(rows)} trials"
    lines = [title]
    if best:
        lines += [(f"Best: trial {best['trial']}, eval loss {best['eval_loss']:.4f}, run {best['run_dir']}; "
                   f"its config: {sweep_dir / 'best.yaml'}")]
    header, cells = board_table(rows)
    write_text(sweep_dir / "leaderboard.md", "\n\n".join([*lines, markdown_table(header, cells)]) + "\n")
    write_json(sweep_dir / "leaderboard.json", {**summary, "best": best, "trials": rows})
