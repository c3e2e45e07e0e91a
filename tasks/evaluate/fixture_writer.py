"""Write the small evaluation fixtures qsweep ships, in each dataset's official schema.

The text is generated here from templates (no dataset text is copied), deterministically, so
``python -m tasks.evaluate.fixture_writer DIR`` reproduces the committed files byte for byte
(a test checks it). They exist so tests and the demo run offline; real studies point ``path:``
at the real data (a local file in the same schema, or a hub id).

- ``boolq.jsonl``: BoolQ (google/boolq): ``question``, ``passage``, ``answer`` (bool)
- ``gsm8k.jsonl``: GSM8K (openai/gsm8k, main): ``question``, ``answer`` ending in ``#### N``
- ``gsm8k-train.jsonl``, ``boolq-train.jsonl``: the few-shot examples of those two (lm-eval draws
  them from ``train``), generated from other seeds, with no item of the evaluated file
- ``msmarco.jsonl``: MS MARCO v1.1 (microsoft/ms_marco): ``query``, ``query_id``,
  ``query_type``, ``passages`` {``is_selected``, ``passage_text``, ``url``}, ``answers``,
  ``wellFormedAnswers``
- ``wikitext.jsonl``: WikiText document level (EleutherAI/wikitext_document_level): ``page``,
  with WikiText's tokenization conventions (`` @-@ ``, `` , ``, ``= Title =`` headings)
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"

PLACES = ["Aldermoor", "Brackenfield", "Coldwater Bay", "Dunmere", "Eastholme", "Fernhollow",
          "Greywick", "Harrowgate Vale", "Ivybridge Cross", "Juniper Falls", "Kestrel Point",
          "Larchmont", "Millbrook", "Northcombe"]
RIVERS = ["Avel", "Brise", "Corran", "Dwyn", "Elsk", "Fenn", "Garrow", "Hesk"]
TRADES = ["wool", "salt", "timber", "copper", "barley", "glass", "cider", "slate"]
NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Iris", "Jonah",
         "Kira", "Liam", "Maya", "Noah", "Omar", "Priya"]
ITEMS = [("apples", "basket"), ("marbles", "jar"), ("stickers", "album"), ("pencils", "box"),
         ("stamps", "book"), ("shells", "bucket"), ("cookies", "tin"), ("coins", "purse")]


def boolq(rng: random.Random, count: int = 24) -> list[dict]:
    rows = []
    for i in range(count):
        town, river, trade = rng.choice(PLACES), rng.choice(RIVERS), rng.choice(TRADES)
        founded = rng.randint(1150, 1890)
        other_trade = rng.choice([t for t in TRADES if t != trade])
        passage = (f"{town} is a market town on the River {river}. It was founded in {founded} "
                   f"and grew rich on the {trade} trade, which still employs many of its people. "
                   f"The town hall, built of local stone, stands beside the old bridge.")
        kind = i % 4
        if kind == 0:
            question, answer = f"is {town} on the river {river.lower()}", True
        elif kind == 1:
            question, answer = f"was {town} founded before {founded - rng.randint(5, 60)}", False
        elif kind == 2:
            question, answer = f"did {town} grow rich on the {trade} trade", True
        else:
            question, answer = f"did {town} grow rich on the {other_trade} trade", False
        rows.append({"question": question, "passage": passage, "answer": answer})
    return rows


def gsm8k(rng: random.Random, count: int = 24) -> list[dict]:
    rows = []
    for i in range(count):
        name, (item, holder) = rng.choice(NAMES), rng.choice(ITEMS)
        a, b, c = rng.randint(3, 40), rng.randint(2, 30), rng.randint(2, 6)
        if i % 3 == 0:
            total = a + b
            question = f"{name} has {a} {item} in a {holder}. A friend gives {name} {b} more. How many {item} does {name} have now?"
            answer = f"{name} has {a} + {b} = <<{a}+{b}={total}>>{total} {item}.\n#### {total}"
        elif i % 3 == 1:
            total = a * c
            question = f"{name} fills {c} {holder}s with {a} {item} each. How many {item} is that in all?"
            answer = f"That is {c} * {a} = <<{c}*{a}={total}>>{total} {item}.\n#### {total}"
        else:
            start, total = a + b, a + b - b + c
            question = (f"{name} had {start} {item}, gave away {b} of them, then found {c} more. "
                        f"How many {item} does {name} have?")
            answer = (f"After giving some away {name} had {start} - {b} = <<{start}-{b}={a}>>{a} {item}.\n"
                      f"After finding more {name} had {a} + {c} = <<{a}+{c}={total}>>{total} {item}.\n#### {total}")
        rows.append({"question": question, "answer": answer})
    return rows


def msmarco(rng: random.Random, count: int = 16, candidates: int = 8) -> list[dict]:
    rows = []
    facts = []
    for town in PLACES:
        river, trade = rng.choice(RIVERS), rng.choice(TRADES)
        year, people = rng.randint(1150, 1890), rng.randint(2, 90) * 1000
        facts.append((town, river, trade, year, people))
    for qid in range(count):
        town, river, trade, year, people = facts[qid % len(facts)]
        kind = qid % 3
        if kind == 0:
            query, answer = f"when was {town.lower()} founded", f"{town} was founded in {year}."
        elif kind == 1:
            query, answer = f"what river runs through {town.lower()}", f"The River {river}."
        else:
            query, answer = f"{town.lower()} population", f"About {people:,} people."
        # The selected passage answers the query; two hard negatives name the same town but not
        # the asked-for fact; the rest are about other towns.
        facts_of = {0: f"It was founded in {year}.", 1: f"It lies on the River {river}.",
                    2: f"It is home to about {people:,} people."}
        relevant = f"{town} is known for its {trade}. {facts_of[kind]}"
        hard = [f"{town} is known for its {trade}. {facts_of[k]}" for k in facts_of if k != kind]
        others = rng.sample([f for f in facts if f[0] != town], candidates - 3)
        passages = hard + [f"{o[0]} lies on the River {o[1]}. Founded in {o[3]}, it is home to about "
                           f"{o[4]:,} people and is known for its {o[2]}." for o in others]
        rng.shuffle(passages)
        position = rng.randrange(candidates)
        passages.insert(position, relevant)
        rows.append({
            "query": query, "query_id": 1000 + qid, "query_type": "description" if kind else "numeric",
            "passages": {"is_selected": [int(i == position) for i in range(candidates)],
                         "passage_text": passages,
                         "url": [f"https://example.org/towns/{qid}/{i}" for i in range(candidates)]},
            "answers": [answer], "wellFormedAnswers": [],
        })
    return rows


def wikitext(rng: random.Random, count: int = 8) -> list[dict]:
    rows = []
    for _ in range(count):
        town, river, trade = rng.choice(PLACES), rng.choice(RIVERS), rng.choice(TRADES)
        year, people, bridges = rng.randint(1150, 1890), rng.randint(2, 90), rng.randint(2, 9)
        lines = [
            f" = {town} = ",
            "",
            f" {town} is a market town on the River {river} , about {rng.randint(5, 40)} miles "
            f"from the coast . It had a population of {people} @,@ {rng.randint(100, 999)} at the "
            f"last census . The town grew around a {trade} market that was first recorded in {year} .",
            "",
            " = = History = = ",
            "",
            f" The earliest records describe a small settlement at a ford on the {river} . A charter "
            f"granted in {year + rng.randint(1, 90)} allowed a weekly market , and the {trade} trade "
            f"brought merchants from across the region . During the nineteenth century the town "
            f"built {bridges} bridges and a railway station on the north @-@ south line .",
            "",
            " = = Geography = = ",
            "",
            f" The town stands on low ground where the {river} meets a smaller stream . Flooding was "
            f"common until embankments were raised , and the old quarter still keeps its narrow "
            f"lanes , stone houses and a covered market hall .",
            "",
        ]
        rows.append({"page": "\n".join(lines)})
    return rows


def write(directory: Path = FIXTURES) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, make in (("boolq", boolq), ("gsm8k", gsm8k), ("msmarco", msmarco), ("wikitext", wikitext)):
        path = directory / f"{name}.jsonl"
        rows = make(random.Random(f"qsweep-{name}"))
        path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        paths.append(path)
        if name in ("boolq", "gsm8k"):  # their few-shot split, disjoint from the evaluated items
            seen = {r["question"] for r in rows}
            train = [r for r in make(random.Random(f"qsweep-{name}-train"), 16) if r["question"] not in seen]
            path = directory / f"{name}-train.jsonl"
            path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in train))
            paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write(Path(sys.argv[1]) if len(sys.argv) > 1 else FIXTURES):
        print(written)
