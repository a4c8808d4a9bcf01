"""Million-row data path: streamed reading, the memory-mapped cache and the old in-memory path agree exactly.

The digests below were computed with the in-memory pipeline before streaming and the memory-mapped cache
(CACHE_FORMAT 5): every example's tokens, labels and provenance, in order, train and eval, and the stats a
run records. A streamed or cached dataset that differs in one token, mask bit, row or order fails here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from instructkit.config import DataConfig
from instructkit.data.pipeline import build_datasets

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"


def digest(data, tmp: Path) -> str:
    """Tokens, labels and file:line (file name only) of every example in order, and the stats minus the cache
    state and absolute paths."""
    def side(e):
        return [list(e.input_ids), list(e.labels), Path(e.where).name]

    def item(x):
        return [side(x.chosen), side(x.rejected), Path(x.where).name] if hasattr(x, "chosen") else side(x)

    stats = {k: v for k, v in data.stats.items() if k not in ("cache", "data_files", "store")}
    text = json.dumps([[item(x) for x in data.train], [item(x) for x in data.eval], stats], sort_keys=True,
                      default=str)
    for folder in (str(tmp), str(DATA), str(ROOT)):
        text = text.replace(folder + "/", "")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _mixed(tmp: Path) -> list[str]:
    """The quickstart rows as JSONL (with bad rows), JSON, CSV and Parquet, each a source."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (DATA / "train.jsonl").read_text().splitlines()]
    lines = [json.dumps(r) for r in rows[:120]]
    lines[5], lines[17] = '{"instruction": "a", "output": "b"', '{"instruction": "a"}'
    (tmp / "a.jsonl").write_text("\n".join(lines) + "\n\n")
    (tmp / "b.json").write_text(json.dumps(rows[120:200], indent=1))
    flat = [{"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]}
            for r in rows[200:300]]
    import csv

    with open(tmp / "c.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(flat)
    pq.write_table(pa.Table.from_pylist(flat), tmp / "d.parquet", row_group_size=30)
    return [str(tmp / n) for n in ("a.jsonl", "b.json", "c.csv", "d.parquet")]


def _long(tmp: Path) -> str:
    """Quickstart rows with some far longer than max_length, in the prompt, the answer or both."""
    rows = [json.loads(line) for line in (DATA / "train.jsonl").read_text().splitlines()][:60]
    for i, (a, b) in enumerate([(9000, 5), (5, 9000), (3000, 3000), (40, 200), (100, 30000)]):
        rows[7 * i + 3] = {"instruction": "word " * (a // 5), "input": "x" * (i * 50), "output": "end " * (b // 4)}
    (tmp / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp / "long.jsonl")


CASES = {
    "long-drop": lambda t: dict(train_file=_long(t), max_length=300, val_size=0),
    "long-truncate": lambda t: dict(train_file=_long(t), max_length=300, overlength="truncate", val_size=0,
                                    template="chatml"),
    "quickstart": lambda t: dict(train_file=str(DATA / "train.jsonl"), eval_file=str(DATA / "eval.jsonl")),
    "val-split": lambda t: dict(train_file=str(DATA / "train.jsonl"), val_size=0.1, max_length=400),
    "truncate-inputs": lambda t: dict(train_file=str(DATA / "train.jsonl"), max_length=150, overlength="truncate",
                                      train_on_inputs=True, template="chatml", val_size=30),
    "mixed-skip": lambda t: dict(train_file=_mixed(t), on_bad_row="skip", max_length=330, val_size="auto"),
    "weighted": lambda t: dict(train_file=[{"path": str(DATA / "train.jsonl"), "weight": 0.5},
                                           {"path": str(DATA / "eval.jsonl"), "weight": 2.5}], max_length=400),
    "pairs": lambda t: dict(train_file=str(DATA / "pref_train.jsonl"), eval_file=str(DATA / "pref_eval.jsonl"),
                            max_length=450),
    "pairs-split": lambda t: dict(train_file=str(DATA / "pref_train.jsonl"), val_size=0.1, overlength="truncate",
                                  max_length=330),
}

EXPECTED = {  # computed with the in-memory pipeline (CACHE_FORMAT 5), seed 3, the byte tokenizer
    "long-drop": "7e2ebbdf4d65c372",  # 11 train, 0 eval 49 0 0
    "long-truncate": "1c6839a74af186e1",  # 57 train, 0 eval 3 2 0
    "mixed-skip": "3e3f0265b46997a7",  # 191 train, 9 eval 187 0 2
    "pairs": "894d415d46c7df85",  # 400 train, 60 eval 0 0 0
    "pairs-split": "11e231bcc0de5638",  # 265 train, 35 eval 95 95 0
    "quickstart": "73337b8a4e01e818",  # 500 train, 40 eval 0 0 0
    "truncate-inputs": "b53b53a544a14570",  # 470 train, 30 eval 0 184 0
    "val-split": "9846e7449957b069",  # 450 train, 50 eval 0 0 0
    "weighted": "86473950a659d5b0",  # 330 train, 20 eval 0 0 0
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_streamed_and_cached_data_equal_the_in_memory_path(name, tmp_path, byte_tokenizer, monkeypatch):
    monkeypatch.setenv("INSTRUCTKIT_HOME", str(tmp_path / "home"))
    cfg = DataConfig(**CASES[name](tmp_path))
    built = build_datasets(cfg.model_copy(update={"cache": False}), byte_tokenizer, 3)
    miss = build_datasets(cfg, byte_tokenizer, 3)
    hit = build_datasets(cfg, byte_tokenizer, 3)
    assert (miss.stats["cache"], hit.stats["cache"]) == ("miss", "hit")
    assert digest(built, tmp_path) == digest(miss, tmp_path) == digest(hit, tmp_path) == EXPECTED[name]


def _old_pack(lengths, max_length):
    """Best-fit-decreasing as it was (a sorted list of every open bin's room): the reference order."""
    import bisect

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins, free = [], []
    for i in order:
        slot = bisect.bisect_left(free, (lengths[i], -1))
        if slot < len(free):
            room, b = free.pop(slot)
            bins[b].append(i)
            bisect.insort(free, (room - lengths[i], b))
        else:
            bins.append([i])
            bisect.insort(free, (max_length - lengths[i], len(bins) - 1))
    return bins


@pytest.mark.parametrize("seed", range(4))
def test_fast_packing_and_length_grouping_give_the_same_order_as_before(seed):
    import random

    import numpy as np

    from instructkit.data.packing import pack
    from instructkit.data.sampler import ResumableSampler

    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 40), rng.randint(1, 512), 512, 256]) for _ in range(3000)]
    assert pack(lengths, 512) == pack(np.array(lengths), 512) == _old_pack(lengths, 512)
    sampler = ResumableSampler(3000, seed, lengths=np.array(lengths), batch_size=4)
    mine = sampler.order()
    window, old = ResumableSampler.GROUP * 4, []
    perm = ResumableSampler(3000, seed).order()
    for start in range(0, 3000, window):
        chunk = sorted(perm[start:start + window], key=lambda i: -lengths[i])
        old += [chunk[i:i + 4] for i in range(0, len(chunk), 4)]
    random.Random(seed * 1000003).shuffle(old)
    assert mine == [i for b in old for i in b]


PREPARE = """
import os, signal, sys
from instructkit.config import DataConfig
from instructkit.data import store
from instructkit.data.pipeline import build_datasets
from tests.conftest import make_byte_tokenizer

calls = []
real = store.StoreWriter.add_arrays
def add_then_die(self, *args):
    real(self, *args)
    calls.append(1)
    if len(calls) == 2:  # killed mid-write: no exception handler, no cleanup runs
        os.kill(os.getpid(), signal.SIGKILL)
store.StoreWriter.add_arrays = add_then_die
build_datasets(DataConfig(train_file=sys.argv[1], max_length=400), make_byte_tokenizer(), 3)
"""


def test_a_killed_prepare_leaves_nothing_a_later_run_uses(tmp_path, byte_tokenizer, monkeypatch):
    import subprocess
    import sys

    monkeypatch.setenv("INSTRUCTKIT_HOME", str(tmp_path / "home"))
    rows = (DATA / "train.jsonl").read_text().splitlines()
    (tmp_path / "t.jsonl").write_text("\n".join(rows * 3) + "\n")  # 3 chunks
    done = subprocess.run([sys.executable, "-c", PREPARE, str(tmp_path / "t.jsonl")], cwd=ROOT,
                          env={**__import__("os").environ, "INSTRUCTKIT_HOME": str(tmp_path / "home")})
    assert done.returncode == -9
    cache = tmp_path / "home" / "data-cache"
    assert [p.name for p in cache.iterdir() if ".tmp-" in p.name]  # the half-written build is there...
    cfg = DataConfig(train_file=str(tmp_path / "t.jsonl"), max_length=400)
    again = build_datasets(cfg, byte_tokenizer, 3)
    assert again.stats["cache"] == "miss"  # ...and was not used
    assert not [p.name for p in cache.iterdir() if ".tmp-" in p.name]  # and is gone
    fresh = build_datasets(cfg.model_copy(update={"cache": False}), byte_tokenizer, 3)
    assert digest(again, tmp_path) == digest(fresh, tmp_path) and len(again.train) == 1425


def test_a_full_disk_keeps_the_previous_cache_and_exits_2(tiny_config, tmp_path, monkeypatch, capsys):
    import errno

    from instructkit.cli import main
    from instructkit.data import store

    monkeypatch.setenv("INSTRUCTKIT_HOME", str(tmp_path / "home"))
    config = tiny_config()
    assert main(["data", "prepare", str(config)]) == 0
    cache = tmp_path / "home" / "data-cache"
    def entries():
        return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))

    before = entries()

    def full(self, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.StoreWriter, "add_arrays", full)
    assert main(["data", "prepare", str(config), "data.max_length=300"]) == 2
    err = capsys.readouterr().err
    assert "the disk is full" in err and "INSTRUCTKIT_HOME" in err and "Traceback" not in err
    assert entries() == before  # nothing half-written, the old entry intact
    monkeypatch.undo()
    monkeypatch.setenv("INSTRUCTKIT_HOME", str(tmp_path / "home"))
    assert main(["data", "prepare", str(config)]) == 0
    assert "tokenized data cache: hit" in capsys.readouterr().out


MEMORY = """
import resource, subprocess, sys
from instructkit.config import DataConfig
from instructkit.data.pipeline import build_datasets
from tests.conftest import make_byte_tokenizer

tok = make_byte_tokenizer()
path = sys.argv[1]
subprocess.run([sys.executable, "bench/make_alpaca_rows.py", "--rows", sys.argv[2], "--out", path], check=True)
cfg = DataConfig(train_file=path, max_length=1024, val_size=0, num_proc=1)
head = path + ".head.jsonl"
open(head, "w").writelines(open(path).readlines()[:600])
build_datasets(cfg.model_copy(update={"train_file": head}), tok, 0)  # warm: imports, template, a small store
import psutil
base = psutil.Process().memory_info().rss / 1024  # now, after the warm-up (ru_maxrss is in KiB)
data = build_datasets(cfg, tok, 0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - base) / 1024, len(data.train))
"""


def test_memory_of_a_prepare_does_not_grow_with_the_rows(tmp_path):
    """Peak memory of a build, beyond the process's own, on 5k and 20k generated Alpaca rows: the in-memory
    pipeline held every row (4x the rows, about 4x the growth); the streamed one holds a chunk."""
    import os
    import subprocess
    import sys

    growth = {}
    for rows in (5000, 20000):
        out = subprocess.run([sys.executable, "-c", MEMORY, str(tmp_path / f"{rows}.jsonl"), str(rows)], cwd=ROOT,
                             env={**os.environ, "INSTRUCTKIT_HOME": str(tmp_path / "home")}, capture_output=True,
                             text=True, check=True)
        growth[rows], kept = (float(x) for x in out.stdout.split())
        assert kept > 0.8 * rows
    print(growth)
    assert growth[20000] < 1.5 * growth[5000] + 10, growth  # MB; linear growth would be 4x
