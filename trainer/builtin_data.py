"""Datasets the project generates itself, so the default run needs no download.

``builtin:sentiment`` — short reviews whose label follows the sentiment word, flipped by a
negation ("the plot was not good" → negative), and decided by the second clause after a
"but" ("the cast was dull but the story was moving" → positive). Learnable by a tiny BERT
in a minute, but not by counting words (negation and contrast need word order).
``builtin:echo`` — prompt/response pairs ("count from 7 :" → "8 9 10") for causal-LM SFT.
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


GENERATORS = {"sentiment": sentiment, "echo": echo}


def vocabulary() -> list[str]:
    """Every word the generators can emit (the builtin tokenizer's vocabulary)."""
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
