"""build_datasets: sources -> records -> conversations -> segments -> examples, checked and cached.

The cache key covers the data files' contents, the tokenizer, the template and every data setting
that changes the result, so a second run starts at once and a changed file is never served stale.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import json
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from filelock import FileLock

from instructkit.config import DataConfig, DatasetSpec, instructkit_home
from instructkit.data.formats import Conversation
from instructkit.data.preference import PairConversation, PairExample, split_pairs, to_pair_examples
from instructkit.data.progress import RowProgress
from instructkit.data.sources import Resolved, apply_weight, read_resolved, resolve_source
from instructkit.data.store import StoreWriter, ids_dtype, open_splits, read_stats, save_splits, write_index
from instructkit.data.stream import Scan, Settings, max_token_chars, scan_split, split_part
from instructkit.data.templates import Template, resolve_template
from instructkit.data.tokenize import Example
from instructkit.data.validate import BadRowReport, convert_records, enforce
from instructkit.defaults import auto_val_size
from instructkit.errors import UserError, user_error
from instructkit.files import atomic_path, remove

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# 3: user text spelling a special token is tokenized as plain text; 4: stats record val_size; 5: preference pairs
# (train-chosen/train-rejected example sets, stats["kind"]); 6: the memory-mapped store (data/store.py)
CACHE_FORMAT = 6


@dataclass
class Datasets:
    """Tokenized train and eval sets: `Example`s, or `PairExample`s when stats["kind"] is "preference".

    Built or read from the cache they are lazy sequences over the memory-mapped store (`ExampleSequence`,
    `PairSequence`: index, len, iterate, slice to a list; `.lengths` without reading tokens); code that
    changes items (DPO's reference log-probs) puts plain lists of new objects in their place."""

    train: Sequence[Example] | Sequence[PairExample]
    eval: Sequence[Example] | Sequence[PairExample]
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
    if conversations and isinstance(conversations[0], PairConversation):
        return split_pairs(conversations, _n_eval(len(conversations), val_size), seed)
    held = set(held_out(len(conversations), val_size, seed))
    return ([c for i, c in enumerate(conversations) if i not in held], [conversations[i] for i in sorted(held)])


def _n_eval(n: int, val_size: float) -> int:
    n_eval = int(round(n * val_size)) if val_size < 1 else int(val_size)
    if not 1 <= n_eval < n:
        raise UserError(f"data.val_size={val_size} leaves {n_eval} of {n} rows for eval. "
                        "Fix: choose a size that keeps at least one row on each side.")
    return n_eval


def held_out(n: int, val_size: float, seed: int) -> list[int]:
    """The rows (of n, ascending) a seeded split holds out: a fraction < 1, or a row count >= 1."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[:_n_eval(n, val_size)])


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


def _stale(directory: Path) -> None:
    """Remove what an interrupted build of this entry left (its writer was killed); the caller holds the lock,
    so no live build is writing one."""
    for leftover in directory.parent.glob(f".{directory.name}.tmp-*"):
        remove(leftover)


def open_cache(directory: Path, template: Template, cache: str) -> Datasets | None:
    """The store in `directory` mapped as Datasets, or None when no complete one is there."""
    stats = read_stats(directory)
    if stats is None:
        return None
    train, evals = open_splits(directory, stats)
    return Datasets(train, evals, template, {**stats, "cache": cache})


def build_datasets(data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int,
                   progress: bool = False) -> Datasets:
    """The tokenized train and eval sets (mapped from the store), the template that rendered them, and what
    happened to each row. `progress`: show rows/s and the time left while tokenizing."""
    train_specs, eval_specs = data_cfg.train_specs, data_cfg.eval_specs
    train_src = resolve_sources(train_specs, "data.train_file")
    eval_src = resolve_sources(eval_specs, "data.eval_file")
    template = resolve_template(data_cfg.template, tokenizer)
    home = instructkit_home() / "data-cache"
    sources = (train_specs, eval_specs, train_src, eval_src)
    if not data_cfg.cache:
        # Built in a private directory, mapped, and removed when the process ends.
        home.mkdir(parents=True, exist_ok=True)
        directory = Path(tempfile.mkdtemp(prefix=".uncached-", dir=home))
        atexit.register(shutil.rmtree, directory, True)
        try:
            _build(data_cfg, seed, sources, tokenizer, template, directory, progress)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return open_cache(directory, template, "off")  # type: ignore[return-value]
    cache_dir = home / cache_key(train_src + eval_src, tokenizer, template, data_cfg, seed)
    # Processes of one launch (and concurrent runs) take turns: the first tokenizes and fills the cache,
    # the others wait on the lock file (no collective, so no timeout) and map what it wrote.
    home.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir) + ".lock"):
        if (cached := open_cache(cache_dir, template, "hit")) is not None:
            return cached
        _stale(cache_dir)
        try:
            with atomic_path(cache_dir, keep_existing=True) as tmp:  # a reader never sees half a cache
                _build(data_cfg, seed, sources, tokenizer, template, tmp, progress)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise user_error(f"the disk is full: writing the tokenized data cache failed ({exc.strerror}); "
                                 "nothing was kept, and earlier caches are intact", str(home),
                                 "free space there, or set INSTRUCTKIT_HOME to a disk with room") from exc
            raise
    return open_cache(cache_dir, template, "miss")  # type: ignore[return-value]


def _build(data_cfg: DataConfig, seed: int, sources: tuple, tokenizer, template: Template, directory: Path,
           progress: bool) -> None:
    """Read, check, split and tokenize into a new store in `directory`, stats.json last."""
    train_specs, eval_specs, train_src, eval_src = sources
    directory.mkdir(parents=True, exist_ok=True)
    writer = StoreWriter(directory, ids_dtype(len(tokenizer)))
    settings = Settings(tokenizer, template, data_cfg.train_on_inputs, data_cfg.train_on_turns, data_cfg.max_length,
                        data_cfg.overlength, tokenizer.convert_tokens_to_ids(template.eot_token),
                        max_token_chars(tokenizer))
    hints = [r.rows_hint for r in train_src + eval_src]
    with RowProgress(None if None in hints else sum(hints), enabled=progress) as bar:
        train = scan_split(train_specs, train_src, data_cfg, seed, settings, writer, bar.update)
        if not train.rows:
            raise UserError(f"no rows in {', '.join(s.path for s in train_specs)}. "
                            "Fix: point the data at files with rows.")
        train_report = BadRowReport(train.rows, train.bad)
        enforce(train_report, data_cfg.on_bad_row, data_cfg.max_bad_fraction, "train")
        formats = _formats(train_specs, train)
        kind = data_kind(formats, "train")
        evals, eval_report = None, BadRowReport()
        if eval_specs:
            evals = scan_split(eval_specs, eval_src, data_cfg, seed, settings, writer, bar.update)
            if not evals.rows:
                raise UserError(f"no rows in {', '.join(s.path for s in eval_specs)}. "
                                "Fix: point the data at files with rows.")
            eval_report = BadRowReport(evals.rows, evals.bad)
            eval_formats = _formats(eval_specs, evals)
            check_kinds(kind, data_kind(eval_formats, "eval"), formats, eval_formats)
            formats.update(eval_formats)
            enforce(eval_report, data_cfg.on_bad_row, data_cfg.max_bad_fraction, "eval")
    finish = _finish_pairs if kind == "preference" else _finish_examples
    val, train_stats, eval_stats = finish(data_cfg, seed, train, evals, train_report, eval_report, tokenizer,
                                          template, writer, directory)
    hashes = {k: v for r in train_src + eval_src for k, v in r.file_hashes.items()}
    stats = {"kind": kind, "formats": formats, "format_counts": dict(train.converter.per_format),
             "template": template.name, "data_files": hashes, "train": train_stats, "eval": eval_stats,
             "bad_rows": {"train": train_report.to_json(), "eval": eval_report.to_json()},
             "cache": "miss" if data_cfg.cache else "off", "val_size": {"value": val.value, "why": val.why},
             "store": writer.close()}
    (directory / "stats.json").write_text(json.dumps(stats))


def _formats(specs, scan: Scan) -> dict[str, str]:
    return {specs[i].path: fmt for i, fmt in sorted(scan.converter.chosen.items())}


def _no_examples(stats: dict, report: BadRowReport, max_length: int) -> UserError:
    return UserError(f"no training examples are left: {stats['rows']} valid rows, {stats['dropped']} dropped as "
                     f"longer than data.max_length={max_length} tokens, {len(report.bad)} bad. Fix: raise "
                     "data.max_length or check the data.")


def _finish_examples(data_cfg, seed, train: Scan, evals: Scan | None, train_report, eval_report, tokenizer,
                     template, writer: StoreWriter, directory: Path) -> tuple:
    """Split the tokenized rows (the same seeded held-out rows as `split_off`), apply the over-length report,
    and write each split's index."""
    n = len(train.status)
    val = auto_val_size(data_cfg.val_size, n, evals is not None)
    everything = np.arange(n, dtype=np.int64)
    train_part, eval_part = (train, everything), (evals, np.arange(len(evals.status) if evals else 0))
    if evals is None and val.value > 0:
        held = np.array(held_out(n, val.value, seed), dtype=np.int64)
        train_part, eval_part = (train, np.setdiff1d(everything, held)), (train, held)
    train_entries, bad, train_stats = split_part(*train_part, data_cfg.max_length)
    train_report.bad += bad
    enforce(train_report, data_cfg.on_bad_row, data_cfg.max_bad_fraction, "train")
    eval_entries, bad, eval_stats = (split_part(*eval_part, data_cfg.max_length) if eval_part[0] is not None
                                     else (np.zeros(0, np.int64), [], {}))
    eval_report.bad += bad
    enforce(eval_report, data_cfg.on_bad_row, data_cfg.max_bad_fraction, "eval")
    if not len(train_entries):
        raise _no_examples(train_stats, train_report, data_cfg.max_length)
    write_index(directory, "train", train_entries)
    write_index(directory, "eval", eval_entries)
    return val, train_stats, eval_stats


def _finish_pairs(data_cfg, seed, train: Scan, evals: Scan | None, train_report, eval_report, tokenizer, template,
                  writer: StoreWriter, directory: Path) -> tuple:
    """Pairs take the in-memory path (split by prompt, both sides tokenized together), then go to the store."""
    train_conv, eval_conv = train.pairs, evals.pairs if evals else []
    val = auto_val_size(data_cfg.val_size, len(train_conv), evals is not None)
    if evals is None and val.value > 0:
        train_conv, eval_conv = split_off(train_conv, val.value, seed)
    pairs, bad, train_stats = to_pair_examples(train_conv, tokenizer, template, data_cfg)
    train_report.bad += bad
    enforce(train_report, data_cfg.on_bad_row, data_cfg.max_bad_fraction, "train")
    eval_pairs, bad, eval_stats = (to_pair_examples(eval_conv, tokenizer, template, data_cfg) if eval_conv
                                   else ([], [], {}))
    eval_report.bad += bad
    enforce(eval_report, data_cfg.on_bad_row, data_cfg.max_bad_fraction, "eval")
    if not pairs:
        raise _no_examples(train_stats, train_report, data_cfg.max_length)
    save_splits(directory, {"train": pairs, "eval": eval_pairs}, "preference", writer)
    return val, train_stats, eval_stats


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
