"""The entity-level metric (trainer/entities.py) on hand-made cases, and against seqeval's
default mode where seqeval is installed (it is not a dependency)."""

from __future__ import annotations

import random

import pytest

from trainer.entities import (
    entity_counts,
    entity_metrics,
    get_entities,
    tag_problem,
)


@pytest.mark.parametrize(
    "tags, entities",
    [
        (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 1), ("LOC", 3, 3)]),
        # an entity that ends the sentence is closed by the end
        (["O", "O", "B-ORG", "I-ORG"], [("ORG", 2, 3)]),
        # adjacent entities of one type: B- starts a new one
        (["B-LOC", "B-LOC", "I-LOC"], [("LOC", 0, 0), ("LOC", 1, 2)]),
        # I- without a B- starts an entity (conlleval / seqeval default mode)
        (["O", "I-PER", "I-PER", "O"], [("PER", 1, 2)]),
        (["I-PER"], [("PER", 0, 0)]),
        # a type change inside I- tags ends one entity and starts another
        (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 0), ("LOC", 1, 2)]),
        (["B-PER", "O", "I-PER"], [("PER", 0, 0), ("PER", 2, 2)]),
        # IOBES
        (["S-PER", "B-LOC", "I-LOC", "E-LOC", "O"], [("PER", 0, 0), ("LOC", 1, 3)]),
        (["O", "O"], []),
        ([], []),
    ],
)
def test_entities_are_read_as_seqeval_reads_them(tags, entities):
    assert get_entities(tags) == entities


def test_an_entity_counts_only_with_its_type_and_both_boundaries():
    gold = [
        ["B-ORG", "I-ORG", "I-ORG", "O"],  # "bank of america"
        ["B-PER", "I-PER", "O", "B-LOC"],  # the LOC ends the sentence
        ["B-LOC", "B-LOC", "O"],  # two adjacent places
        ["O", "B-PER", "I-PER"],
    ]
    pred = [
        ["B-ORG", "I-ORG", "O", "O"],  # inner boundary only: a miss and a false alarm
        ["B-PER", "I-PER", "O", "B-LOC"],  # both right
        ["B-LOC", "I-LOC", "O"],  # merged into one: two misses, one false alarm
        ["O", "B-ORG", "I-ORG"],  # right span, wrong type
    ]
    counts = entity_counts(gold, pred)
    assert counts == {"ORG": [0, 2, 1], "PER": [1, 0, 1], "LOC": [1, 1, 2]}  # [tp, fp, fn]
    m = entity_metrics(counts)
    assert m["num_entities"] == 6 and m["num_predicted"] == 5
    assert m["precision"] == pytest.approx(2 / 5) and m["recall"] == pytest.approx(2 / 6)
    assert m["f1"] == pytest.approx(2 * (2 / 5) * (2 / 6) / (2 / 5 + 2 / 6))
    assert m["per_type"]["PER"] == {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}
    assert m["per_type"]["ORG"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_i_without_b_matches_a_gold_entity_with_the_same_span():
    counts = entity_counts([["O", "B-PER", "I-PER"]], [["O", "I-PER", "I-PER"]])
    assert counts == {"PER": [1, 0, 0]}


def test_entities_never_cross_sentences():
    counts = entity_counts([["O", "B-PER"], ["I-PER", "O"]], [["O", "B-PER"], ["O", "O"]])
    assert counts == {"PER": [1, 0, 1]}  # the I-PER of row 2 is an entity of its own


def test_nothing_predicted_or_nothing_to_find_scores_zero():
    m = entity_metrics(entity_counts([["B-PER"]], [["O"]]))
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)
    assert entity_metrics({})["f1"] == 0.0


@pytest.mark.parametrize(
    "tag, ok",
    [("O", True), ("B-PER", True), ("E-MISC", True), ("PER", False), ("B-", False), (3, False)],
)
def test_tag_format(tag, ok):
    assert (tag_problem(tag) is None) == ok


def random_tags(rng: random.Random, n: int) -> list[str]:
    """Well-formed and malformed sequences alike (stray I-, type changes, IOBES)."""
    pool = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-ORG", "B-ORG", "S-PER", "E-LOC"]
    return [rng.choice(pool) for _ in range(n)]


def test_matches_seqeval_default_mode():
    seqeval = pytest.importorskip("seqeval.metrics")
    from seqeval.metrics.sequence_labeling import get_entities as seqeval_entities

    rng = random.Random(0)
    gold = [random_tags(rng, rng.randrange(1, 12)) for _ in range(300)]
    pred = [random_tags(rng, len(g)) for g in gold]
    for g in gold:
        assert get_entities(g) == seqeval_entities(g)
    m = entity_metrics(entity_counts(gold, pred))
    assert m["precision"] == pytest.approx(seqeval.precision_score(gold, pred))
    assert m["recall"] == pytest.approx(seqeval.recall_score(gold, pred))
    assert m["f1"] == pytest.approx(seqeval.f1_score(gold, pred))
    report = seqeval.classification_report(gold, pred, output_dict=True)
    for t, s in m["per_type"].items():
        assert (
            s["f1"] == pytest.approx(report[t]["f1-score"]) and s["support"] == report[t]["support"]
        )
