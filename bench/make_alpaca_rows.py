"""Write an Alpaca-style JSONL of N rows for the data benchmark: {instruction, input, output} of random
pseudo-words at realistic lengths (Alpaca-like: a short instruction, an input on about 40% of rows, a
long-tailed answer, so a few rows exceed max_length=512 tokens and are dropped, as in real data).

    python bench/make_alpaca_rows.py --rows 1000000 --out /tmp/alpaca-1m.jsonl

Seeded and streamed (constant memory); the same arguments give the same bytes.
"""

from __future__ import annotations

import argparse
import json
import random
import string

SYLLABLES = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"] + list("aeiou")


def word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((1, 2, 2, 2, 3, 3, 4))))


def sentence(rng: random.Random, n_words: int) -> str:
    words = [word(rng) for _ in range(max(1, n_words))]
    out, since = [], 0
    for w in words:
        since += 1
        if since > rng.randint(6, 16):
            out[-1] += rng.choice(".,;") if rng.random() < 0.8 else "."
            since = 0
        out.append(w)
    text = " ".join(out)
    return text[0].upper() + text[1:] + rng.choice(".?!" if n_words < 20 else "..")


def row(rng: random.Random) -> dict:
    instruction = sentence(rng, int(rng.lognormvariate(2.5, 0.45)))  # median ~12 words
    text_input = sentence(rng, int(rng.lognormvariate(2.8, 0.8))) if rng.random() < 0.4 else ""
    output = sentence(rng, int(rng.lognormvariate(3.9, 0.8)))  # median ~50 words, long tail
    if rng.random() < 0.05:
        output += "\n" + "\n".join(f"{i}. {sentence(rng, rng.randint(4, 12))}" for i in range(1, rng.randint(3, 8)))
    if rng.random() < 0.02:
        output += " " + "".join(rng.choice(string.digits) for _ in range(rng.randint(3, 12)))
    return {"instruction": instruction, "input": text_input, "output": output}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with open(args.out, "w", encoding="utf-8") as handle:
        for _ in range(args.rows):
            handle.write(json.dumps(row(rng), ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
