"""The development suite: real tasks built from data that ships inside packages, not written by us.

    python bench/quality_tasks.py OUT_DIR        # writes OUT_DIR/train.jsonl and OUT_DIR/test.jsonl

Eight task families, each answer one short string checkable by exact match: classification, counting,
inference from a name, lookup and comparison over ISO 3166/4217/639 records (pycountry), CLDR locale data
(babel) and the Unicode character database (Python's unicodedata). Train and test rows are drawn from
disjoint entities (a country, character or month in the test split never appears in training), so a
model must learn each task's rule and format, not memorise answers. Kept apart from the quickstart's
synthetic tasks (examples/data). Deterministic: the same seed gives the same files on every machine
with the same package versions (the versions are written to OUT_DIR/versions.json).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path

TRAIN_PER_TASK = 63  # 8 tasks x 63 = 504 training rows, the size of the hidden acceptance suite (500)
TEST_PER_TASK = 25  # 200 held-out prompts
CLASSES = {"L": "letter", "N": "number", "P": "punctuation", "S": "symbol"}


def _characters() -> list[tuple[str, str]]:
    """(character, Unicode name) of assigned letters, numbers, punctuation and symbols below U+3000."""
    out = []
    for code in range(0x21, 0x3000):
        char = chr(code)
        name = unicodedata.name(char, "")
        if name and unicodedata.category(char)[0] in CLASSES:
            out.append((char, name))
    return out


def char_class(rng: random.Random) -> Iterator[dict]:
    """Classification: letter, number, punctuation or symbol, from the character and its name."""
    pools = {k: [c for c in _characters() if unicodedata.category(c[0])[0] == k] for k in CLASSES}
    while True:
        kind = rng.choice(list(CLASSES))
        char, name = rng.choice(pools[kind])
        yield {"key": char, "instruction": "Classify the Unicode character as letter, number, punctuation or symbol.",
               "input": f"{char} ({name})", "output": CLASSES[kind]}


def digit_value(rng: random.Random) -> Iterator[dict]:
    """Inference: the value of a decimal digit from any script, given its Unicode name."""
    digits = [(c, n) for c, n in _characters() if unicodedata.category(c) == "Nd" and c not in "0123456789"]
    while True:
        char, name = rng.choice(digits)
        yield {"key": char, "instruction": "What is the numeric value of this digit? Answer with one Arabic numeral.",
               "input": name, "output": str(unicodedata.digit(char))}


def name_words(rng: random.Random) -> Iterator[dict]:
    """Counting: the words of a Unicode character name."""
    chars = _characters()
    while True:
        char, name = rng.choice(chars)
        yield {"key": char, "instruction": "How many words are in this text? Answer with a number.",
               "input": name, "output": str(len(name.split()))}


def alpha2_code(rng: random.Random) -> Iterator[dict]:
    """Lookup and inference: a country's ISO 3166 alpha-2 code from its name and alpha-3 code."""
    import pycountry

    countries = list(pycountry.countries)
    while True:
        c = rng.choice(countries)
        yield {"key": c.alpha_2, "instruction": "Give the ISO 3166 alpha-2 code of the country.",
               "input": f"{c.name} (alpha-3: {c.alpha_3})", "output": c.alpha_2}


def country_currency(rng: random.Random) -> Iterator[dict]:
    """Knowledge lookup: the ISO 4217 code of the currency a country uses today (CLDR)."""
    import pycountry
    from babel.numbers import get_territory_currencies

    pairs = []
    for c in pycountry.countries:
        codes = get_territory_currencies(c.alpha_2)
        if len(codes) == 1:
            pairs.append((c.name, codes[0], c.alpha_2))
    while True:
        name, code, key = rng.choice(pairs)
        yield {"key": key, "instruction": "Which ISO 4217 currency code is used in this country?",
               "input": name, "output": code}


def language_name(rng: random.Random) -> Iterator[dict]:
    """Lookup: the English name of a language from its ISO 639-1 code."""
    import pycountry

    languages = [lang for lang in pycountry.languages if hasattr(lang, "alpha_2")]
    while True:
        lang = rng.choice(languages)
        yield {"key": lang.alpha_2, "instruction": "Name the language with this ISO 639-1 code.",
               "input": lang.alpha_2, "output": lang.name}


def month_name(rng: random.Random) -> Iterator[dict]:
    """Translation from CLDR: the name of month N in a language (keyed by language and month)."""
    from babel import Locale

    languages = ["fr", "de", "es", "it", "pt", "nl", "sv", "da", "pl", "cs", "ro", "fi", "tr", "id", "hu"]
    english = Locale("en")
    while True:
        code, month = rng.choice(languages), rng.randint(1, 12)
        loc = Locale(code)
        yield {"key": f"{code}-{month}", "instruction": f"What is the month called in {english.languages[code]}? "
               "Answer in lower case.", "input": english.months["format"]["wide"][month],
               "output": loc.months["stand-alone"]["wide"][month].lower()}


def larger_code(rng: random.Random) -> Iterator[dict]:
    """Comparison: which of two countries has the larger ISO 3166 numeric code."""
    import pycountry

    countries = list(pycountry.countries)
    while True:
        a, b = rng.sample(countries, 2)
        if a.numeric == b.numeric:
            continue
        winner = a if int(a.numeric) > int(b.numeric) else b
        yield {"key": f"{a.alpha_2}-{b.alpha_2}", "instruction": "Which country has the larger ISO numeric code? "
               "Answer with the country's name.", "input": f"{a.name}: {a.numeric}; {b.name}: {b.numeric}",
               "output": winner.name}


TASKS: dict[str, Callable[[random.Random], Iterator[dict]]] = {
    "char_class": char_class, "digit_value": digit_value, "name_words": name_words, "alpha2_code": alpha2_code,
    "country_currency": country_currency, "language_name": language_name, "month_name": month_name,
    "larger_code": larger_code,
}


def split_task(name: str, seed: int) -> tuple[list[dict], list[dict]]:
    """TRAIN_PER_TASK and TEST_PER_TASK rows of one task whose entities never cross the split."""
    rng = random.Random(f"{seed}-{name}")
    rows: dict[str, list[dict]] = {"train": [], "test": []}
    wanted = {"train": TRAIN_PER_TASK, "test": TEST_PER_TASK}
    home: dict[str, str] = {}  # entity (a character, country, language, month) -> its split
    used: set[str] = set()  # one row per key
    for attempt, row in enumerate(TASKS[name](rng)):
        if attempt > 200_000:
            raise RuntimeError(f"task {name}: not enough distinct entities")
        if row["key"] in used:
            continue
        entities = row["key"].split("-") if name == "larger_code" else [row["key"]]
        for entity in entities:
            share = TEST_PER_TASK / (TRAIN_PER_TASK + TEST_PER_TASK)
            home.setdefault(entity, "test" if rng.random() < share else "train")
        splits = {home[e] for e in entities}
        split = splits.pop()
        if splits or len(rows[split]) >= wanted[split]:
            continue
        used.add(row["key"])
        rows[split].append({k: v for k, v in row.items() if k != "key"} | {"task": name})
        if all(len(rows[s]) >= wanted[s] for s in rows):
            return rows["train"], rows["test"]
    raise AssertionError("unreachable")


def build(out: Path, seed: int = 0) -> dict:
    """Write train.jsonl and test.jsonl (shuffled across tasks) and versions.json; return row counts."""
    from importlib.metadata import version

    train, test = [], []
    for name in TASKS:
        a, b = split_task(name, seed)
        train += a
        test += b
    random.Random(seed).shuffle(train)
    out.mkdir(parents=True, exist_ok=True)
    for path, rows in ((out / "train.jsonl", train), (out / "test.jsonl", test)):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    versions = {"python": sys.version.split()[0], "unicodedata": unicodedata.unidata_version,
                "pycountry": version("pycountry"), "babel": version("babel")}
    (out / "versions.json").write_text(json.dumps(versions, indent=1) + "\n")
    return {"train": len(train), "test": len(test), "tasks": len(TASKS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(build(args.out, args.seed)))


if __name__ == "__main__":
    main()
