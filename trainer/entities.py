"""Entity-level precision, recall and F1 over BIO (IOB2) / IOBES tag sequences.

An entity counts as found only when its type and both boundaries match. Entities are read
off a sequence with the rules of ``seqeval``'s default mode (conlleval's): an ``I-X`` that
follows ``O`` or another type starts an entity, a type change ends one, ``E-`` / ``S-``
close one. Written here (seqeval is not a dependency); ``tests/test_entities.py`` checks it
against hand-made cases and, where seqeval is installed, against seqeval itself.

Counts (true positives, false positives, false negatives per type) are integers, so the
sums of per-rank counts are exact: the metric over ranks equals the one-process metric.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

PREFIXES = ("B", "I", "E", "S")  # BIO / IOB2, and IOBES


def split_tag(tag: str) -> tuple[str, str]:
    """``"B-PER"`` → ``("B", "PER")``; ``"O"`` → ``("O", "")``."""
    if tag == "O":
        return "O", ""
    prefix, _, type_ = tag.partition("-")
    return prefix, type_


def tag_problem(tag: Any) -> str | None:
    """Why ``tag`` is not a BIO / IOBES tag (None when it is one)."""
    if not isinstance(tag, str):
        return f"tag {tag!r} is not a string"
    prefix, type_ = split_tag(tag)
    if tag != "O" and (prefix not in PREFIXES or not type_):
        return f"tag {tag!r} is not BIO / IOBES (expected O, or B-, I-, E-, S- and a type)"
    return None


def entity_types(tags: Iterable[str]) -> list[str]:
    return sorted({split_tag(t)[1] for t in tags if t != "O"})


def _ends(prev: str, tag: str, prev_type: str, type_: str) -> bool:
    return (
        prev in ("E", "S")
        or (prev in ("B", "I") and tag in ("B", "S", "O"))
        or (prev != "O" and prev_type != type_)
    )


def _starts(prev: str, tag: str, prev_type: str, type_: str) -> bool:
    return (
        tag in ("B", "S")
        or (prev in ("E", "S", "O") and tag in ("E", "I"))
        or (tag != "O" and prev_type != type_)
    )


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """``(type, first, last)`` of each entity of one sentence (word positions, inclusive)."""
    entities = []
    prev, prev_type, begin = "O", "", 0
    for i, t in enumerate([*tags, "O"]):
        tag, type_ = split_tag(t)
        if _ends(prev, tag, prev_type, type_):
            entities.append((prev_type, begin, i - 1))
        if _starts(prev, tag, prev_type, type_):
            begin = i
        prev, prev_type = tag, type_
    return entities


def entity_counts(
    gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]
) -> dict[str, list[int]]:
    """type → ``[tp, fp, fn]`` over sentences (each gold sentence with its prediction)."""
    counts: dict[str, list[int]] = {}
    for g, p in zip(gold, pred, strict=True):
        assert len(g) == len(p), "a prediction per word"
        true, found = set(get_entities(g)), set(get_entities(p))
        for e in true | found:
            c = counts.setdefault(e[0], [0, 0, 0])
            if e in true and e in found:
                c[0] += 1
            elif e in found:
                c[1] += 1
            else:
                c[2] += 1
    return counts


def scores(tp: int, fp: int, fn: int) -> dict[str, float | int]:
    """Precision, recall, F1 (0 where undefined, as seqeval reports) and support."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}


def entity_metrics(counts: dict[str, Sequence[int]]) -> dict[str, Any]:
    """Micro precision / recall / F1 over all types, and the same per type."""
    per_type = {t: scores(*counts[t]) for t in sorted(counts)}
    tp, fp, fn = (sum(int(c[i]) for c in counts.values()) for i in range(3))
    micro = scores(tp, fp, fn)
    return {
        "precision": micro["precision"],
        "recall": micro["recall"],
        "f1": micro["f1"],
        "num_entities": micro["support"],
        "num_predicted": tp + fp,
        "per_type": per_type,
    }


def entity_report(metrics: dict[str, Any]) -> str:
    """seqeval's classification_report layout, plus token accuracy."""
    lines = [f"{'type':>12} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"]
    rows = [
        *metrics["per_type"].items(),
        ("micro avg", {**metrics, "support": metrics["num_entities"]}),
    ]
    for name, m in rows:
        lines.append(
            f"{name:>12} {m['precision']:9.4f} {m['recall']:9.4f} {m['f1']:9.4f} {m['support']:8d}"
        )
    lines.append(
        f"{'token acc':>12} {'':>9} {'':>9} {metrics['token_accuracy']:9.4f} {metrics['num_words']:8d}"
    )
    return "\n".join(lines)
