"""Preference pairs: row forms, detection, bad rows, masks, over-length, cache, split, batches, inspect."""

import importlib.util
import json
from pathlib import Path

import pytest

from instructkit.config import IGNORE, DataConfig
from instructkit.data.collate import pad_pairs
from instructkit.data.formats import Message, RowError, detect_format, prompt_messages
from instructkit.data.pipeline import build_datasets, check_rows
from instructkit.data.preference import PairConversation, PairExample, to_pair
from instructkit.data.templates import render_segments, resolve_template
from instructkit.data.tokenize import Example, tokenize_segments
from instructkit.errors import UserError
from tests.conftest import write_jsonl

U, A, S = "user", "assistant", "system"


def msgs(*turns):
    return [{"role": role, "content": content} for role, content in turns]


def hh(*turns):
    return "".join(f"\n\n{'Human' if role == U else 'Assistant'}: {content}" for role, content in turns)


def build(tok, path, **kw):
    kw.setdefault("max_length", 400)
    kw.setdefault("template", "chatml")
    return build_datasets(DataConfig(train_file=str(path), **kw), tok, 0)


def pairs_file(tmp_path, n=6, name="p.jsonl"):
    return write_jsonl(tmp_path / name, [{"prompt": f"Add one to {i}.", "chosen": str(i + 1), "rejected": str(i + 2)}
                                         for i in range(n)])


# --- row forms -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("row,prompt,chosen,rejected", [
    ({"prompt": "Say yes.", "chosen": "yes", "rejected": "no"},
     (Message(U, "Say yes."),), (Message(A, "yes"),), (Message(A, "no"),)),
    ({"prompt": "Add one.", "input": "2", "chosen": "3", "rejected": "4", "system": "Be exact."},
     (Message(S, "Be exact."), Message(U, "Add one.", "2")), (Message(A, "3"),), (Message(A, "4"),)),
    ({"prompt": msgs((U, "Hi"), (A, "Hello"), (U, "Color?")), "chosen": msgs((A, "red")),
      "rejected": msgs((A, "blue"), (U, "Sure?"), (A, "yes"))},
     (Message(U, "Hi"), Message(A, "Hello"), Message(U, "Color?")), (Message(A, "red"),),
     (Message(A, "blue"), Message(U, "Sure?"), Message(A, "yes"))),
    ({"chosen": msgs((S, "Brief."), (U, "Q"), (A, "A1"), (U, "Q2"), (A, "good")),
      "rejected": msgs((S, "Brief."), (U, "Q"), (A, "A1"), (U, "Q2"), (A, "bad"))},
     (Message(S, "Brief."), Message(U, "Q"), Message(A, "A1"), Message(U, "Q2")), (Message(A, "good"),),
     (Message(A, "bad"),)),
    ({"chosen": hh((U, "hi"), (A, "hello"), (U, "bye"), (A, "bye!")),
      "rejected": hh((U, "hi"), (A, "hello"), (U, "bye"), (A, "go away")), "system": "Be kind."},
     (Message(S, "Be kind."), Message(U, "hi"), Message(A, "hello"), Message(U, "bye")), (Message(A, "bye!"),),
     (Message(A, "go away"),)),
    # HH without the leading blank line
    ({"chosen": "Human: Q\n\nAssistant: A", "rejected": "Human: Q\n\nAssistant: B"},
     (Message(U, "Q"),), (Message(A, "A"),), (Message(A, "B"),)),
])
def test_row_forms(row, prompt, chosen, rejected):
    assert to_pair(row, "f:1") == PairConversation(prompt, chosen, rejected, "f:1")


@pytest.mark.parametrize("row,reason,detail", [
    ({"prompt": "p", "chosen": "a"}, "missing field", "missing field 'rejected'"),
    ({"prompt": "p", "rejected": "a"}, "missing field", "missing field 'chosen'"),
    ({"prompt": "p", "chosen": 3, "rejected": "a"}, "wrong type", "field 'chosen' is a int"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "wrong type", "field 'prompt' is a int"),
    ({"chosen": "a", "rejected": ["b"]}, "wrong type", "'chosen' is a str and 'rejected' a list"),
    ({"prompt": "p", "chosen": ["a"], "rejected": "b"}, "wrong type", "chosen[0] is a str, expected an object"),
    ({"prompt": "p", "chosen": " ", "rejected": "b"}, "empty answer", "field 'chosen' is empty"),
    ({"prompt": "p", "chosen": "a", "rejected": msgs((A, ""))}, "empty answer", "rejected[0].content is empty"),
    ({"chosen": msgs((U, "q"), (A, "a")), "rejected": msgs((U, "q"))}, "empty answer",
     "'rejected' has no turn after the 1 it shares"),
    ({"chosen": hh((U, "q"), (A, "a")), "rejected": hh((U, "q"), (A, ""))}, "empty answer",
     "rejected[1].content is empty"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "empty field", "field 'prompt' is empty"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical answers", "the same answer"),
    ({"chosen": msgs((U, "q"), (A, "a")), "rejected": msgs((U, "q"), (A, "a"))}, "identical answers",
     "the same conversation"),
    ({"chosen": msgs((U, "q"), (A, "a"), (U, "more"), (A, "x")),
      "rejected": msgs((U, "q"), (A, "a"), (U, "less"), (A, "x"))},
     "mismatched prompts", "first differ at turn 3 (user / user)"),
    ({"chosen": hh((U, "q1"), (A, "a")), "rejected": hh((U, "q2"), (A, "b"))}, "mismatched prompts",
     "first differ at turn 1"),
    ({"chosen": "a good answer", "rejected": "a bad answer"}, "no prompt", "add a 'prompt' field"),
    ({"prompt": msgs((U, "q"), (A, "a")), "chosen": "x", "rejected": "y"}, "roles out of order",
     "the prompt ends with a 'assistant' turn"),
    ({"prompt": "q", "chosen": msgs((U, "x")), "rejected": "y"}, "roles out of order", "chosen[0] is a 'user' turn"),
    ({"prompt": "q", "chosen": msgs((A, "x"), (A, "y")), "rejected": "y"}, "roles out of order",
     "prompt + chosen: turn 3 is 'assistant' where 'user' was expected"),
    ({"prompt": "q", "chosen": msgs((A, "x"), (U, "y")), "rejected": "y"}, "roles out of order",
     "prompt + chosen: the conversation does not end with an assistant turn"),
    ({"prompt": "q", "chosen": msgs(("bot", "x")), "rejected": "y"}, "unknown role", "chosen[0].role is 'bot'"),
    ({"prompt": msgs((S, "s"), (U, "q")), "system": "t", "chosen": "x", "rejected": "y"}, "conflicting fields",
     "both a 'system' field and a system turn"),
])
def test_bad_rows(row, reason, detail):
    with pytest.raises(RowError) as err:
        to_pair(row)
    assert err.value.reason == reason and detail in err.value.detail, err.value.detail


def test_bad_rows_are_reported_with_file_and_line(tmp_path, byte_tokenizer):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "a"},
            {"prompt": "p", "chosen": "", "rejected": "b"}, {"prompt": "p", "chosen": "a"},
            {"chosen": msgs((U, "q"), (A, "a")), "rejected": msgs((U, "r"), (A, "b"))},
            {"chosen": "good", "rejected": "bad"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UserError) as err:
        build(byte_tokenizer, path)
    text = str(err.value)
    assert "5 of 6 train rows are bad" in text
    for line, reason in [(2, "identical answers"), (3, "empty answer"), (4, "missing field"), (5, "mismatched prompts"),
                         (6, "no prompt")]:
        assert f"  {reason}: 1 row\n    {path}:{line}: " in text, reason
    with pytest.raises(UserError, match=r"identical answers: 1 row\n    .*bad\.jsonl:2"):
        check_rows(DataConfig(train_file=str(path)), 0)


def test_bad_rows_exit_2_from_the_cli_before_a_model_loads(tiny_config, tmp_path, capsys):
    from instructkit.cli import main

    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                                {"prompt": "p", "chosen": "a", "rejected": "a"}])
    assert main(["validate", str(tiny_config(data={"train_file": str(path)}))]) == 2
    err = capsys.readouterr().err
    assert f"identical answers: 1 row\n    {path}:2: 'chosen' and 'rejected' are the same answer" in err


# --- detection -------------------------------------------------------------------------------------------------


def test_detection_prefers_preference_and_refuses_ambiguous_rows(tmp_path, byte_tokenizer):
    assert detect_format({"prompt": "p", "chosen": "a", "rejected": "b"}, "f:1") == "preference"
    assert detect_format({"chosen": [], "rejected": [], "system": "s"}, "f:1") == "preference"
    assert detect_format({"prompt": "p", "completion": "c"}, "f:1") == "prompt_completion"
    with pytest.raises(UserError, match=r"f:7: the row has the preference keys chosen/rejected and the keys of the "
                       r"messages format.*set data\.format"):
        detect_format({"messages": [], "chosen": "a", "rejected": "b"}, "f:7")
    path = write_jsonl(tmp_path / "amb.jsonl", [{"prompt": "p", "completion": "c", "chosen": "a", "rejected": "b"}])
    with pytest.raises(UserError, match=r"amb\.jsonl:1: .*prompt_completion format"):
        build(byte_tokenizer, path)
    assert build(byte_tokenizer, path, format="preference").stats["kind"] == "preference"


def test_generation_prompt_of_a_preference_row():
    row = {"prompt": "Add one.", "input": "2", "chosen": "3", "rejected": "4", "system": "s"}
    assert prompt_messages(row) == (Message(S, "s"), Message(U, "Add one.", "2"))


# --- masks -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["alpaca", "chatml", "plain"])
def test_prompt_tokens_are_shared_and_equal_the_generation_prompt(tmp_path, byte_tokenizer, template):
    rows = [{"prompt": msgs((S, "Be brief."), (U, "Hi"), (A, "Hello"), (U, "Color?")),
             "chosen": msgs((A, "red"), (U, "Sure?"), (A, "yes")), "rejected": "blue"},
            {"prompt": "Add one.", "input": "2", "chosen": "3", "rejected": "four"}]
    data = build(byte_tokenizer, write_jsonl(tmp_path / "p.jsonl", rows), template=template)
    tmpl = resolve_template(template, byte_tokenizer)
    for row, pair in zip(rows, data.train):
        prompt = prompt_messages(row)
        gen_ids, _ = tokenize_segments(render_segments(tmpl, byte_tokenizer, prompt, add_generation_prompt=True),
                                       byte_tokenizer)
        for side in (pair.chosen, pair.rejected):
            assert side.input_ids[:len(gen_ids)] == gen_ids
            assert set(side.labels[:len(gen_ids)]) == {IGNORE}  # the prompt, its assistant turn included
            assert side.labels[len(gen_ids)] != IGNORE  # the answer starts right after it
    dec = byte_tokenizer.decode
    first = data.train[0]
    supervised = [dec([t for t, lab in zip(s.input_ids, s.labels) if lab != IGNORE])
                  for s in (first.chosen, first.rejected)]
    eot = tmpl.eot_token
    assert supervised == [f"red{eot}yes{eot}", f"blue{eot}"]
    assert "Hello" not in supervised[0]


def test_train_on_inputs_and_turns_do_not_apply_to_pairs(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": msgs((U, "q"), (A, "a"), (U, "q2")),
                                               "chosen": msgs((A, "x"), (U, "y"), (A, "z")), "rejected": "w"}])
    plain = build(byte_tokenizer, path).train
    assert build(byte_tokenizer, path, train_on_inputs=True, train_on_turns="last").train == plain


def test_pair_example_properties():
    pair = PairExample(Example([1, 2, 3], [IGNORE, 2, 3]), Example([1, 2, 3, 4, 5], [IGNORE, IGNORE, IGNORE, 4, 5]))
    assert (pair.n_supervised, pair.length, pair.ref) == (2, 5, None)


# --- over-length -----------------------------------------------------------------------------------------------


def overlong_rows():
    # chatml around a one-byte prompt and an answer is 22 tokens: the long rejected side is 122
    return [{"prompt": "p", "chosen": "short", "rejected": "long " * 20},
            {"prompt": "q", "chosen": "a", "rejected": "b"}]


def test_overlength_policies_apply_to_each_side(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "o.jsonl", overlong_rows())
    dropped = build(byte_tokenizer, path, max_length=60)
    assert len(dropped.train) == 1 and dropped.train[0].where.endswith("o.jsonl:2")
    assert dropped.stats["train"]["dropped"] == 1 and dropped.stats["train"]["dropped_examples"][0].endswith(":1")
    cut = build(byte_tokenizer, path, max_length=60, overlength="truncate")
    assert len(cut.train) == 2 and cut.stats["train"]["truncated"] == 1
    long_side = cut.train[0].rejected
    eot = byte_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert len(long_side.input_ids) == 60 and long_side.input_ids[-1] == eot and long_side.labels[-1] == eot
    assert len(cut.train[0].chosen.input_ids) < 60  # the side that fits is kept whole
    with pytest.raises(UserError, match=r"over max_length: 1 row\n    .*o\.jsonl:1: \d+ tokens \(rejected\), over "
                       r"data\.max_length=60"):
        build(byte_tokenizer, path, max_length=60, overlength="error")


# --- pipeline: kinds, cache, split -----------------------------------------------------------------------------


def test_build_returns_pairs_and_sets_the_kind(tmp_path, byte_tokenizer):
    data = build(byte_tokenizer, pairs_file(tmp_path))
    assert data.stats["kind"] == "preference" and data.stats["formats"] == {str(tmp_path / "p.jsonl"): "preference"}
    assert all(isinstance(p, PairExample) for p in data.train) and len(data.train) == 6
    sft = build(byte_tokenizer, write_jsonl(tmp_path / "s.jsonl", [{"instruction": "a", "output": "b"}]))
    assert sft.stats["kind"] == "sft" and isinstance(sft.train[0], Example)


def test_mixing_pairs_with_other_rows_is_refused(tmp_path, byte_tokenizer):
    pairs, sft = pairs_file(tmp_path), write_jsonl(tmp_path / "s.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(UserError, match=r"data\.train_file: the train data mixes preference pairs \(.*p\.jsonl\) "
                       r"with other rows \(.*s\.jsonl \(alpaca\)\)"):
        build_datasets(DataConfig(train_file=[str(pairs), str(sft)], template="chatml"), byte_tokenizer, 0)
    for train, evals in ((pairs, sft), (sft, pairs)):
        cfg = DataConfig(train_file=str(train), eval_file=str(evals), template="chatml")
        with pytest.raises(UserError, match=r"data\.eval_file: the train data is \w+ \(.*\) but the eval data is"):
            build_datasets(cfg, byte_tokenizer, 0)
        with pytest.raises(UserError, match="but the eval data is"):
            check_rows(cfg, 0)


def test_cache_round_trip_restores_pairs_exactly(tmp_path, byte_tokenizer):
    rows = [{"prompt": f"Add one to {i}.", "chosen": str(i + 1), "rejected": msgs((A, str(i + 2)), (U, "?"), (A, "!"))}
            for i in range(30)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    first, second = build(byte_tokenizer, path, val_size=5), build(byte_tokenizer, path, val_size=5)
    assert (first.stats["cache"], second.stats["cache"]) == ("miss", "hit")
    assert second.stats["kind"] == "preference"
    assert first.train == second.train and first.eval == second.eval and len(second.eval) == 5
    assert build(byte_tokenizer, path, val_size=5, template="alpaca").stats["cache"] == "miss"


def test_val_split_keeps_the_prompts_of_held_out_pairs_apart(tmp_path, byte_tokenizer):
    rows = [{"prompt": f"Add one to {i}.", "chosen": str(i + 1), "rejected": str(i + k)}
            for i in range(20) for k in (2, 3, 5)]  # three pairs per prompt
    data = build(byte_tokenizer, write_jsonl(tmp_path / "p.jsonl", rows), val_size=0.2)
    dec = byte_tokenizer.decode

    def prompt_of(pair):
        n = next(i for i, lab in enumerate(pair.chosen.labels) if lab != IGNORE)
        return dec(pair.chosen.input_ids[:n])

    train, held = {prompt_of(p) for p in data.train}, {prompt_of(p) for p in data.eval}
    assert len(data.eval) == 12 and len(held) == 4 and not train & held
    assert len(data.train) + len(data.eval) == 60
    again = build(byte_tokenizer, write_jsonl(tmp_path / "p.jsonl", rows), val_size=0.2, cache=False)
    assert again.eval == data.eval  # seeded


def test_val_split_that_would_leave_no_training_pairs(tmp_path, byte_tokenizer):
    rows = [{"prompt": "same", "chosen": "a", "rejected": str(i)} for i in range(5)]
    with pytest.raises(UserError, match="share only 1 prompts"):
        build(byte_tokenizer, write_jsonl(tmp_path / "p.jsonl", rows), val_size=1)


# --- batches ---------------------------------------------------------------------------------------------------


def test_pad_pairs_puts_chosen_rows_first_then_rejected():
    pairs = [PairExample(Example([1, 2], [IGNORE, 2]), Example([1, 3, 4], [IGNORE, 3, 4]), ref=(-1.0, -2.0)),
             PairExample(Example([5], [5]), Example([6, 7], [IGNORE, 7]), ref=(-3.0, -4.0))]
    batch = pad_pairs(pairs, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 0], [5, 0, 0], [1, 3, 4], [6, 7, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, IGNORE], [5, IGNORE, IGNORE], [IGNORE, 3, 4], [IGNORE, 7, IGNORE]]
    assert batch["ref_logps"].tolist() == [-1.0, -3.0, -2.0, -4.0] and str(batch["ref_logps"].dtype) == "torch.float32"
    without = pad_pairs([pairs[0], PairExample(pairs[1].chosen, pairs[1].rejected)], pad_id=0)
    assert "ref_logps" not in without and without["input_ids"].shape == (4, 3)


# --- inspect ---------------------------------------------------------------------------------------------------


def test_data_inspect_shows_the_prompt_once_and_both_answers_marked(tiny_config, tmp_path, capsys):
    from instructkit.cli import main

    rows = [{"prompt": "Say yes.", "chosen": "yes", "rejected": "no"},
            {"prompt": "Add one.", "input": "2", "chosen": "3", "rejected": "four"},
            {"prompt": "x", "chosen": "a", "rejected": "a"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = tiny_config(data={"train_file": str(path), "on_bad_row": "skip", "max_bad_fraction": 0.5})
    assert main(["data", "inspect", str(cfg), "--n", "2"]) == 0
    out = capsys.readouterr().out
    head = "Below is an instruction that describes a task. Write a response"
    assert out.count(head) == 1  # the first pair's prompt, once
    assert "### Response:\n\n--- chosen answer (" in out and "--- chosen answer (" in out
    assert "2 supervised, shown [[like this]])\n[[3</s>]]" in out
    assert "--- rejected answer (" in out and "[[four</s>]]" in out and "[[no</s>]]" in out
    assert "pairs kept: 2" in out and "bad rows: identical answers: 1" in out
    assert f"  {path}:3: identical answers: 'chosen' and 'rejected' are the same answer" in out
    assert "rejected answer tokens: p50 4, max 5, mean 4.0" in out and "packing efficiency" not in out
    assert main(["data", "inspect", str(cfg), "--n", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "preference" and report["examples_kept"] == 2 and report["packing_efficiency"] is None
    example = report["examples"][0]
    assert example["prompt"]["text"].startswith(head) and example["prompt"]["text"].endswith("### Response:\n")
    for name, answer in (("chosen", "yes</s>"), ("rejected", "no</s>")):
        side = example[name]
        assert len(side["input_ids"]) == len(side["labels"]) == example["prompt"]["tokens"] + len(answer) - 3
        assert [s["text"] for s in side["spans"] if s["supervised"]] == [answer]


# --- the demo set ----------------------------------------------------------------------------------------------

EXAMPLES = Path(__file__).parents[2] / "examples"


def _read(name):
    return [json.loads(line) for line in (EXAMPLES / "data" / name).read_text().splitlines()]


def _smollm2_tokenizer():
    from transformers import AutoTokenizer

    from instructkit.config import instructkit_home

    path = instructkit_home() / "models" / "smollm2-135m-instruct"
    if not (path / "tokenizer.json").is_file():
        pytest.skip("SmolLM2 is not converted yet (any run on smollm2-135m-instruct does it)")
    return AutoTokenizer.from_pretrained(path)


def test_demo_set_is_what_the_generator_writes_and_keeps_held_out_prompts_apart():
    spec = importlib.util.spec_from_file_location("make_preference_data", EXAMPLES / "make_preference_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built = module.build()
    assert {split: len(rows) for split, rows in built.items()} == {"train": 400, "eval": 60, "test": 200}
    for split, rows in built.items():
        assert _read(f"pref_{split}.jsonl") == rows, f"pref_{split}.jsonl is stale: run {module.__file__}"
        assert all(to_pair(row).chosen != to_pair(row).rejected for row in rows)

    def prompts(rows, key="prompt"):
        return {(r[key], r["input"]) for r in rows}

    trained = prompts(built["train"]) | prompts(_read("train.jsonl"), "instruction")
    for split in ("eval", "test"):
        assert prompts(built[split]) <= prompts(_read(f"{split}.jsonl"), "instruction")
        assert not prompts(built[split]) & trained


@pytest.mark.parametrize("which", ["byte", "smollm2"])
def test_demo_pairs_render_their_prompt_exactly_like_the_sft_rows(tmp_path, byte_tokenizer, which):
    tok = byte_tokenizer if which == "byte" else _smollm2_tokenizer()
    template = "alpaca" if which == "byte" else "auto"  # SmolLM2: its own chat template, as the quickstart
    pair_rows, sft_rows = _read("pref_eval.jsonl"), _read("eval.jsonl")
    pairs = build(tok, EXAMPLES / "data/pref_eval.jsonl", template=template, val_size=0, cache=False).train
    sft = build(tok, EXAMPLES / "data/eval.jsonl", template=template, val_size=0, cache=False).train
    sft_by_prompt = {(r["instruction"], r["input"]): e for r, e in zip(sft_rows, sft)}
    tmpl = resolve_template(template, tok)
    assert len(pairs) == len(pair_rows) == 60
    for row, pair in zip(pair_rows, pairs):
        gen, _ = tokenize_segments(render_segments(tmpl, tok, prompt_messages(row), add_generation_prompt=True), tok)
        example = sft_by_prompt[(row["prompt"], row["input"])]
        for ids, labels in ((example.input_ids, example.labels), (pair.chosen.input_ids, pair.chosen.labels),
                            (pair.rejected.input_ids, pair.rejected.labels)):
            assert ids[:len(gen)] == gen and set(labels[:len(gen)]) == {IGNORE} and labels[len(gen)] != IGNORE
        assert (pair.chosen.input_ids, pair.chosen.labels) == (example.input_ids, example.labels)  # the SFT example


def test_parallel_tokenization_of_pairs_equals_serial(tmp_path, byte_tokenizer):
    path = pairs_file(tmp_path, n=600)  # more than one chunk
    serial = build(byte_tokenizer, path, cache=False, val_size=0)
    assert build(byte_tokenizer, path, cache=False, val_size=0, num_proc=2).train == serial.train
