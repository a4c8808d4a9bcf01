"""Evaluation: loss and perplexity on supervised tokens, and generation metrics (exact match, ROUGE-L)
of greedy outputs against references, per task, for the tuned model and optionally its base.

The base model ("before") is the run's base with the adapter switched off, or for a full fine-tune the
base model the run's manifest names; both sides get identical prompt tokens.
"""

from __future__ import annotations

import json
import math
import re
import string
import sys
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from instructkit.data.collate import pad_batch
from instructkit.data.formats import Conversation
from instructkit.data.sources import read_resolved, resolve_source
from instructkit.data.templates import render_segments
from instructkit.data.tokenize import Example, tokenize_segments
from instructkit.data.validate import BadRowReport, convert_records, enforce
from instructkit.errors import UserError, user_error
from instructkit.files import write_json
from instructkit.generate import Loaded, generate, load_for_inference
from instructkit.models import base_model_of

if TYPE_CHECKING:
    from instructkit.config import RunConfig
    from instructkit.data.sources import Record

_TRAILING = string.punctuation + " "
METRICS = ("loss", "perplexity", "exact_match", "rouge_l")


def normalize(text: str) -> str:
    """Case-folded, whitespace collapsed, surrounding quotes and trailing punctuation removed."""
    text = re.sub(r"\s+", " ", text.strip().casefold())
    return text.strip("\"'`").rstrip(_TRAILING)


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of tokens), from the rouge-score package."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure


def rows_from_records(records: list[Record], key: str) -> list[dict]:
    """Prompt messages, reference (the last assistant turn), task and provenance of every row."""
    conversations, wrong, _, _ = convert_records(records, ["auto"] * (max(r.source for r in records) + 1),
                                                 [None] * (max(r.source for r in records) + 1))
    enforce(BadRowReport(len(records), wrong), "error", 0.0, key)
    tasks = {r.where: r.data.get("task", "all") for r in records}
    return [{"conversation": c, "messages": c.messages[:-1], "reference": c.messages[-1].content,
             "task": str(tasks[c.where]), "where": c.where} for c in conversations]


def load_eval_rows(path: str) -> list[dict]:
    """Rows of an eval file in any format the trainer accepts; any bad row is an error."""
    records, bad = read_resolved(resolve_source(path, "train", "--data"))
    enforce(BadRowReport(len(records) + len(bad), bad), "error", 0.0, "eval")
    if not records:
        raise user_error(f"no rows in {path}", "--data", "point it at a file with rows")
    return rows_from_records(records, "eval")


def supervised_loss(loaded: Loaded, conversations: list[Conversation], batch_size: int = 8) -> float:
    """Mean loss per supervised token, with the masks training uses."""
    import torch
    from tqdm.auto import tqdm

    from instructkit.loss import SupervisedLoss, count_supervised

    examples = [Example(*tokenize_segments(render_segments(loaded.template, loaded.tokenizer, c.messages),
                                           loaded.tokenizer)) for c in conversations]
    loss_fn = SupervisedLoss(loaded.model).eval()
    device = next(loaded.model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for start in tqdm(range(0, len(examples), batch_size), desc="eval loss", unit="batch", leave=False,
                          disable=not sys.stderr.isatty()):
            batch = pad_batch(examples[start:start + batch_size], loaded.tokenizer.pad_token_id)
            count += count_supervised(batch)
            total += float(loss_fn(**{k: v.to(device) for k, v in batch.items()}))
    return total / max(count, 1)


def score(rows: list[dict], key: str, loss: float) -> dict:
    """Loss, perplexity, exact match and ROUGE-L overall, and the generation metrics per task."""
    per_task: dict[str, list[tuple[bool, float]]] = defaultdict(list)
    for row in rows:
        per_task[row["task"]].append((exact_match(row[key], row["reference"]), rouge_l(row[key], row["reference"])))
    every = [pair for pairs in per_task.values() for pair in pairs]
    mean = lambda pairs, i: sum(p[i] for p in pairs) / len(pairs)  # noqa: E731
    return {"n": len(every), "loss": loss, "perplexity": math.exp(min(loss, 50)),
            "exact_match": mean(every, 0), "rouge_l": mean(every, 1),
            "per_task": {t: {"n": len(p), "exact_match": mean(p, 0), "rouge_l": mean(p, 1)}
                         for t, p in sorted(per_task.items())}}


def difference(tuned: dict, base: dict) -> dict:
    out = {m: tuned[m] - base[m] for m in METRICS}
    out["per_task"] = {t: {m: v[m] - base["per_task"][t][m] for m in ("exact_match", "rouge_l")}
                       for t, v in tuned["per_task"].items()}
    return out


def _measure(loaded: Loaded, rows: list[dict], key: str, options: dict) -> dict:
    for row, output in zip(rows, generate(loaded, [row["messages"] for row in rows], **options)):
        row[key] = output
    return score(rows, key, supervised_loss(loaded, [row["conversation"] for row in rows]))


def _base_of(loaded: Loaded, allow_pickle: bool) -> Loaded:
    try:
        base_name = base_model_of(loaded.source)
    except UserError as exc:
        raise user_error("--baseline needs a run directory, whose manifest names the base model", loaded.source,
                         "pass runs/NAME, or drop --baseline") from exc
    base = load_for_inference(base_name, allow_pickle=allow_pickle)
    return Loaded(base.model, loaded.tokenizer, loaded.template, base.source, False)


def evaluate_rows(loaded: Loaded, rows: list[dict], out: Path, baseline: bool = False, max_new_tokens: int = 64,
                  batch_size: int = 16, allow_pickle: bool = False, data: str = "") -> dict:
    """Score the tuned model (and the base), and write eval.json and predictions.jsonl into `out`."""
    options = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "progress": True}
    results = {"model": loaded.source, "data": data, "tuned": _measure(loaded, rows, "tuned", options)}
    if baseline:
        if loaded.is_adapter:
            with loaded.model.disable_adapter():
                results["base"] = _measure(loaded, rows, "base", options)
        else:
            results["base"] = _measure(_base_of(loaded, allow_pickle), rows, "base", options)
        results["difference"] = difference(results["tuned"], results["base"])
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval.json", results)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as handle:
        for row in rows:
            last = row["messages"][-1]
            record = {"where": row["where"], "task": row["task"], "prompt": last.content, "input": last.input,
                      "reference": row["reference"], "base": row.get("base"), "tuned": row["tuned"]}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    results["out_dir"] = str(out)
    return results


def evaluate(run_or_model: str, data_path: str, baseline: bool = False, out_dir: str | None = None,
             max_new_tokens: int = 64, batch_size: int = 16, allow_pickle: bool = False) -> dict:
    """`instructkit eval`: every row of `data_path`; results in RUN/eval (or out_dir). Preference pairs are
    scored by how the model ranks their answers (evaluate_pairs.py), everything else by generation."""
    from instructkit.evaluate_pairs import evaluate_pairs, is_preference_file

    pairs = is_preference_file(data_path)
    rows = None if pairs else load_eval_rows(data_path)
    loaded = load_for_inference(run_or_model, allow_pickle=allow_pickle)
    run_dir = Path(run_or_model)
    out = Path(out_dir) if out_dir else (run_dir / "eval" if (run_dir / "manifest.json").is_file() else Path("eval"))
    if pairs:
        return evaluate_pairs(loaded, data_path, out, baseline, lambda m: _base_of(m, allow_pickle), batch_size)
    return evaluate_rows(loaded, rows, out, baseline, max_new_tokens, batch_size, allow_pickle, data_path)


def held_out_rows(cfg: RunConfig) -> list[dict]:
    """The run's eval data as rows (data.eval_file, or the same val_size split training held out)."""
    from instructkit.data.pipeline import read_conversations, resolve_sources, split_off

    specs = cfg.data.eval_specs or cfg.data.train_specs
    resolved = resolve_sources(specs, "data.eval_file" if cfg.data.eval_specs else "data.train_file")
    conversations, _, _, _ = read_conversations(specs, resolved, cfg.data, cfg.seed)
    if not cfg.data.eval_specs:
        from instructkit.defaults import auto_val_size

        # `auto` resolved as training resolved it
        size = auto_val_size(cfg.data.val_size, len(conversations), False).value
        _, conversations = split_off(conversations, size, cfg.seed)
    tasks = {r.where: str(r.data.get("task", "all")) for i, res in enumerate(resolved) for r in read_resolved(res, i)[0]}
    return [{"conversation": c, "messages": c.messages[:-1], "reference": c.messages[-1].content,
             "task": tasks.get(c.where, "all"), "where": c.where} for c in conversations[: cfg.eval.max_samples]]


def evaluate_run(run_dir: Path, cfg: RunConfig) -> dict:
    """Generation metrics on the eval split right after training (eval.generate), into RUN/eval."""
    loaded = load_for_inference(str(run_dir), allow_pickle=cfg.model.allow_pickle)
    return evaluate_rows(loaded, held_out_rows(cfg), Path(run_dir) / "eval", cfg.eval.baseline,
                         cfg.eval.max_new_tokens, cfg.train.per_device_eval_batch_size, cfg.model.allow_pickle,
                         "eval split of the run")


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def format_results(results: dict) -> str:
    """Base, tuned and difference per metric, then exact match and ROUGE-L per task."""
    if results.get("kind") == "preference":
        from instructkit.evaluate_pairs import format_pair_results

        return format_pair_results(results)
    tuned, base, diff = results["tuned"], results.get("base"), results.get("difference")
    fmt = {"loss": lambda v: f"{v:.4f}", "perplexity": lambda v: f"{v:.3f}", "exact_match": _pct, "rouge_l": _pct}
    signed = {"loss": lambda v: f"{v:+.4f}", "perplexity": lambda v: f"{v:+.3f}",
              "exact_match": lambda v: f"{100 * v:+.1f}", "rouge_l": lambda v: f"{100 * v:+.1f}"}
    lines = [f"n = {tuned['n']}", "", "| metric | base | tuned | difference |" if base else "| metric | value |",
             "| --- | --- | --- | --- |" if base else "| --- | --- |"]
    for m in METRICS:
        lines.append(f"| {m} | {fmt[m](base[m])} | {fmt[m](tuned[m])} | {signed[m](diff[m])} |" if base
                     else f"| {m} | {fmt[m](tuned[m])} |")
    if len(tuned["per_task"]) > 1:
        lines += ["", "| task | n | exact match base | tuned | ROUGE-L base | tuned |" if base
                  else "| task | n | exact match | ROUGE-L |", "|" + " --- |" * (6 if base else 4)]
        for task, t in tuned["per_task"].items():
            b = base["per_task"][task] if base else None
            lines.append(f"| {task} | {t['n']} | {_pct(b['exact_match'])} | {_pct(t['exact_match'])} | "
                         f"{_pct(b['rouge_l'])} | {_pct(t['rouge_l'])} |" if b else
                         f"| {task} | {t['n']} | {_pct(t['exact_match'])} | {_pct(t['rouge_l'])} |")
    return "\n".join(lines)
