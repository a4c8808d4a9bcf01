"""Data preview: what `instructkit data inspect --json` shows, plus a length histogram and the bad rows.

The examples, counts and statistics are `inspect_data`'s own dict (the same data as `data inspect --json`).
The preview reads the rows with `on_bad_row: skip`, so every bad row is listed with its file:line however
the config sets it; the page says when training would stop on them.
"""

from __future__ import annotations

import threading

from instructkit.config import RunConfig
from instructkit.errors import UserError

_lock = threading.Lock()  # one tokenization at a time: the machine may be training too
BINS = 20


def histogram(lengths: list[int], max_length: int, bins: int = BINS) -> dict:
    """Counts of token lengths in equal bins from 0 to the longest example (or max_length)."""
    top = max([*lengths, 1]) if lengths else max_length
    width = max(1, -(-top // bins))
    counts = [0] * bins
    for n in lengths:
        counts[min(n // width, bins - 1)] += 1
    return {"width": width, "counts": counts, "max_length": max_length}


def preview(cfg: RunConfig, n: int = 3) -> dict:
    """inspect_data's report for the config, with `histogram`, `bad` (file:line rows) and `stops_training`."""
    from instructkit.data.inspect import inspect_data
    from instructkit.data.pipeline import build_datasets
    from instructkit.models import load_config_tokenizer

    data_cfg = cfg.data.model_copy(update={"on_bad_row": "skip", "max_bad_fraction": 1.0})
    with _lock:
        _, tokenizer = load_config_tokenizer(cfg.model)
        report = inspect_data(data_cfg, tokenizer, cfg.seed, n=n)
        data = build_datasets(data_cfg, tokenizer, cfg.seed)  # the same pipeline again (a cache hit): lengths, bad rows
    lengths = [e.length for e in data.train]  # a pair's longer side
    bad = data.stats["bad_rows"]["train"]
    report["histogram"] = histogram(lengths, cfg.data.max_length)
    report["bad"] = bad.get("examples", [])
    report["bad_total"] = bad.get("bad", 0)
    too_many = bad.get("bad", 0) / max(bad.get("rows", 0), 1) > cfg.data.max_bad_fraction
    report["stops_training"] = bool(bad.get("bad")) and (cfg.data.on_bad_row == "error" or too_many)
    report["examples"] = [shown for example in report["examples"] for shown in _shown(example)]
    return report


def _shown(example: dict) -> list[dict]:
    """What the page draws of an example: its spans and counts (ids stay in `data inspect --json`); a
    preference pair as two examples, the prompt with the chosen answer and with the rejected one."""
    if "chosen" not in example:
        return [{**{k: v for k, v in example.items() if k not in ("input_ids", "labels")},
                 "n_tokens": len(example["input_ids"]),
                 "n_supervised": sum(label != -100 for label in example["labels"])}]
    prompt = [{"text": example["prompt"]["text"], "supervised": False}]
    return [{"where": f"{example['where']} ({side})", "spans": prompt + example[side]["spans"],
             "n_tokens": len(example[side]["input_ids"]),
             "n_supervised": sum(label != -100 for label in example[side]["labels"])}
            for side in ("chosen", "rejected")]


def safe_preview(cfg: RunConfig, n: int = 3) -> dict:
    """preview(), with bad input (a missing file, an unknown model, a broken template) as {'error': ...}."""
    try:
        return preview(cfg, n)
    except UserError as exc:
        return {"error": str(exc)}
