"""The fast data path gives exactly what the plain one gives: builtin templates filled from per-shape
skeletons render as Jinja renders them, and threads, processes and a single thread tokenize alike."""

from __future__ import annotations

import os
import random

import pytest

from instructkit.config import DataConfig
from instructkit.data.formats import Message
from instructkit.data.pipeline import build_datasets
from instructkit.data.stream import serial_tokenizer, tokenizing_plan
from instructkit.data.templates import BUILTINS, Template, _rendered_segments, render_segments, resolve_template
from tests.unit.test_data_scale import CASES, digest

# Texts that stress the skeleton: empty, surrounding whitespace, special-token strings (escaped to
# placeholders), the placeholder and stand-in characters themselves, Jinja syntax, blank lines.
TEXTS = ["", "a", " x ", "</s>", "<s>", "\ue000", "\ue0021\ue003", "line\n\nbreak", "{{ x }}", "{% if %}", "\n"]


def _conversation(rng: random.Random) -> tuple[Message, ...]:
    first = [rng.choice(["system", "user"])] if rng.random() < 0.3 else []
    roles = first + [("user", "assistant")[i % 2] for i in range(rng.randint(1, 5))]
    return tuple(Message(role, rng.choice(TEXTS) + rng.choice(TEXTS),
                         rng.choice([None, "", rng.choice(TEXTS)]) if role == "user" else None) for role in roles)


def _outcome(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - the same error either way is part of "the same result"
        return type(exc).__name__, str(exc)


@pytest.mark.parametrize("name", [n for n in BUILTINS if n != "llama3"])  # the byte tokenizer lacks <|eot_id|>
@pytest.mark.parametrize("bos", [False, True])
def test_builtin_skeletons_render_exactly_as_jinja(name, bos, byte_tokenizer):
    template = resolve_template(name, byte_tokenizer)
    if bos:  # the source a tokenizer that starts its encodings with BOS gets
        template = Template(name, "{{- bos_token -}}" + template.source, template.eot_token, template.renders_input)
    rng = random.Random(name)
    for _ in range(250):
        messages = _conversation(rng)
        for options in [(False, "all", 0), (True, "last", 0), (False, "last", 1), (True, "all", 2)]:
            jinja = _outcome(_rendered_segments, template, byte_tokenizer, messages, *options)
            assert _outcome(render_segments, template, byte_tokenizer, messages, *options) == jinja, messages


def test_tokenizing_plan(byte_tokenizer):
    builtin = resolve_template("chatml", byte_tokenizer)
    jinja = Template("inline", "{% for m in messages %}{{ m['content'] }}{% endfor %}", "</s>", False)
    cores = len(os.sched_getaffinity(0))
    assert tokenizing_plan(builtin, "auto") == tokenizing_plan(jinja, "auto") == ("threads", min(cores, 8))
    assert tokenizing_plan(builtin, 3) == ("threads", 3)
    assert tokenizing_plan(jinja, 3) == ("processes", 3)
    assert tokenizing_plan(jinja, 1) == ("threads", 1)


def test_serial_tokenizer_puts_the_setting_back(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    with serial_tokenizer():
        assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    with serial_tokenizer():
        pass
    assert "TOKENIZERS_PARALLELISM" not in os.environ


USER_TEMPLATE = ("{%- for m in messages -%}{%- if m['role'] == 'assistant' -%}{{- m['content'] + eos_token -}}"
                 "{%- else -%}{{- 'Q: ' + m['content'] + '\\nA: ' -}}{%- endif -%}{%- endfor -%}")


@pytest.mark.parametrize("case,template", [("long-truncate", "chatml"), ("mixed-skip", "alpaca"),
                                           ("quickstart", USER_TEMPLATE)])
def test_threads_processes_and_one_thread_tokenize_alike(case, template, tmp_path, byte_tokenizer):
    cfg = DataConfig(**{**CASES[case](tmp_path), "template": template, "cache": False})
    digests = {n: digest(build_datasets(cfg.model_copy(update={"num_proc": n}), byte_tokenizer, 3), tmp_path)
               for n in (1, 2, "auto")}
    assert len(set(digests.values())) == 1, digests


@pytest.mark.parametrize("policy", [{"overlength": "drop"}, {"overlength": "truncate"},
                                    {"overlength": "truncate", "train_on_inputs": True, "template": "chatml"}])
def test_long_rows_tokenized_in_parts_give_the_whole_rows_result(policy, tmp_path, monkeypatch):
    """Rows around max_length (under, just over, far over; long prompts, long answers, no space to cut at)
    built with over-long rows split (data/long_rows.py) and without: the same examples, masks and stats."""
    import json

    from instructkit.data import stream
    from tests.unit.test_encode import _byte_level_bpe

    words = ["ab", "cd.", "e", "fgh,", "ij\n", "k l", "\u00e9t\u00e9", "12"]
    tokenizer = _byte_level_bpe(extra=tuple(" ".join(words[i:] + words[:i]) for i in range(len(words))))
    rng = random.Random(7)
    rows = []
    for i in range(1200):
        size = rng.choice([5, 40, 90, 110, 130, 300, 2000])
        text = " ".join(rng.choice(words) for _ in range(size))
        row = {"instruction": text if i % 3 == 0 else "Say it.", "output": text if i % 3 else "ok"}
        if i % 50 == 0:
            row["output"] = "x" * 3000  # no space to cut at
        rows.append(row)
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(train_file=str(path), max_length=120, val_size=0.05, cache=False, **policy)
    splits = []
    real = stream.split_long
    monkeypatch.setattr(stream, "split_long", lambda *a: splits.append(real(*a)) or splits[-1])
    split = digest(build_datasets(cfg, tokenizer, 3), tmp_path)
    assert sum(rest is not None for _, rest in splits) > 100  # rows were split
    # split far earlier, so most first parts fit and their rests are tokenized and joined
    monkeypatch.setattr(stream.Settings, "long_row_budget", lambda self: 40)
    assert digest(build_datasets(cfg, tokenizer, 3), tmp_path) == split
    monkeypatch.setattr(stream.Settings, "__post_init__", lambda self: setattr(self, "split_long", False))
    assert digest(build_datasets(cfg, tokenizer, 3), tmp_path) == split


def test_a_split_row_whose_first_part_fits_exactly_gets_its_rest():
    from instructkit.data.long_rows import join_rest, split_long

    def encode(texts):  # one token per character
        return [[ord(c) for c in t] for t in texts]

    segments = [("p" * 6, False), ("aaaa bbbb cc", True), ("tail", False)]
    first, rest = split_long(segments, 8)
    assert first == [("p" * 6, False), ("aaaa", True)] and rest == (" bbbb cc", [("tail", False)])
    for max_length, whole in ((10, True), (9, False)):  # the first part holds exactly 10 tokens
        ids, supervised, counts = join_rest(encode([t for t, _ in first]), [False, True], [2], {0: rest}, max_length,
                                            False, encode)
        assert (sum(map(len, ids)) == 22) == whole and counts == ([3] if whole else [2])
        assert supervised == ([False, True, False] if whole else [False, True])
    assert split_long([("x" * 20, True), ("y", False)], 5) == ([("x" * 20, True)], ("", [("y", False)]))
    assert split_long([("x" * 20, True)], 5) == ([("x" * 20, True)], None)
