import pytest

from instructkit.config import DataConfig
from instructkit.data.collate import pad_batch
from instructkit.data.formats import Message, RowError, detect_format, rename_columns, to_messages
from instructkit.data.pipeline import build_datasets, split_off
from instructkit.data.sources import apply_weight, read_records, Record
from instructkit.data.tokenize import IGNORE, Example, fit_length
from instructkit.errors import UserError
from tests.conftest import ROWS, write_jsonl

U, A, S = "user", "assistant", "system"


@pytest.mark.parametrize("fmt,row,expected", [
    ("alpaca", {"instruction": "Add one.", "input": "2", "output": "3", "system": "Be exact."},
     (Message(S, "Be exact."), Message(U, "Add one.", "2"), Message(A, "3"))),
    ("alpaca", {"instruction": "x", "input": "", "output": "y"}, (Message(U, "x"), Message(A, "y"))),
    ("sharegpt", {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "a"},
                                    {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"},
                                    {"from": "gpt", "value": "d"}]},
     (Message(S, "s"), Message(U, "a"), Message(A, "b"), Message(U, "c"), Message(A, "d"))),
    ("messages", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     (Message(U, "a"), Message(A, "b"))),
    ("prompt_completion", {"prompt": "p", "completion": "c"}, (Message(U, "p"), Message(A, "c"))),
    ("text", {"text": "Once upon a time."}, (Message("text", "Once upon a time."),)),
])
def test_each_format_converts_exactly(fmt, row, expected):
    assert detect_format(row, "f:1") == fmt
    assert to_messages(row, fmt) == expected


@pytest.mark.parametrize("fmt,row,reason,detail", [
    ("alpaca", {"instruction": "x"}, "missing field", "missing field 'output'"),
    ("alpaca", {"instruction": 3, "output": "y"}, "wrong type", "field 'instruction' is a int, expected a string"),
    ("alpaca", {"instruction": "x", "output": "  "}, "empty field", "field 'output' is empty"),
    ("sharegpt", {"conversations": [{"from": "bot", "value": "a"}]}, "unknown role", "conversations[0].from is 'bot'"),
    ("messages", {"messages": [{"role": "assistant", "content": "a"}]}, "roles out of order",
     "turn 1 is 'assistant' where 'user' was expected"),
    ("messages", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "roles out of order", "turn 2 is 'user' where 'assistant' was expected"),
    ("messages", {"messages": [{"role": "user", "content": "a"}]}, "roles out of order", "does not end with an assistant"),
    ("messages", {"messages": "hi"}, "wrong type", "must be a non-empty list"),
])
def test_bad_rows_name_their_reason(fmt, row, reason, detail):
    with pytest.raises(RowError) as err:
        to_messages(row, fmt)
    assert err.value.reason == reason and detail in err.value.detail


def test_columns_mapping_and_detection_error():
    row = rename_columns({"question": "q", "answer": "a"}, {"instruction": "question", "output": "answer"})
    assert detect_format(row, "f:1") == "alpaca"
    with pytest.raises(UserError, match=r"f:1: cannot tell the data format from the keys \['q'\]"):
        detect_format({"q": 1}, "f:1")


def test_read_records_file_kinds(tmp_path):
    (tmp_path / "d.json").write_text('[{"instruction": "a", "output": "b"}]')
    assert read_records([str(tmp_path / "d.json")])[0].where == f"{tmp_path / 'd.json'}#0"
    (tmp_path / "d.csv").write_text('instruction,output\n"a, with comma",b\n')
    assert read_records([str(tmp_path / "d.csv")])[0].data == {"instruction": "a, with comma", "output": "b"}
    with pytest.raises(UserError, match="data file not found"):
        read_records([str(tmp_path / "missing.jsonl")])
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(UserError, match="no file matches|unsupported data file type"):
        read_records([str(tmp_path / "*.txt")])


def test_weights_sample_and_repeat_deterministically():
    records = [Record({"i": i}, f"f:{i}") for i in range(10)]
    half = apply_weight(records, 0.5, seed=1)
    assert len(half) == 5 and half == apply_weight(records, 0.5, seed=1)
    assert [r.where for r in half] == sorted((r.where for r in half), key=lambda w: int(w[2:]))
    assert len(apply_weight(records, 2.5, seed=1)) == 25


def test_val_size_split_is_deterministic_and_disjoint():
    from instructkit.data.formats import Conversation

    convs = [Conversation((Message(U, str(i)), Message(A, "x")), f"f:{i}") for i in range(8)]
    train, evals = split_off(convs, 0.25, seed=3)
    assert len(train) == 6 and len(evals) == 2 and not {c.where for c in train} & {c.where for c in evals}
    assert [c.where for c in split_off(convs, 0.25, seed=3)[1]] == [c.where for c in evals]
    with pytest.raises(UserError, match="leaves 8 of 8 rows"):
        split_off(convs, 8, seed=3)


def test_fit_length_policies():
    ids, labels = [1, 2, 3, 4, 5], [IGNORE, IGNORE, 3, 4, 5]
    assert fit_length(ids, labels, 5, "drop", 9) == (ids, labels)
    assert fit_length(ids, labels, 4, "drop", 9) is None
    assert fit_length(ids, labels, 4, "truncate", 9) == ([1, 2, 3, 9], [IGNORE, IGNORE, 3, 9])
    assert fit_length(ids, labels, 2, "truncate", 9) is None  # only prompt would remain


def test_overlength_counts_and_error(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS + [{"instruction": "long " * 100, "output": "x"}])
    data = build_datasets(DataConfig(train_file=str(path), max_length=300, cache=False), byte_tokenizer, 0)
    assert len(data.train) == len(ROWS) and data.stats["train"]["dropped"] == 1
    with pytest.raises(UserError, match=rf"over max_length: 1 row\n    {path}:9: \d+ tokens, over data.max_length=300"):
        build_datasets(DataConfig(train_file=str(path), max_length=300, overlength="error", cache=False),
                       byte_tokenizer, 0)
    with pytest.raises(UserError, match="no training examples are left: 9 valid rows, 9 dropped"):
        build_datasets(DataConfig(train_file=str(path), max_length=20, cache=False), byte_tokenizer, 0)


def test_pad_batch_right_and_left():
    batch = pad_batch([Example([1, 2, 3], [IGNORE, 2, 3]), Example([4], [4])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]
    left = pad_batch([Example([1, 2, 3], [1, 2, 3]), Example([4], [4])], pad_id=0, side="left")
    assert left["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
