"""Compare runs: the config keys that differ, and their evaluations side by side (curves are drawn by the
page from each run's metrics.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

from instructkit.rundir import config_differences, flatten
from instructkit.studio.form import yaml_text
from instructkit.studio.runs import read_config

METRICS = (("loss", "{:.4f}"), ("perplexity", "{:.3f}"), ("exact_match", "{:.1%}"), ("rouge_l", "{:.1%}"))


def config_rows(run_dirs: list[Path]) -> list[list[str]]:
    """[key, value in run 1, value in run 2, ...] for every key whose value is not the same in all runs."""
    configs = [read_config(d) for d in run_dirs]
    keys = {line.split(":", 1)[0] for other in configs[1:] for line in config_differences(configs[0], other)}
    flats = [flatten(c) for c in configs]
    keys |= {k for f in flats[1:] for k in f if f.get(k) != flats[1].get(k)}  # runs 2.. may differ among themselves
    return [[k] + [yaml_text(f[k]) if k in f else "-" for f in flats] for k in sorted(keys)]


def eval_rows(run_dirs: list[Path]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: each metric (and per-task exact match) for every run's tuned model, and its base
    where the evaluation had one; empty when no run has been evaluated."""
    results = []
    for d in run_dirs:
        try:
            results.append(json.loads((d / "eval/eval.json").read_text()))
        except (OSError, ValueError):
            results.append(None)
    if not any(results):
        return [], []
    header, columns = ["metric"], []
    for d, r in zip(run_dirs, results):
        header.append(f"{d.name} tuned")
        columns.append((r or {}).get("tuned"))
        if r and r.get("base"):
            header.append(f"{d.name} base")
            columns.append(r["base"])
    # a metric an evaluation lacks (a preference run's eval has no perplexity) is "-", not an error
    rows = [[m] + [fmt.format(c[m]) if c and isinstance(c.get(m), (int, float)) else "-" for c in columns]
            for m, fmt in METRICS]
    tasks = dict.fromkeys(t for c in columns if c for t in c.get("per_task", {}))
    for task in tasks if len(tasks) > 1 else ():
        rows.append([f"exact match: {task}"] + [f"{c['per_task'][task]['exact_match']:.1%}"
                                                if c and task in c.get("per_task", {}) else "-" for c in columns])
    return header, rows
