"""Generation evaluation: exact match of greedy outputs against references, per task, before and after.

The base model ("before") is the run's base with the adapter switched off, or for a full fine-tune the
base model the run's manifest names; both sides get identical prompt tokens.
"""

from __future__ import annotations

import json
import re
import string
from collections import defaultdict
from pathlib import Path

from instructkit.data.sources import read_resolved, resolve_source
from instructkit.data.validate import BadRowReport, convert_records, enforce
from instructkit.errors import user_error
from instructkit.generate import Loaded, generate, load_for_inference
from instructkit.rundir import write_json

_TRAILING = string.punctuation + " "


def normalize(text: str) -> str:
    """Case-folded, whitespace collapsed, surrounding quotes and trailing punctuation removed."""
    text = re.sub(r"\s+", " ", text.strip().casefold())
    return text.strip("\"'`").rstrip(_TRAILING)


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def load_eval_rows(path: str) -> list[dict]:
    """Prompt messages, reference (the last assistant turn) and task of every row of an eval file,
    in any format the trainer accepts; any bad row is an error."""
    resolved = resolve_source(path, "train", "--data")
    records, bad = read_resolved(resolved)
    conversations, wrong, _, _ = convert_records(records, ["auto"], [None])
    enforce(BadRowReport(len(records) + len(bad), bad + wrong), "error", 0.0, "eval")
    tasks = {r.where: r.data.get("task", "all") for r in records}
    return [{"messages": c.messages[:-1], "reference": c.messages[-1].content,
             "task": tasks[c.where], "where": c.where} for c in conversations]


def accuracy_table(rows: list[dict], key: str) -> dict:
    """Exact-match accuracy overall and per task for the outputs stored under `key`."""
    per_task: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        per_task[row["task"]].append(exact_match(row[key], row["reference"]))
    hits = [hit for values in per_task.values() for hit in values]
    result = {"exact_match": sum(hits) / len(hits), "n": len(hits)}
    if len(per_task) > 1:
        result["per_task"] = {t: sum(v) / len(v) for t, v in sorted(per_task.items())}
    return result


def _baseline_outputs(loaded: Loaded, prompts: list, options: dict, allow_pickle: bool) -> list[str]:
    if loaded.is_adapter:
        with loaded.model.disable_adapter():
            return generate(loaded, prompts, **options)
    manifest = Path(loaded.source).parent / "manifest.json"
    if not manifest.is_file():
        raise user_error("--baseline needs a run directory, whose manifest names the base model", loaded.source,
                         "pass runs/NAME, or drop --baseline")
    base = load_for_inference(json.loads(manifest.read_text())["model"]["resolved"], allow_pickle=allow_pickle)
    return generate(Loaded(base.model, loaded.tokenizer, loaded.template, base.source, False), prompts, **options)


def evaluate(run_or_model: str, data_path: str, baseline: bool = False, out_dir: str | None = None,
             max_new_tokens: int = 64, batch_size: int = 16, allow_pickle: bool = False) -> dict:
    """Generate for every row, score, and write eval.json and predictions.jsonl into out_dir."""
    rows = load_eval_rows(data_path)
    loaded = load_for_inference(run_or_model, allow_pickle=allow_pickle)
    prompts = [row["messages"] for row in rows]
    options = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "progress": True}
    for row, output in zip(rows, generate(loaded, prompts, **options)):
        row["tuned"] = output
    results = {"model": loaded.source, "data": data_path, "tuned": accuracy_table(rows, "tuned")}
    if baseline:
        for row, output in zip(rows, _baseline_outputs(loaded, prompts, options, allow_pickle)):
            row["base"] = output
        results["base"] = accuracy_table(rows, "base")
    run_dir = Path(run_or_model)
    out = Path(out_dir) if out_dir else (run_dir / "eval" if (run_dir / "manifest.json").is_file() else Path("eval"))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval.json", results)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as handle:
        for row in rows:
            record = {"where": row["where"], "task": row["task"], "prompt": row["messages"][-1].content,
                      "input": row["messages"][-1].input, "reference": row["reference"],
                      "base": row.get("base"), "tuned": row["tuned"]}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    results["out_dir"] = str(out)
    return results


def format_results(results: dict) -> str:
    """The before/after table: exact match overall and per task, in percent."""
    tuned, base = results["tuned"], results.get("base")
    tasks = sorted(tuned.get("per_task", {}))
    lines = ["| task | base | tuned | gain |" if base else "| task | exact match |",
             "| --- | --- | --- | --- |" if base else "| --- | --- |"]
    for name, t, b in [(t, tuned["per_task"][t], base and base["per_task"][t]) for t in tasks] + \
            [("all", tuned["exact_match"], base and base["exact_match"])]:
        label = f"**{name}** (n={tuned['n']})" if name == "all" else name
        lines.append(f"| {label} | {100 * b:.1f}% | {100 * t:.1f}% | {100 * (t - b):+.1f} |" if base
                     else f"| {label} | {100 * t:.1f}% |")
    return "\n".join(lines)
