"""Datasets the project generates itself, so the default run needs no download.

``builtin:sentiment`` — short reviews whose label follows the sentiment word, flipped by a
negation ("the plot was not good" → negative), and decided by the second clause after a
"but" ("the cast was dull but the story was moving" → positive). Learnable by a tiny BERT
in a minute, but not by counting words (negation and contrast need word order).
``builtin:echo`` — prompt/response pairs ("count from 7 :" → "8 9 10") for causal-LM SFT.
``builtin:ner`` — sentences with PER / LOC / ORG entities of one to three words, BIO tags
(``tokens`` / ``tags``). Some names are people in one sentence and places in another
("jordan", "washington") and "apple" is a company or a fruit: the context decides, so a
tagger must read word order, not only look words up.
"""

from __future__ import annotations

import random

VERSION = 2  # part of the data cache key: bump when a generator changes

POSITIVE = [
    "good",
    "great",
    "excellent",
    "wonderful",
    "brilliant",
    "delightful",
    "superb",
    "charming",
    "moving",
    "fun",
]
NEGATIVE = [
    "bad",
    "awful",
    "terrible",
    "boring",
    "dull",
    "weak",
    "clumsy",
    "tedious",
    "messy",
    "bland",
]
SUBJECTS = [
    "movie",
    "film",
    "plot",
    "acting",
    "story",
    "script",
    "ending",
    "cast",
    "music",
    "camera work",
    "dialogue",
    "pacing",
]
INTENSIFIERS = ["", "", "very", "really", "quite", "truly", "rather"]
OPENERS = ["", "", "honestly ,", "overall ,", "i think", "in the end", "to me", "frankly ,"]
TAILS = ["", "", ".", "!", "if you ask me .", "for the most part .", "from start to finish ."]
NUMBER_WORDS = [str(i) for i in range(40)]


def _clause(rng: random.Random, positive: bool) -> str:
    negated = rng.random() < 0.3
    word = rng.choice(POSITIVE if positive != negated else NEGATIVE)
    verb = rng.choice(["was", "is", "felt", "seemed"])
    parts = [
        "the",
        rng.choice(SUBJECTS),
        verb,
        "not" if negated else "",
        rng.choice(INTENSIFIERS),
        word,
    ]
    return " ".join(p for p in parts if p)


def _review(rng: random.Random) -> tuple[str, int]:
    """One or two clauses; with "but", the second clause decides the label."""
    positive = rng.random() < 0.5
    text = _clause(rng, positive)
    if rng.random() < 0.3:
        text = _clause(rng, not positive) + " but " + text
    parts = [rng.choice(OPENERS), text, rng.choice(TAILS)]
    return " ".join(p for p in parts if p), int(positive)


def sentiment(n: int, seed: int) -> dict[str, list]:
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        t, y = _review(rng)
        texts.append(t)
        labels.append(y)
    return {"text": texts, "label": labels}


def echo(n: int, seed: int) -> dict[str, list]:
    rng = random.Random(seed)
    prompts, responses = [], []
    for _ in range(n):
        start = rng.randrange(0, 30)
        k = rng.randrange(2, 6)
        prompts.append(f"count from {start} :")
        responses.append(" ".join(str(start + i) for i in range(1, k + 1)) + " .")
    return {
        "prompt": prompts,
        "response": responses,
        "text": [p + " " + r for p, r in zip(prompts, responses)],
    }


FIRST_NAMES = ["anna", "marco", "li", "sofia", "james", "amir", "elena", "kofi", "jordan", "maria"]
LAST_NAMES = ["smith", "rossi", "chen", "garcia", "novak", "okafor", "washington", "lincoln"]
PLACES = [
    "paris",
    "berlin",
    "cairo",
    "tokyo",
    "lima",
    "jordan",
    "washington",
    "lincoln",
    "new york",
    "san francisco",
    "buenos aires",
    "rio de janeiro",
]
ORGS = [
    "acme corp",
    "globex",
    "initech",
    "apple",
    "red cross",
    "united nations",
    "bank of america",
    "northwind traders",
    "city hospital",
]
# {PER} / {LOC} / {ORG} are entities; every other word is O
NER_TEMPLATES = [
    "{PER} works for {ORG} in {LOC} .",
    "{PER} moved to {LOC} last year .",
    "{ORG} opened an office in {LOC} .",
    "yesterday {PER} met {PER} at {ORG} .",
    "{PER} said {ORG} will hire more people .",
    "flights from {LOC} to {LOC} were cancelled .",
    "{PER} ate an apple in {LOC} .",
    "we visited {LOC} and {LOC} in may .",
    "according to {PER} , {ORG} lost money .",
    "{LOC} police arrested {PER} on friday .",
    "{ORG} and {ORG} signed a deal .",
    "the weather in {LOC} was cold .",
    "she bought an apple and a pear .",
    "it rained all day .",
    "{PER} , a doctor from {LOC} , joined {ORG} .",
    "talks between {ORG} and {PER} ended .",
]
NER_TYPES = ("PER", "LOC", "ORG")


def _entity(rng: random.Random, kind: str) -> list[str]:
    if kind == "PER":
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        return rng.choice([[first], [first, last], [first, last], ["mr", last]])
    return rng.choice(PLACES if kind == "LOC" else ORGS).split()


def ner(n: int, seed: int) -> dict[str, list]:
    rng = random.Random(seed)
    tokens, tags = [], []
    for _ in range(n):
        words, row = [], []
        for part in rng.choice(NER_TEMPLATES).split():
            kind = part.strip("{}")
            if kind in NER_TYPES:
                entity = _entity(rng, kind)
                words += entity
                row += [f"B-{kind}"] + [f"I-{kind}"] * (len(entity) - 1)
            else:
                words.append(part)
                row.append("O")
        tokens.append(words)
        tags.append(row)
    return {"tokens": tokens, "tags": tags}


GENERATORS = {"sentiment": sentiment, "echo": echo, "ner": ner}


def ner_vocabulary() -> list[str]:
    words = {w for t in NER_TEMPLATES for w in t.split() if w.strip("{}") not in NER_TYPES}
    words |= {w for e in FIRST_NAMES + LAST_NAMES + PLACES + ORGS + ["mr"] for w in e.split()}
    return sorted(words)


def vocabulary(name: str = "sentiment") -> list[str]:
    """Every word the generator ``name`` can emit (the builtin tokenizer's vocabulary);
    sentiment and echo share one."""
    if name == "ner":
        return ner_vocabulary()
    words = set(POSITIVE + NEGATIVE + INTENSIFIERS + OPENERS + TAILS + NUMBER_WORDS)
    words |= {w for s in SUBJECTS for w in s.split()}
    words |= {
        "the",
        "was",
        "is",
        "felt",
        "seemed",
        "not",
        "but",
        "count",
        "from",
        ":",
        ".",
        ",",
        "!",
    }
    out = set()
    for w in words:
        out.update(w.split())
    return sorted(out)
