"""Write the quickstart data set: five task families whose answers can be checked exactly.

Deterministic (fixed seeds), so the committed files are reproducible:

    python examples/make_quickstart_data.py            # writes examples/data/{train,eval,test}.jsonl

Every row is Alpaca (`instruction`, `input`, `output`) plus `task`. test.jsonl is held out: no
(instruction, input) pair of it occurs in train or eval. A base instruct model answers these in
sentences; the tuned one learns the exact answer format.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

FIRST = ["anna", "ben", "carla", "dmitri", "elena", "farid", "grace", "hugo", "ines", "jamal", "kiko", "lena",
         "marco", "nadia", "omar", "priya", "quinn", "rosa", "sven", "tara", "umar", "vera", "wei", "yusuf", "zoe"]
LAST = ["smith", "garcia", "muller", "rossi", "kowalski", "tanaka", "silva", "nguyen", "okafor", "larsen",
        "dubois", "novak", "haddad", "ivanova", "kim", "patel", "costa", "berg", "moreau", "sato"]
DOMAINS = ["example.com", "mail.org", "acme.io", "uni-berlin.de", "shop.net", "lab.ai", "post.co.uk"]
CITIES = ["Lisbon", "Nairobi", "Osaka", "Toronto", "Krakow", "Lima", "Oslo", "Hanoi", "Dakar", "Perth",
          "Bergen", "Quito", "Tunis", "Porto", "Seoul", "Austin"]
COUNTRIES = ["Portugal", "Kenya", "Japan", "Canada", "Poland", "Peru", "Norway", "Vietnam", "Senegal", "Chile"]
COLORS = ["red", "teal", "amber", "violet", "olive", "navy", "coral", "ivory", "indigo", "maroon"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
PRODUCTS = ["blender", "headphones", "backpack", "kettle", "phone case", "desk lamp", "running shoes",
            "coffee grinder", "keyboard", "tent", "umbrella", "water bottle"]
POSITIVE = ["works perfectly", "exceeded my expectations", "is excellent value", "feels sturdy and well made",
            "arrived early and works great", "is the best purchase I made this year", "is a joy to use"]
NEGATIVE = ["broke after two days", "is a complete waste of money", "stopped working within a week",
            "feels cheap and flimsy", "arrived damaged", "is the worst purchase I made this year", "is useless"]
TOPICS = {
    "sports": ["striker scores twice as {c} wins the cup final", "coach praises defence after narrow league win",
               "sprinter breaks national record in {c}", "tennis champion reaches semi-final after five sets",
               "marathon runners brave heat in {c}"],
    "politics": ["parliament in {c} passes new budget after long debate", "minister resigns over spending row",
                 "voters in {c} head to the polls on Sunday", "senate rejects proposed election reform",
                 "mayor of {c} announces bid for second term"],
    "technology": ["start-up in {c} unveils faster battery for phones", "new chip doubles speed of laptops",
                   "software update fixes security flaw in routers", "engineers in {c} test self-driving buses",
                   "company releases open-source database engine"],
    "food": ["bakery in {c} wins prize for sourdough bread", "chef shares recipe for spicy lentil soup",
             "street food market opens in {c}", "study finds olive oil prices rising", "new cafe serves vegan desserts"],
}


def sentiment(rng: random.Random) -> dict:
    label = rng.choice(["positive", "negative"])
    phrase = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
    review = f"This {rng.choice(PRODUCTS)} {phrase}."
    return {"instruction": "Classify the sentiment of the review as positive or negative.",
            "input": review, "output": label}


def topic(rng: random.Random) -> dict:
    label = rng.choice(sorted(TOPICS))
    headline = rng.choice(TOPICS[label]).format(c=rng.choice(CITIES))
    return {"instruction": "Classify the topic of the headline as sports, politics, technology or food.",
            "input": headline[0].upper() + headline[1:], "output": label}


def email(rng: random.Random) -> dict:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    address = f"{first}.{last}@{rng.choice(DOMAINS)}"
    text = rng.choice([
        f"Please contact {first.title()} {last.title()} at {address} about the invoice.",
        f"For questions, write to {address} before Friday.",
        f"{first.title()} said the report should be sent to {address} as soon as possible.",
        f"Reply to {address} if you want a seat at the workshop.",
    ])
    return {"instruction": "Extract the email address from the text.", "input": text, "output": address}


def json_field(rng: random.Random) -> dict:
    record = {"name": rng.choice(FIRST).title(), "city": rng.choice(CITIES), "country": rng.choice(COUNTRIES),
              "color": rng.choice(COLORS)}
    keys = list(record)
    rng.shuffle(keys)
    field = rng.choice(keys)
    return {"instruction": f'Return the value of the "{field}" field of the JSON object.',
            "input": json.dumps({k: record[k] for k in keys}), "output": record[field]}


def date_iso(rng: random.Random) -> dict:
    year, month, day = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
    name = MONTHS[month - 1]
    text = rng.choice([f"{name} {day}, {year}", f"{day} {name} {year}"])
    return {"instruction": "Convert the date to ISO 8601 format (YYYY-MM-DD).", "input": text,
            "output": f"{year:04d}-{month:02d}-{day:02d}"}


TASKS = {"sentiment": sentiment, "topic": topic, "email": email, "json_field": json_field, "date_iso": date_iso}
SPLITS = {"train": 100, "eval": 8, "test": 16}  # rows per task


def build(seed: int = 20261128) -> dict[str, list[dict]]:
    """Rows per split; held-out splits never repeat a prompt seen in an earlier split."""
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    splits: dict[str, list[dict]] = {}
    for split, per_task in SPLITS.items():
        rows = []
        for name, make in TASKS.items():
            made = 0
            while made < per_task:
                row = make(rng)
                key = (row["instruction"], row["input"])
                if key in seen:
                    continue
                seen.add(key)
                rows.append({**row, "task": name})
                made += 1
        rng.shuffle(rows)
        splits[split] = rows
    return splits


def main(out_dir: Path = Path(__file__).parent / "data") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in build().items():
        with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{out_dir / split}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    main()
