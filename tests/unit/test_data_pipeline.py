"""The pipeline on real files: malformed corpus, bad-row policy, cache, sources and mixing."""

import json
from pathlib import Path

import pytest

from instructkit.config import DataConfig, DatasetSpec
from instructkit.data.pipeline import build_datasets, check_rows
from instructkit.errors import UserError
from tests.conftest import ROWS, write_jsonl

GOOD = '{"instruction": "a", "output": "b"}\n'


def build(tok, path, **kw):
    kw.setdefault("max_length", 400)
    return build_datasets(DataConfig(train_file=str(path), **kw), tok, 0)


@pytest.mark.parametrize("content,message", [
    (GOOD + '{"instruction": "a", "output": "b"\n', r"invalid JSON: 1 row\n    .*d\.jsonl:2: Expecting ',' delimiter at column 35"),
    (GOOD + '{"instruction": ["a"], "output": "b"}\n', r"wrong type: 1 row\n    .*d\.jsonl:2: field 'instruction' is a list"),
    (GOOD + '{"instruction": "a", "output": ""}\n', r"empty field: 1 row\n    .*d\.jsonl:2: field 'output' is empty"),
    (GOOD + '{"instruction": "a"}\n', r"missing field: 1 row\n    .*d\.jsonl:2: missing field 'output'"),
    (GOOD.encode() + b'{"instruction": "caf\xe9", "output": "b"}\n', r"not UTF-8: 1 row\n    .*d\.jsonl:2: byte 0xe9 at column 21"),
    (GOOD + "[1, 2]\n", r"not an object: 1 row\n    .*d\.jsonl:2: a JSON list"),
    (GOOD + json.dumps({"instruction": "x" * 5000, "output": "y"}) + "\n", r"over max_length: 1 row\n    .*d\.jsonl:2: \d+ tokens"),
])
def test_malformed_rows_get_precise_messages(tmp_path, byte_tokenizer, content, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError, match=message) as err:
        build(byte_tokenizer, path, overlength="error")
    assert "1 of 2 train rows are bad (50.0%)" in str(err.value)
    assert "data.on_bad_row: skip" in str(err.value)


def test_bad_roles_in_messages_format(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                            {"role": "assistant", "content": "b"}]},
                                              {"messages": [{"role": "assistant", "content": "b"}]}])
    with pytest.raises(UserError, match=r"roles out of order: 1 row\n    .*m\.jsonl:2: turn 1 is 'assistant'"):
        build(byte_tokenizer, path)


def test_report_counts_per_reason_and_caps_examples(tmp_path, byte_tokenizer):
    rows = [{"instruction": "a", "output": "b"}] * 3 + [{"instruction": "a"}] * 7 + [{"output": "b"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(UserError) as err:
        build(byte_tokenizer, path)
    text = str(err.value)
    assert "8 of 11 train rows are bad" in text and "missing field: 8 rows" in text
    assert text.count("missing field 'output'") == 5 and "... and 3 more" in text


def test_skip_trains_on_the_rest_unless_too_many_are_bad(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS + [{"instruction": "a"}])
    data = build(byte_tokenizer, path, on_bad_row="skip", max_bad_fraction=0.2)
    assert len(data.train) == len(ROWS) and data.stats["bad_rows"]["train"]["counts"] == {"missing field": 1}
    with pytest.raises(UserError, match="over data.max_bad_fraction=0.1"):
        build(byte_tokenizer, path, on_bad_row="skip", max_bad_fraction=0.1)


def test_cache_hits_and_is_invalidated_by_content_and_settings(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    first = build(byte_tokenizer, path)
    second = build(byte_tokenizer, path)
    assert (first.stats["cache"], second.stats["cache"]) == ("miss", "hit")
    assert [e.input_ids for e in first.train] == [e.input_ids for e in second.train]
    assert [e.labels for e in first.train] == [e.labels for e in second.train]
    assert build(byte_tokenizer, path, max_length=390).stats["cache"] == "miss"
    assert build(byte_tokenizer, path, template="chatml").stats["cache"] == "miss"
    write_jsonl(path, ROWS[:-1] + [{"instruction": "Name a fruit.", "output": "pear"}])  # same size, new content
    changed = build(byte_tokenizer, path)
    assert changed.stats["cache"] == "miss" and "pear" in byte_tokenizer.decode(changed.train[-1].input_ids)
    assert build(byte_tokenizer, path, cache=False).stats["cache"] == "off"


def test_sources_csv_parquet_glob_directory(tmp_path, byte_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", ROWS[:3])
    (folder / "b.csv").write_text("instruction,input,output\nAdd one.,5,6\n")
    pq.write_table(pa.Table.from_pylist(ROWS[3:5]), folder / "c.parquet")
    for spec in (str(folder), str(folder / "*")):
        data = build(byte_tokenizer, spec, cache=False)
        assert len(data.train) == 6
        assert {e.where.split("/")[-1] for e in data.train} == {"a.jsonl:1", "a.jsonl:2", "a.jsonl:3", "b.csv:2",
                                                               "c.parquet#0", "c.parquet#1"}


def test_mixing_sources_of_different_formats_with_weights(tmp_path, byte_tokenizer):
    alpaca = write_jsonl(tmp_path / "a.jsonl", ROWS)
    chat = write_jsonl(tmp_path / "c.jsonl", [{"conversations": [{"from": "human", "value": f"q{i}"},
                                                                 {"from": "gpt", "value": f"a{i}"}]} for i in range(4)])
    qa = write_jsonl(tmp_path / "q.jsonl", [{"question": "q", "answer": "a"}])
    cfg = DataConfig(train_file=[DatasetSpec(path=str(alpaca), weight=0.5), DatasetSpec(path=str(chat), weight=2),
                                 DatasetSpec(path=str(qa), columns={"instruction": "question", "output": "answer"})],
                     max_length=400, cache=False)
    data = build_datasets(cfg, byte_tokenizer, 0)
    assert data.stats["format_counts"] == {"alpaca": 5, "sharegpt": 8}
    assert data.stats["formats"] == {str(alpaca): "alpaca", str(chat): "sharegpt", str(qa): "alpaca"}
    assert check_rows(cfg, 0).startswith("13 train rows (")


def test_hub_dataset_missing_offline_is_a_clear_error(byte_tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match="'nobody/no-such-set' is not a local file and loading it as a hub dataset failed"):
        build_datasets(DataConfig(train_file="nobody/no-such-set"), byte_tokenizer, 0)


def test_parallel_tokenization_equals_serial(tmp_path, byte_tokenizer):
    rows = [{"instruction": f"Echo {i}.", "output": str(i)} for i in range(700)]  # more than one chunk
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    serial = build(byte_tokenizer, path, cache=False)
    parallel = build(byte_tokenizer, path, cache=False, num_proc=2)
    assert [(e.input_ids, e.labels, e.where) for e in serial.train] == \
           [(e.input_ids, e.labels, e.where) for e in parallel.train]


def test_folder_sources_skip_dot_folders_and_read_each_real_file_once(tmp_path):
    from instructkit.data.sources import resolve_source

    row = '{"instruction": "a", "output": "b"}\n'
    data = tmp_path / "data"
    (data / ".ipynb_checkpoints").mkdir(parents=True)
    (data / "train.jsonl").write_text(row)
    (data / ".ipynb_checkpoints" / "train-checkpoint.jsonl").write_text(row)  # JupyterLab's copy
    (data / "sub").mkdir()
    (data / "sub" / "more.jsonl").write_text(row)
    (data / "sub" / "loop").symlink_to(data, target_is_directory=True)  # a link loop
    folder = resolve_source(str(data), "train", "data.train_file")
    pattern = resolve_source(str(data / "**" / "*.jsonl"), "train", "data.train_file")
    for resolved in (folder, pattern):
        names = sorted(Path(f).name for f in resolved.files)
        assert names == ["more.jsonl", "train.jsonl"], names
