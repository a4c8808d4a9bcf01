"""`data inspect`: what the model will learn, shown before any training.

Rendered examples with the supervised tokens marked (colour on a terminal, [[brackets]] otherwise),
counts per format, token-length percentiles, the share truncated or dropped, bad rows, and the
packing efficiency (real tokens / token slots).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from instructkit.config import IGNORE, DataConfig
from instructkit.data.packing import packing_efficiency
from instructkit.data.pipeline import build_datasets
from instructkit.data.tokenize import Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

GREEN, RESET = "\033[42;30m", "\033[0m"


def supervised_spans(example: Example, tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    """The example as consecutive runs of tokens, each decoded, with whether it is supervised."""
    spans: list[dict] = []
    for token, label in zip(example.input_ids, example.labels):
        supervised = label != IGNORE
        if spans and spans[-1]["supervised"] == supervised:
            spans[-1]["ids"].append(token)
        else:
            spans.append({"supervised": supervised, "ids": [token]})
    return [{"text": tokenizer.decode(s["ids"]), "supervised": s["supervised"], "tokens": len(s["ids"])}
            for s in spans]


def _percentiles(lengths: list[int]) -> dict:
    import numpy as np

    if not lengths:
        return {}
    values = np.percentile(lengths, [50, 90, 99])
    return {"p50": float(values[0]), "p90": float(values[1]), "p99": float(values[2]), "max": max(lengths),
            "mean": round(sum(lengths) / len(lengths), 1)}


def inspect_data(data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, n: int = 3) -> dict:
    """Everything `data inspect` shows, as plain data (what --json prints)."""
    data = build_datasets(data_cfg, tokenizer, seed)
    st = data.stats
    lengths = [len(e.input_ids) for e in data.train]
    rows = st["train"]["rows"] + st["bad_rows"]["train"]["bad"]
    supervised = sum(e.n_supervised for e in data.train)
    return {
        "formats": st["formats"], "rows_per_format": st["format_counts"], "template": st["template"],
        "rows": rows, "examples_kept": len(data.train), "eval_examples": len(data.eval),
        "dropped": st["train"]["dropped"], "truncated": st["train"]["truncated"],
        "dropped_share": st["train"]["dropped"] / max(rows, 1), "truncated_share": st["train"]["truncated"] / max(rows, 1),
        "bad_rows": st["bad_rows"]["train"]["counts"],
        "token_lengths": _percentiles(lengths), "max_length": data_cfg.max_length,
        "supervised_share": supervised / max(sum(lengths), 1),
        "packing_efficiency": packing_efficiency(lengths, data_cfg.max_length) if lengths else 0.0,
        "packing": data_cfg.packing, "cache": st["cache"],
        "examples": [{"where": e.where, "input_ids": e.input_ids, "labels": e.labels,
                      "spans": supervised_spans(e, tokenizer)} for e in data.train[:n]],
    }


def format_inspection(report: dict, color: bool) -> str:
    """The human-readable page: examples first, then the statistics."""
    out = []
    for example in report["examples"]:
        supervised = sum(s["tokens"] for s in example["spans"] if s["supervised"])
        out.append(f"--- {example['where']} ({len(example['input_ids'])} tokens, {supervised} supervised"
                   f"{', shown ' + GREEN + 'like this' + RESET if color else ', shown [[like this]]'})")
        out.append("".join((f"{GREEN}{s['text']}{RESET}" if color else f"[[{s['text']}]]") if s["supervised"]
                           else s["text"] for s in example["spans"]))
    lengths = report["token_lengths"]
    formats = ", ".join(f"{fmt}: {count}" for fmt, count in report["rows_per_format"].items())
    out += [
        "--- statistics",
        f"rows: {report['rows']} ({formats}); template: {report['template']}; formats chosen: "
        + ", ".join(f"{k} -> {v}" for k, v in report["formats"].items()),
        f"examples kept: {report['examples_kept']}; dropped over max_length={report['max_length']}: "
        f"{report['dropped']} ({report['dropped_share']:.1%}); truncated: {report['truncated']} "
        f"({report['truncated_share']:.1%}); bad rows: "
        + (", ".join(f"{k}: {v}" for k, v in report["bad_rows"].items()) or "none"),
        f"token lengths: p50 {lengths.get('p50', 0):.0f}, p90 {lengths.get('p90', 0):.0f}, "
        f"p99 {lengths.get('p99', 0):.0f}, max {lengths.get('max', 0)}, mean {lengths.get('mean', 0)}",
        f"supervised tokens: {report['supervised_share']:.1%} of all tokens",
        f"packing efficiency (real tokens / slots in rows of {report['max_length']}): "
        f"{report['packing_efficiency']:.1%} (packing is {'on' if report['packing'] else 'off'})",
        f"eval examples: {report['eval_examples']}; tokenized data cache: {report['cache']}",
    ]
    return "\n".join(out)
