"""`data inspect`: what the model will learn, shown before any training.

Rendered examples with the supervised tokens marked (colour on a terminal, [[brackets]] otherwise),
counts per format, token-length percentiles, the share truncated or dropped, bad rows, and the
packing efficiency (real tokens / token slots). Preference pairs show their prompt once and both answers,
each with its supervised tokens marked, and the answers' lengths.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from instructkit.config import IGNORE, DataConfig
from instructkit.data.packing import packing_efficiency
from instructkit.data.pipeline import build_datasets
from instructkit.data.preference import PairExample
from instructkit.data.tokenize import Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

GREEN, RESET = "\033[42;30m", "\033[0m"
SHOWN_BAD = 5


def supervised_spans(example: Example, tokenizer: PreTrainedTokenizerBase, start: int = 0) -> list[dict]:
    """The example (from token `start`) as consecutive runs of tokens, each decoded, with whether it is
    supervised."""
    spans: list[dict] = []
    for token, label in zip(example.input_ids[start:], example.labels[start:]):
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


def shared_prompt(pair: PairExample) -> int:
    """Tokens of the prompt both sides begin with: the unsupervised common prefix (display only; the masks
    themselves were built segment by segment)."""
    n = 0
    for (a, la), (b, lb) in zip(zip(pair.chosen.input_ids, pair.chosen.labels),
                                zip(pair.rejected.input_ids, pair.rejected.labels)):
        if a != b or la != IGNORE or lb != IGNORE:
            break
        n += 1
    return n


def _pair_example(pair: PairExample, tokenizer: PreTrainedTokenizerBase) -> dict:
    n = shared_prompt(pair)
    sides = {name: {"input_ids": side.input_ids, "labels": side.labels, "spans": supervised_spans(side, tokenizer, n)}
             for name, side in (("chosen", pair.chosen), ("rejected", pair.rejected))}
    return {"where": pair.where, "prompt": {"text": tokenizer.decode(pair.chosen.input_ids[:n]), "tokens": n}, **sides}


def _kind_specific(data, tokenizer: PreTrainedTokenizerBase, max_length: int, n: int) -> dict:
    """Lengths, supervised share, packing and the shown examples: per example, or per pair (both sides)."""
    if data.stats["kind"] != "preference":
        lengths = [len(e.input_ids) for e in data.train]
        return {"lengths": lengths, "supervised_share": sum(e.n_supervised for e in data.train) / max(sum(lengths), 1),
                "packing_efficiency": packing_efficiency(lengths, max_length) if lengths else 0.0,
                "examples": [{"where": e.where, "input_ids": e.input_ids, "labels": e.labels,
                              "spans": supervised_spans(e, tokenizer)} for e in data.train[:n]]}
    sides = [s for p in data.train for s in (p.chosen, p.rejected)]
    answers = {name: [getattr(p, name).n_supervised for p in data.train] for name in ("chosen", "rejected")}
    return {"lengths": [p.length for p in data.train],
            "supervised_share": sum(s.n_supervised for s in sides) / max(sum(len(s.input_ids) for s in sides), 1),
            "packing_efficiency": None, "answer_tokens": {k: _percentiles(v) for k, v in answers.items()},
            "examples": [_pair_example(p, tokenizer) for p in data.train[:n]]}


def inspect_data(data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, n: int = 3) -> dict:
    """Everything `data inspect` shows, as plain data (what --json prints). For pairs (kind "preference")
    token lengths are per pair (its longer side), each example has `prompt`, `chosen` and `rejected`, and
    `answer_tokens` gives the supervised lengths of the two answers."""
    data = build_datasets(data_cfg, tokenizer, seed)
    st = data.stats
    rows = st["train"]["rows"] + st["bad_rows"]["train"]["bad"]
    specific = _kind_specific(data, tokenizer, data_cfg.max_length, n)
    lengths = specific.pop("lengths")
    return {
        "kind": st["kind"], "formats": st["formats"], "rows_per_format": st["format_counts"],
        "template": st["template"], "rows": rows, "examples_kept": len(data.train), "eval_examples": len(data.eval),
        "dropped": st["train"]["dropped"], "truncated": st["train"]["truncated"],
        "dropped_share": st["train"]["dropped"] / max(rows, 1),
        "truncated_share": st["train"]["truncated"] / max(rows, 1),
        "bad_rows": st["bad_rows"]["train"]["counts"], "bad_row_examples": st["bad_rows"]["train"]["examples"],
        "token_lengths": _percentiles(lengths), "max_length": data_cfg.max_length,
        "packing": data_cfg.packing, "cache": st["cache"], **specific,
    }


def _marked(spans: list[dict], color: bool) -> str:
    return "".join((f"{GREEN}{s['text']}{RESET}" if color else f"[[{s['text']}]]") if s["supervised"] else s["text"]
                   for s in spans)


def _format_examples(report: dict, color: bool) -> list[str]:
    shown = f", shown {GREEN}like this{RESET}" if color else ", shown [[like this]]"
    out = []
    for example in report["examples"]:
        if "prompt" not in example:
            supervised = sum(s["tokens"] for s in example["spans"] if s["supervised"])
            out.append(f"--- {example['where']} ({len(example['input_ids'])} tokens, {supervised} supervised{shown})")
            out.append(_marked(example["spans"], color))
            continue
        out.append(f"--- {example['where']}: prompt ({example['prompt']['tokens']} tokens, shared by both answers)")
        out.append(example["prompt"]["text"])
        for name in ("chosen", "rejected"):
            side = example[name]
            supervised = sum(s["tokens"] for s in side["spans"] if s["supervised"])
            out.append(f"--- {name} answer ({len(side['input_ids'])} tokens with the prompt, {supervised} "
                       f"supervised{shown})")
            out.append(_marked(side["spans"], color))
    return out


def format_inspection(report: dict, color: bool) -> str:
    """The human-readable page: examples first, then the statistics."""
    out = _format_examples(report, color)
    pairs = report.get("kind") == "preference"
    unit = "pairs" if pairs else "examples"
    lengths = report["token_lengths"]
    formats = ", ".join(f"{fmt}: {count}" for fmt, count in report["rows_per_format"].items())
    out += [
        "--- statistics",
        f"rows: {report['rows']} ({formats}); template: {report['template']}; formats chosen: "
        + ", ".join(f"{k} -> {v}" for k, v in report["formats"].items()),
        f"{unit} kept: {report['examples_kept']}; dropped over max_length={report['max_length']}: "
        f"{report['dropped']} ({report['dropped_share']:.1%}); truncated: {report['truncated']} "
        f"({report['truncated_share']:.1%}); bad rows: "
        + (", ".join(f"{k}: {v}" for k, v in report["bad_rows"].items()) or "none"),
        *[f"  {b['where']}: {b['reason']}: {b['detail']}" for b in report.get("bad_row_examples", [])[:SHOWN_BAD]],
        f"token lengths{' (the longer side of a pair)' if pairs else ''}: p50 {lengths.get('p50', 0):.0f}, "
        f"p90 {lengths.get('p90', 0):.0f}, p99 {lengths.get('p99', 0):.0f}, max {lengths.get('max', 0)}, "
        f"mean {lengths.get('mean', 0)}",
    ]
    for name, answer in report.get("answer_tokens", {}).items():
        out.append(f"{name} answer tokens: p50 {answer.get('p50', 0):.0f}, max {answer.get('max', 0)}, "
                   f"mean {answer.get('mean', 0)}")
    out.append(f"supervised tokens: {report['supervised_share']:.1%} of all tokens"
               + (" (both sides)" if pairs else ""))
    if report["packing_efficiency"] is not None:
        out.append(f"packing efficiency (real tokens / slots in rows of {report['max_length']}): "
                   f"{report['packing_efficiency']:.1%} (packing is {'on' if report['packing'] else 'off'})")
    out.append(f"eval {unit}: {report['eval_examples']}; tokenized data cache: {report['cache']}")
    return "\n".join(out)
