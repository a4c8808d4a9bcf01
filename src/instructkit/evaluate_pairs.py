"""`instructkit eval` on preference pairs: how often a model ranks the chosen answer above the rejected one.

The ranking is the model's own: the chosen answer's log-probability given the prompt against the rejected
one's, summed over answer tokens (what decoding prefers) and per token (what SimPO and ORPO compare). No
reference model is involved, so a supervised model, its base and a preference-tuned model are measured on
the same scale, with the masks training uses (the template the run trained with, only answers scored).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from instructkit.data.sources import read_resolved, resolve_source
from instructkit.data.validate import BadRowReport, enforce
from instructkit.errors import user_error
from instructkit.files import write_json

if TYPE_CHECKING:
    from instructkit.generate import Loaded

EVAL_MAX_LENGTH = 4096  # pairs are scored whole; longer ones are truncated (answers keep their end-of-turn)
PAIR_METRICS = ("pref_accuracy", "pref_accuracy_per_token", "margin", "chosen_logp")


def is_preference_file(path: str) -> bool:
    """Whether an eval file holds preference pairs (its first row has chosen and rejected)."""
    records, _ = read_resolved(resolve_source(path, "train", "--data"))
    return bool(records) and {"chosen", "rejected"} <= set(records[0].data)


def load_pairs(path: str) -> tuple[list, dict[str, str]]:
    """Every pair of the file (any bad row is an error, with file:line) and the task of each (by file:line)."""
    from instructkit.data.formats import RowError
    from instructkit.data.preference import to_pair
    from instructkit.data.sources import BadRow

    records, bad = read_resolved(resolve_source(path, "train", "--data"))
    pairs, tasks = [], {}
    for record in records:
        try:
            pairs.append(to_pair(record.data, record.where))
            tasks[record.where] = str(record.data.get("task", "all"))
        except RowError as exc:
            bad.append(BadRow(record.where, exc.reason, exc.detail))
    enforce(BadRowReport(len(records) + len(bad), bad), "error", 0.0, "eval")
    if not pairs:
        raise user_error(f"no pairs in {path}", "--data", "point it at a file of {prompt, chosen, rejected} rows")
    return pairs, tasks


def pair_logps(loaded: Loaded, conversations: list, batch_size: int = 8
               ) -> list[tuple[str, float, float, int, int]]:
    """(file:line, chosen log-prob, rejected log-prob, chosen tokens, rejected tokens) of each pair."""
    import torch
    from tqdm.auto import tqdm

    from instructkit.config import DataConfig
    from instructkit.data.collate import pad_pairs
    from instructkit.data.preference import to_pair_examples
    from instructkit.loss import PreferenceLoss

    data_cfg = DataConfig(train_file="-", max_length=EVAL_MAX_LENGTH, overlength="truncate")
    examples, bad, _ = to_pair_examples(conversations, loaded.tokenizer, loaded.template, data_cfg)
    enforce(BadRowReport(len(conversations), bad), "error", 0.0, "eval")
    scorer = PreferenceLoss(loaded.model, "simpo", 1.0).eval()
    device = next(loaded.model.parameters()).device
    out = []
    with torch.no_grad():
        for start in tqdm(range(0, len(examples), batch_size), desc="pairs", unit="batch", leave=False,
                          disable=not sys.stderr.isatty()):
            batch = pad_pairs(examples[start:start + batch_size], loaded.tokenizer.pad_token_id)
            logps, lengths = scorer.sequence_logps(batch["input_ids"].to(device), batch["labels"].to(device),
                                                   batch["attention_mask"].to(device))
            b = logps.shape[0] // 2
            where = [e.where for e in examples[start:start + batch_size]]
            out += zip(where, logps[:b].tolist(), logps[b:].tolist(), lengths[:b].int().tolist(),
                       lengths[b:].int().tolist())
    return out


def score_pairs(scores: list[tuple[str, float, float, int, int]], tasks: dict[str, str]) -> dict:
    """Ranking accuracy (summed and per-token log-probs), mean margin and chosen log-prob, overall and per task."""
    def summary(with_where: list[tuple[str, float, float, int, int]]) -> dict:
        rows = [row[1:] for row in with_where]
        n = max(len(rows), 1)
        return {"n": len(rows), "pref_accuracy": sum(c > r for c, r, _, _ in rows) / n,
                "pref_accuracy_per_token": sum(c / max(nc, 1) > r / max(nr, 1) for c, r, nc, nr in rows) / n,
                "margin": sum(c - r for c, r, _, _ in rows) / n, "chosen_logp": sum(c for c, *_ in rows) / n}

    per_task: dict[str, list] = defaultdict(list)
    for row in scores:
        per_task[tasks.get(row[0], "all")].append(row)
    return {**summary(scores), "per_task": {t: summary(rows) for t, rows in sorted(per_task.items())}}


def evaluate_pairs(loaded: Loaded, path: str, out: Path, baseline: bool, base_of, batch_size: int = 8) -> dict:
    """Score the model (and its base: adapter off, or the run's base model) on the pairs of `path`."""
    conversations, tasks = load_pairs(path)
    results = {"model": loaded.source, "data": path, "kind": "preference"}
    tuned = pair_logps(loaded, conversations, batch_size)
    results["tuned"] = score_pairs(tuned, tasks)
    base = None
    if baseline:
        if loaded.is_adapter:
            with loaded.model.disable_adapter():
                base = pair_logps(loaded, conversations, batch_size)
        else:
            base = pair_logps(base_of(loaded), conversations, batch_size)
        results["base"] = score_pairs(base, tasks)
        results["difference"] = {m: results["tuned"][m] - results["base"][m] for m in PAIR_METRICS}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval.json", results)
    with open(out / "pairs.jsonl", "w", encoding="utf-8") as handle:
        for i, (where, chosen, rejected, _, _) in enumerate(tuned):
            record = {"where": where, "task": tasks.get(where, "all"), "chosen_logp": chosen, "rejected_logp": rejected}
            if base:
                record |= {"base_chosen_logp": base[i][1], "base_rejected_logp": base[i][2]}
            handle.write(json.dumps(record) + "\n")
    results["out_dir"] = str(out)
    return results


def format_pair_results(results: dict) -> str:
    tuned, base = results["tuned"], results.get("base")
    fmt = {"pref_accuracy": lambda v: f"{100 * v:.1f}%", "pref_accuracy_per_token": lambda v: f"{100 * v:.1f}%",
           "margin": lambda v: f"{v:.3f}", "chosen_logp": lambda v: f"{v:.3f}"}
    lines = [f"n = {tuned['n']} pairs (log-probabilities of each answer given its prompt, answer tokens only)", "",
             "| metric | base | tuned |" if base else "| metric | value |",
             "| --- | --- | --- |" if base else "| --- | --- |"]
    for m in PAIR_METRICS:
        lines.append(f"| {m} | {fmt[m](base[m])} | {fmt[m](tuned[m])} |" if base else f"| {m} | {fmt[m](tuned[m])} |")
    if len(tuned["per_task"]) > 1:
        lines += ["", "| task | n | pref accuracy base | tuned |" if base else "| task | n | pref accuracy |",
                  "|" + " --- |" * (4 if base else 3)]
        for task, t in tuned["per_task"].items():
            b = base["per_task"][task] if base else None
            lines.append(f"| {task} | {t['n']} | {fmt['pref_accuracy'](b['pref_accuracy'])} | "
                         f"{fmt['pref_accuracy'](t['pref_accuracy'])} |" if b else
                         f"| {task} | {t['n']} | {fmt['pref_accuracy'](t['pref_accuracy'])} |")
    return "\n".join(lines)
