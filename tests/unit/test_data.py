import pytest

from instructkit.config import DataConfig
from instructkit.data.collate import pad_batch
from instructkit.data.formats import Message, alpaca_to_conversation, to_conversations
from instructkit.data.pipeline import build_datasets, load_conversations
from instructkit.data.sources import read_records
from instructkit.data.tokenize import IGNORE, Example, fit_length
from instructkit.errors import UserError
from tests.conftest import ROWS, write_jsonl


def test_alpaca_row_to_conversation():
    row = {"instruction": "Add one.", "input": "2", "output": "3", "system": "Be exact."}
    assert alpaca_to_conversation(row) == (Message("system", "Be exact."), Message("user", "Add one.", "2"),
                                           Message("assistant", "3"))
    assert alpaca_to_conversation({"instruction": "x", "input": "", "output": "y"})[0].input is None


def test_bad_rows_are_reported_with_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "ok", "output": "ok"}, {"instruction": "x"},
                                              {"instruction": 3, "output": "y"}, {"instruction": "z", "output": " "}])
    with pytest.raises(UserError) as err:
        to_conversations(read_records([str(path)]), "auto")
    text = str(err.value)
    assert "3 of 4 rows" in text
    assert f"{path}:2: missing field 'output'" in text
    assert f"{path}:3: field 'instruction' is a int, expected a string" in text
    assert f"{path}:4: field 'output' is empty" in text


def test_invalid_json_line_and_bytes(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    with pytest.raises(UserError, match=rf"{path}:2: not valid JSON .*column"):
        read_records([str(path)])
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff"}\n')
    with pytest.raises(UserError, match=rf"{path}:2: bytes that are not UTF-8"):
        read_records([str(path)])


def test_json_list_file_and_unknown_format(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"instruction": "a", "output": "b"}]')
    assert read_records([str(path)])[0].where == f"{path}#0"
    with pytest.raises(UserError, match="cannot tell the data format"):
        to_conversations(read_records([str(write_jsonl(tmp_path / "x.jsonl", [{"q": "a"}]))]), "auto")
    with pytest.raises(UserError, match="data file not found"):
        read_records([str(tmp_path / "missing.jsonl")])
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="unsupported data file type"):
        read_records([str(tmp_path / "d.csv")])


def test_val_size_split_is_deterministic_and_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    cfg = DataConfig(train_file=str(path), val_size=0.25)
    train, evals, _ = load_conversations(cfg, seed=3)
    assert len(train) == 6 and len(evals) == 2
    assert not {c.where for c in train} & {c.where for c in evals}
    assert [c.where for c in load_conversations(cfg, seed=3)[1]] == [c.where for c in evals]


def test_fit_length_policies():
    ids, labels = [1, 2, 3, 4, 5], [IGNORE, IGNORE, 3, 4, 5]
    assert fit_length(ids, labels, 5, "drop", 9) == (ids, labels)
    assert fit_length(ids, labels, 4, "drop", 9) is None
    assert fit_length(ids, labels, 4, "truncate", 9) == ([1, 2, 3, 9], [IGNORE, IGNORE, 3, 9])
    assert fit_length(ids, labels, 2, "truncate", 9) is None  # only prompt would remain


def test_overlength_counts_and_error(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS + [{"instruction": "long " * 100, "output": "x"}])
    data = build_datasets(DataConfig(train_file=str(path), max_length=300), byte_tokenizer, 0)
    assert len(data.train) == len(ROWS) and data.stats["train"]["dropped"] == 1
    with pytest.raises(UserError, match=rf"{path}:9: the example is \d+ tokens, over data.max_length=300"):
        build_datasets(DataConfig(train_file=str(path), max_length=300, overlength="error"), byte_tokenizer, 0)
    with pytest.raises(UserError, match="all 9 train rows are longer"):
        build_datasets(DataConfig(train_file=str(path), max_length=20), byte_tokenizer, 0)


def test_pad_batch_right_and_left():
    batch = pad_batch([Example([1, 2, 3], [IGNORE, 2, 3]), Example([4], [4])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]
    left = pad_batch([Example([1, 2, 3], [1, 2, 3]), Example([4], [4])], pad_id=0, side="left")
    assert left["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
