"""build_datasets: sources -> records -> conversations -> segments -> examples, checked and cached.

The cache key covers the data files' contents, the tokenizer, the template and every data setting
that changes the result, so a second run starts at once and a changed file is never served stale.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock

from instructkit.config import DataConfig, DatasetSpec, instructkit_home
from instructkit.data.formats import Conversation
from instructkit.data.preference import PairConversation, PairExample, split_pairs, to_pair_examples
from instructkit.data.sources import BadRow, Resolved, apply_weight, read_resolved, resolve_source
from instructkit.data.templates import Template, resolve_template
from instructkit.data.tokenize import Example, fit_length, tokenize_conversations
from instructkit.data.validate import BadRowReport, convert_records, enforce
from instructkit.defaults import auto_val_size
from instructkit.errors import UserError, user_error
from instructkit.files import atomic_path

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# 3: user text spelling a special token is tokenized as plain text; 4: stats record val_size; 5: preference pairs
# (train-chosen/train-rejected example sets, stats["kind"])
CACHE_FORMAT = 5


@dataclass
class Datasets:
    """Tokenized train and eval sets: `Example`s, or `PairExample`s when stats["kind"] is "preference"."""

    train: list[Example] | list[PairExample]
    eval: list[Example] | list[PairExample]
    template: Template
    stats: dict = field(default_factory=dict)


def data_kind(formats: dict[str, str], split: str) -> str:
    """The kind of a split: "preference" when its sources are preference pairs, else "sft"; both is an error,
    since a batch is either pairs for a preference objective or examples for supervised tuning."""
    pairs = sorted(name for name, fmt in formats.items() if fmt == "preference")
    if pairs and len(pairs) < len(formats):
        others = sorted(f"{name} ({fmt})" for name, fmt in formats.items() if fmt != "preference")
        raise user_error(f"the {split} data mixes preference pairs ({', '.join(pairs)}) with other rows "
                         f"({', '.join(others)})", f"data.{split}_file",
                         "train on preference pairs and on demonstrations in separate runs (a preference run can "
                         "start from the supervised one), or set the format of each source")
    return "preference" if pairs else "sft"


def check_kinds(train_kind: str, eval_kind: str, train_formats: dict, eval_formats: dict) -> None:
    """Eval data must be of the kind training uses: its loss is the same objective's."""
    if train_kind != eval_kind:
        raise user_error(f"the train data is {train_kind} ({', '.join(train_formats)}) but the eval data is "
                         f"{eval_kind} ({', '.join(eval_formats)})", "data.eval_file",
                         "give eval data of the same kind: preference pairs for a preference run, demonstrations "
                         "for supervised tuning")


def resolve_sources(specs: list[DatasetSpec], key: str) -> list[Resolved]:
    return [resolve_source(spec.path, spec.split, key) for spec in specs]


def read_conversations(specs: list[DatasetSpec], resolved: list[Resolved], data_cfg: DataConfig, seed: int
                       ) -> tuple[list[Conversation], BadRowReport, dict[str, str], dict[str, int]]:
    """Valid conversations of all sources (weights applied), the bad-row report, the format per source,
    and the number of valid rows per format."""
    records, bad = [], []
    for index, (spec, source) in enumerate(zip(specs, resolved)):
        got, wrong = read_resolved(source, index)
        records += apply_weight(got, spec.weight, seed + index)
        bad += wrong
    formats = [spec.format or data_cfg.format for spec in specs]
    columns = [spec.columns if spec.columns is not None else data_cfg.columns for spec in specs]
    conversations, wrong, chosen, per_format = convert_records(records, formats, columns)
    report = BadRowReport(len(records) + len(bad), bad + wrong)
    if not records and not bad:
        raise UserError(f"no rows in {', '.join(s.path for s in specs)}. Fix: point the data at files with rows.")
    return conversations, report, {specs[i].path: fmt for i, fmt in sorted(chosen.items())}, dict(per_format)


def split_off(conversations: list[Conversation] | list[PairConversation], val_size: float, seed: int
              ) -> tuple[list, list]:
    """A seeded held-out split: a fraction < 1, or a row count >= 1. Pairs are split by prompt (all pairs of a
    prompt on one side), so a held-out prompt is never trained on."""
    n_eval = int(round(len(conversations) * val_size)) if val_size < 1 else int(val_size)
    if not 1 <= n_eval < len(conversations):
        raise UserError(f"data.val_size={val_size} leaves {n_eval} of {len(conversations)} rows for eval. "
                        "Fix: choose a size that keeps at least one row on each side.")
    if isinstance(conversations[0], PairConversation):
        return split_pairs(conversations, n_eval, seed)
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return ([c for i, c in enumerate(conversations) if i not in held], [conversations[i] for i in sorted(held)])


def to_examples(conversations: list[Conversation], tokenizer: PreTrainedTokenizerBase, template: Template,
                data_cfg: DataConfig) -> tuple[list[Example], list[BadRow], dict]:
    """Tokenize with masks and apply the over-length policy; over-length rows are bad rows under `error`."""
    eot_id = tokenizer.convert_tokens_to_ids(template.eot_token)
    pairs = tokenize_conversations(conversations, tokenizer, template, data_cfg.train_on_inputs,
                                   data_cfg.train_on_turns, data_cfg.num_proc)
    examples, bad, dropped, truncated = [], [], [], 0
    for conv, (ids, labels) in zip(conversations, pairs):
        if len(ids) > data_cfg.max_length and data_cfg.overlength == "error":
            bad.append(BadRow(conv.where, "over max_length", f"{len(ids)} tokens, over data.max_length="
                              f"{data_cfg.max_length} (raise it, or set data.overlength to drop or truncate)"))
            continue
        fitted = fit_length(ids, labels, data_cfg.max_length, data_cfg.overlength, eot_id)
        if fitted is None:
            dropped.append(conv.where)
            continue
        truncated += len(ids) > data_cfg.max_length
        examples.append(Example(fitted[0], fitted[1], conv.where))
    return examples, bad, {"rows": len(conversations), "kept": len(examples), "dropped": len(dropped),
                           "truncated": truncated, "dropped_examples": dropped[:5]}


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([tokenizer.special_tokens_map, tokenizer.chat_template], sort_keys=True, default=str)
    return hashlib.sha256((body + extra).encode()).hexdigest()


def cache_key(resolved: list[Resolved], tokenizer: PreTrainedTokenizerBase, template: Template, data_cfg: DataConfig,
              seed: int) -> str:
    settings = data_cfg.model_dump(mode="json", exclude={"num_proc", "cache", "packing"})
    parts = [CACHE_FORMAT, [r.fingerprint for r in resolved], tokenizer_fingerprint(tokenizer),
             template.source, template.eot_token, settings, seed]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _save_examples(path: Path, examples: list[Example]) -> None:  # path has no suffix: one is added
    import torch
    from safetensors.torch import save_file

    lengths = torch.tensor([len(e.input_ids) for e in examples], dtype=torch.int64)
    save_file({"input_ids": torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.int64),
               "labels": torch.tensor([t for e in examples for t in e.labels], dtype=torch.int64),
               "lengths": lengths}, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(json.dumps([e.where for e in examples]))


def _load_examples(path: Path) -> list[Example]:
    from safetensors.torch import load_file

    tensors = load_file(str(path.with_suffix(".safetensors")))
    where = json.loads(path.with_suffix(".json").read_text())
    ids, labels = tensors["input_ids"].tolist(), tensors["labels"].tolist()
    out, start = [], 0
    for n, w in zip(tensors["lengths"].tolist(), where):
        out.append(Example(ids[start:start + n], labels[start:start + n], w))
        start += n
    return out


def _save_split(directory: Path, name: str, examples: list, kind: str) -> None:
    """Examples as NAME.*; pairs as NAME-chosen.* and NAME-rejected.*, row i of each being pair i."""
    if kind != "preference":
        _save_examples(directory / name, examples)
        return
    _save_examples(directory / f"{name}-chosen", [p.chosen for p in examples])
    _save_examples(directory / f"{name}-rejected", [p.rejected for p in examples])


def _load_split(directory: Path, name: str, kind: str) -> list:
    if kind != "preference":
        return _load_examples(directory / name)
    chosen, rejected = _load_examples(directory / f"{name}-chosen"), _load_examples(directory / f"{name}-rejected")
    return [PairExample(c, r, c.where) for c, r in zip(chosen, rejected)]


def save_cache(directory: Path, data: Datasets) -> None:
    """Written beside, then renamed: a reader never sees a half-written cache entry."""
    with atomic_path(directory, keep_existing=True) as tmp:  # another process may have written it first
        tmp.mkdir(parents=True)
        for name, examples in (("train", data.train), ("eval", data.eval)):
            _save_split(tmp, name, examples, data.stats["kind"])
        (tmp / "stats.json").write_text(json.dumps(data.stats))


def load_cache(directory: Path, template: Template) -> Datasets | None:
    if not (directory / "stats.json").is_file():
        return None
    stats = json.loads((directory / "stats.json").read_text())
    train, evals = (_load_split(directory, name, stats["kind"]) for name in ("train", "eval"))
    return Datasets(train, evals, template, {**stats, "cache": "hit"})


def build_datasets(data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> Datasets:
    """The tokenized train and eval sets, the template that rendered them, and what happened to each row."""
    train_specs, eval_specs = data_cfg.train_specs, data_cfg.eval_specs
    train_src = resolve_sources(train_specs, "data.train_file")
    eval_src = resolve_sources(eval_specs, "data.eval_file")
    template = resolve_template(data_cfg.template, tokenizer)
    cache_dir = instructkit_home() / "data-cache" / cache_key(train_src + eval_src, tokenizer, template, data_cfg, seed)
    if not data_cfg.cache:
        return _build(data_cfg, seed, train_specs, eval_specs, train_src, eval_src, tokenizer, template)
    # Processes of one launch (and concurrent runs) take turns: the first tokenizes and fills the cache,
    # the others wait on the lock file (no collective, so no timeout) and read what it wrote.
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir) + ".lock"):
        if (cached := load_cache(cache_dir, template)) is not None:
            return cached
        data = _build(data_cfg, seed, train_specs, eval_specs, train_src, eval_src, tokenizer, template)
        save_cache(cache_dir, data)
    return data


def _build(data_cfg: DataConfig, seed: int, train_specs, eval_specs, train_src, eval_src, tokenizer,
           template: Template) -> Datasets:
    train_conv, train_report, formats, format_counts = read_conversations(train_specs, train_src, data_cfg, seed)
    enforce(train_report, data_cfg.on_bad_row, data_cfg.max_bad_fraction, "train")
    kind = data_kind(formats, "train")
    eval_conv, eval_report = [], BadRowReport()
    if eval_specs:
        eval_conv, eval_report, eval_formats, _ = read_conversations(eval_specs, eval_src, data_cfg, seed)
        check_kinds(kind, data_kind(eval_formats, "eval"), formats, eval_formats)
        formats.update(eval_formats)
        enforce(eval_report, data_cfg.on_bad_row, data_cfg.max_bad_fraction, "eval")
    val = auto_val_size(data_cfg.val_size, len(train_conv), bool(eval_specs))
    if not eval_specs and val.value > 0:
        train_conv, eval_conv = split_off(train_conv, val.value, seed)

    tokenize = to_pair_examples if kind == "preference" else to_examples
    train, bad, train_stats = tokenize(train_conv, tokenizer, template, data_cfg)
    train_report.bad += bad
    enforce(train_report, data_cfg.on_bad_row, data_cfg.max_bad_fraction, "train")
    evals, bad, eval_stats = tokenize(eval_conv, tokenizer, template, data_cfg) if eval_conv else ([], [], {})
    eval_report.bad += bad
    enforce(eval_report, data_cfg.on_bad_row, data_cfg.max_bad_fraction, "eval")
    if not train:
        raise UserError(f"no training examples are left: {train_stats['rows']} valid rows, "
                        f"{train_stats['dropped']} dropped as longer than data.max_length={data_cfg.max_length} "
                        f"tokens, {len(train_report.bad)} bad. Fix: raise data.max_length or check the data.")
    hashes = {k: v for r in train_src + eval_src for k, v in r.file_hashes.items()}
    stats = {"kind": kind, "formats": formats, "format_counts": format_counts, "template": template.name,
             "data_files": hashes, "train": train_stats, "eval": eval_stats,
             "bad_rows": {"train": train_report.to_json(), "eval": eval_report.to_json()},
             "cache": "miss" if data_cfg.cache else "off", "val_size": {"value": val.value, "why": val.why}}
    return Datasets(train, evals, template, stats)


def check_objective(objective: str, kind: str) -> None:
    """Preference objectives train on pairs and sft on demonstrations: a mismatch is refused before any
    model is loaded."""
    if objective == "sft" and kind == "preference":
        raise user_error("the data holds preference pairs (chosen/rejected) but objective is sft", "objective",
                         "set objective: dpo, orpo or simpo, or train sft on demonstration rows")
    if objective != "sft" and kind != "preference":
        raise user_error(f"objective: {objective} needs preference pairs {{prompt, chosen, rejected}}, and "
                         "the data holds demonstrations", "data.train_file",
                         "point data.train_file at preference data, or set objective: sft")


def check_rows(data_cfg: DataConfig, seed: int, objective: str | None = None) -> str:
    """Read and check every row without a tokenizer (for `validate`); a one-line summary, or UserError. With
    `objective`, the data's kind must suit it."""
    parts, kinds = [], {}
    for split, specs, key in (("train", data_cfg.train_specs, "data.train_file"),
                              ("eval", data_cfg.eval_specs, "data.eval_file")):
        if not specs:
            continue
        conversations, report, formats, _ = read_conversations(specs, resolve_sources(specs, key), data_cfg, seed)
        kinds[split] = (data_kind(formats, split), formats)
        enforce(report, data_cfg.on_bad_row, data_cfg.max_bad_fraction, split)
        skipped = f", {len(report.bad)} bad rows to skip" if report.bad else ""
        rows = "pairs" if kinds[split][0] == "preference" else "rows"
        chosen = ", ".join(f"{k}: {v}" for k, v in formats.items())
        parts.append(f"{len(conversations)} {split} {rows}{skipped} ({chosen})")
    if "eval" in kinds:
        check_kinds(kinds["train"][0], kinds["eval"][0], kinds["train"][1], kinds["eval"][1])
    if objective is not None:
        check_objective(objective, kinds["train"][0])
    return "; ".join(parts)


def describe_data(data: Datasets, max_length: int) -> str:
    """One paragraph: formats chosen, template, rows kept, dropped, truncated and skipped as bad."""
    st = data.stats
    formats = ", ".join(f"{name}: {fmt}" for name, fmt in st["formats"].items())
    bad = st["bad_rows"]["train"]["bad"]
    return (f"data: format {formats}; template {st['template']}; {st['train']['rows']} train rows, "
            f"{len(data.train)} kept, {st['train']['dropped']} dropped and {st['train']['truncated']} truncated "
            f"over max_length={max_length}" + (f", {bad} bad rows skipped (see data_report.json)" if bad else "")
            + f"; {len(data.eval)} eval {'pairs' if st.get('kind') == 'preference' else 'examples'}; "
            f"tokenized data cache: {st['cache']}")
