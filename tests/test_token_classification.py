"""Token classification (NER): CoNLL and JSON rows, the label set and its errors before any
rank starts, sub-word alignment, words cut by max_length counted as missed, the evaluation
summed exactly over ranks, and a 2-rank run of the real Trainer that learns."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from multirank import run_distributed

from trainer.config import ConfigError, load_config
from trainer.data import check_splits, load_raw_splits, read_conll, tokenize_splits
from trainer.entities import entity_counts, entity_metrics
from trainer.models import build_tokenizer
from trainer.tasks import (
    IGNORE_INDEX,
    LabelInfo,
    TokenClassificationEvaluation,
    WordCollator,
    build_task,
)

from conftest import ROOT, read_jsonl

NER = ["task=token_classification"]
NAMES = ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"]

CONLL = """-DOCSTART- -X- -X- O

John NNP B-NP B-PER
Smith NNP I-NP I-PER
lives VBZ B-VP O
in IN B-PP O
Paris NNP B-NP B-LOC


-DOCSTART- -X- -X- O
Anna\tNNP\tB-NP\tB-PER
left\tVBD\tB-VP\tO
"""


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_conll_reader_skips_docstart_and_blank_lines_and_takes_the_last_column(tmp_path):
    p = tmp_path / "train.conll"
    p.write_text(CONLL)  # no blank line after the last sentence
    ds = read_conll(p, "tokens", "tags", "train")
    assert ds["tokens"] == [["John", "Smith", "lives", "in", "Paris"], ["Anna", "left"]]
    assert ds["tags"] == [["B-PER", "I-PER", "O", "O", "B-LOC"], ["B-PER", "O"]]


def test_conll_line_without_a_tag_is_named(tmp_path):
    p = tmp_path / "bad.iob"
    p.write_text("John B-PER\nlives\n")
    with pytest.raises(ConfigError, match=r"bad.iob' line 2: 'lives' has one column"):
        read_conll(p, "tokens", "tags", "train")


def test_conll_files_load_as_splits_and_give_a_sorted_label_set(tmp_path):
    train = tmp_path / "train.bio"
    train.write_text(CONLL * 3)
    valid = tmp_path / "dev.conll"
    valid.write_text("Anna B-PER\nleft O\n")
    c = load_config(None, [*NER, f"data.train={train}", f"data.validation={valid}"])
    splits = load_raw_splits(c)
    assert len(splits["train"]) == 6 and splits["validation"]["tokens"] == [["Anna", "left"]]
    info = check_splits(c, splits)
    assert info == LabelInfo(4, ["B-LOC", "B-PER", "I-PER", "O"])
    head = build_task(c).head_config(info)
    assert head["id2label"] == {0: "B-LOC", 1: "B-PER", 2: "I-PER", 3: "O"}
    assert head["label2id"]["O"] == 3


def test_bad_rows_and_unknown_tags_are_named_with_split_row_and_value(tmp_path):
    good = {"tokens": ["anna", "left", "paris"], "tags": ["B-PER", "O", "B-LOC"]}
    train = write_jsonl(
        tmp_path / "train.jsonl",
        [
            good,
            {"tokens": ["anna", "left"], "tags": ["B-PER", "O", "O"]},  # row 2: lengths
            {"tokens": "anna left", "tags": ["B-PER", "O"]},  # row 3: not a list
            {"tokens": ["anna"], "tags": ["PER"]},  # row 4: not BIO
        ]
        + [good] * 4,
    )
    valid = write_jsonl(
        tmp_path / "dev.jsonl",
        [good, {"tokens": ["ibm", "hired", "anna"], "tags": ["B-ORG", "O", "B-PER"]}],
    )
    c = load_config(None, [*NER, f"data.train={train}", f"data.validation={valid}"])
    with pytest.raises(ConfigError) as e:
        load_raw_splits(c)
    msg = str(e.value)
    assert "data.train row 2: 2 words in 'tokens' but 3 tags in 'tags'" in msg
    assert "data.train row 3: 'tokens' holds 'anna left' (str), expected a list of words" in msg
    assert "data.train row 4: 'tags': tag 'PER' is not BIO / IOBES" in msg
    assert len(e.value.problems) == 3

    write_jsonl(train, [good] * 8)  # rows fixed: now the unknown validation tag
    with pytest.raises(ConfigError) as e:
        check_splits(c, load_raw_splits(c))
    assert str(e.value) == (
        "data.validation row 2: tag 'B-ORG' in 'tags' does not occur in the training data "
        "(its tags: ['B-LOC', 'B-PER', 'O'])"
    )


def test_preflight_reports_an_unknown_test_tag_before_any_rank_starts(tmp_path):
    from launcher.preflight import check

    good = {"tokens": ["anna", "left", "paris"], "tags": ["B-PER", "O", "B-LOC"]}
    train = write_jsonl(tmp_path / "train.jsonl", [good] * 40)
    test = write_jsonl(
        tmp_path / "test.jsonl", [good, good, {**good, "tags": ["B-PER", "O", "B-GPE"]}]
    )
    pre = check(None, [*NER, f"data.train={train}", f"data.test={test}"], nproc=2)
    assert any("data.test row 3: tag 'B-GPE'" in p for p in pre.problems), pre.problems


def test_class_id_tags_of_hub_style_datasets_are_read_as_names(tmp_path):
    import datasets

    features = datasets.Features(
        {
            "tokens": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-PER", "I-PER"])),
        }
    )
    rows = {"tokens": [["anna", "smith", "left"]] * 20, "ner_tags": [[1, 2, 0]] * 20}
    path = tmp_path / "train.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    c = load_config(None, [*NER, f"data.train={path}", "data.tags_column=ner_tags"])
    splits = load_raw_splits(c)
    assert splits["train"]["ner_tags"][0] == ["B-PER", "I-PER", "O"]
    assert check_splits(c, splits).names == ["B-PER", "I-PER", "O"]


def tiny_setup(max_length: int = 128):
    """The builtin word tokenizer over the builtin NER vocabulary."""
    c = load_config(None, [*NER, "data.train=builtin:ner", f"data.max_length={max_length}"])
    task = build_task(c)
    return c, task, build_tokenizer(c, task)


def test_first_subtoken_carries_the_word_tag_and_evaluation_rows_keep_every_word():
    import datasets

    c, task, tok = tiny_setup()
    words = ["anna", "visited", "new york"]  # "new york": one word, two sub-tokens
    raw = {
        split: datasets.Dataset.from_dict({"tokens": [words], "tags": [["B-PER", "O", "B-LOC"]]})
        for split in ("train", "validation")
    }
    out = tokenize_splits(c, raw, tok, LabelInfo(len(NAMES), NAMES))
    row = out["validation"][0]
    assert len(row["input_ids"]) == 6  # [CLS] anna visited new york [SEP]
    assert row["labels"] == [IGNORE_INDEX, 1, 4, 0, IGNORE_INDEX, IGNORE_INDEX]
    assert row["word_ids"] == [IGNORE_INDEX, 0, 1, 2, IGNORE_INDEX, IGNORE_INDEX]
    assert row["word_labels"] == [1, 4, 0]
    assert set(out["train"].column_names) == {"input_ids", "attention_mask", "labels"}


def tagged(text: str) -> tuple[list[str], list[str]]:
    """``"anna/B-PER left/O"`` → (words, tags)."""
    pairs = [w.split("/") for w in text.split()]
    return [w for w, _ in pairs], [t for _, t in pairs]


def perfect_logits(batch: dict[str, torch.Tensor], num_labels: int) -> torch.Tensor:
    """Logits that predict every labelled position's gold tag."""
    y = batch["labels"].clamp(min=0)
    return torch.nn.functional.one_hot(y, num_labels).float() * 10


def test_words_cut_by_max_length_count_as_missed_entities():
    import datasets

    c, task, tok = tiny_setup(max_length=10)  # [CLS] + 8 words + [SEP]
    rows = [
        tagged(
            "yesterday/O anna/B-PER smith/I-PER met/O mr/B-PER chen/I-PER in/O buenos/B-LOC aires/I-LOC"
        ),
        tagged("it/O rained/O all/O day/O in/O paris/B-LOC and/O then/O in/O lima/B-LOC"),
    ]  # the first is cut inside an entity, the second before one
    rows = {"tokens": [w for w, _ in rows], "tags": [t for _, t in rows]}
    raw = {"validation": datasets.Dataset.from_dict(rows)}
    labels = LabelInfo(len(NAMES), NAMES)
    out = tokenize_splits(c, raw, tok, labels)["validation"]
    assert [len(r["input_ids"]) for r in out] == [10, 10]
    assert [len(r["word_labels"]) for r in out] == [9, 10]  # every word kept for the metric
    batch = task.collate(tok.pad_token_id)(list(out))
    ev = TokenClassificationEvaluation(torch.device("cpu"), labels)
    ev.update(perfect_logits(batch, len(NAMES)), batch, torch.tensor([True, True]))
    m = ev.compute().metrics
    # found: anna smith, mr chen, paris; "buenos" alone is a wrong boundary; lima never seen
    assert m["num_entities"] == 5 and m["num_predicted"] == 4 and m["num_words"] == 19
    assert m["recall"] == pytest.approx(3 / 5) and m["precision"] == pytest.approx(3 / 4)
    assert m["token_accuracy"] == pytest.approx(17 / 19)  # aires and lima predicted O


def synthetic_batches(
    seed: int, n_batches: int = 6
) -> list[tuple[dict, torch.Tensor, torch.Tensor]]:
    """Batches of random rows (some words cut off) with random logits and placeholder rows."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        rows = []
        for _ in range(4):
            n_words = int(torch.randint(1, 9, (1,), generator=g))
            seen = min(n_words, int(torch.randint(1, 9, (1,), generator=g)))
            word_ids = [IGNORE_INDEX] + [w for i in range(seen) for w in (i, IGNORE_INDEX)]
            gold = torch.randint(0, len(NAMES), (n_words,), generator=g).tolist()
            labels = [gold[w] if w != IGNORE_INDEX else IGNORE_INDEX for w in word_ids]
            rows.append(
                {
                    "input_ids": [1] * len(word_ids),
                    "attention_mask": [1] * len(word_ids),
                    "labels": labels,
                    "word_ids": word_ids,
                    "word_labels": gold,
                }
            )
        batch = WordCollator(0, pad_labels=True)(rows)
        logits = torch.randn(*batch["labels"].shape, len(NAMES), generator=g)
        valid = torch.tensor([True, True, True, bool(torch.rand(1, generator=g) < 0.5)])
        out.append((batch, logits, valid))
    return out


def _evaluate_shard(batches) -> dict:
    ev = TokenClassificationEvaluation(torch.device("cpu"), LabelInfo(len(NAMES), NAMES))
    for batch, logits, valid in batches:
        ev.update(logits, batch, valid)
    return ev.compute().report


def _evaluate_on_ranks(all_batches) -> dict:
    from trainer.distributed import get_rank, get_world_size

    return _evaluate_shard(all_batches[get_rank() :: get_world_size()])


def test_two_ranks_sum_to_exactly_the_one_process_metric():
    batches = synthetic_batches(seed=3)
    one = _evaluate_shard(batches)
    assert one["num_entities"] > 20 and 0 < one["f1"] < 1  # a non-trivial case
    ranks = run_distributed(_evaluate_on_ranks, 2, batches, timeout=60)
    assert ranks[0] == ranks[1]
    loss = ranks[0].pop("loss")
    assert loss == pytest.approx(one.pop("loss"), rel=1e-12)
    assert ranks[0] == one  # counts, micro and per-type figures: identical floats
    # and the same figures as the sequences they came from, read in one piece
    ev = TokenClassificationEvaluation(torch.device("cpu"), LabelInfo(len(NAMES), NAMES))
    for batch, logits, valid in batches:
        ev.update(logits, batch, valid)
    gold, pred = ev.tag_sequences()
    assert entity_metrics(entity_counts(gold, pred))["f1"] == one["f1"]


# --------------------------------------------------------------------------------------
# The real Trainer on 2 in-process ranks
# --------------------------------------------------------------------------------------


def _train(run_dir: str, cache: str) -> int:
    from trainer.env import detect_env
    from trainer.loop import Trainer
    from trainer.process import quiet_libraries

    quiet_libraries()
    sets = [
        f"data.cache_dir={cache}",
        "data.builtin_size=2000",
        "data.test=null",
        "train.max_steps=30",
        "eval.every_steps=3",
        "checkpoint.every_steps=30",
        "logging.tensorboard=false",
        "logging.progress_bar=false",
    ]
    cfg = load_config(ROOT / "configs" / "ner-tiny.yaml", sets)
    env = detect_env(os.environ)
    return int(Trainer(cfg, env, torch.device("cpu"), Path(run_dir)).run())


def test_two_ranks_learn_to_tag_entities_and_report_per_type(tmp_path):
    import datasets  # noqa: F401  (imported before the ranks fork)
    import transformers.models.bert.modeling_bert  # noqa: F401

    import trainer.loop  # noqa: F401

    d = tmp_path / "ner"
    assert run_distributed(_train, 2, str(d), str(tmp_path / "cache"), timeout=300) == [0, 0]
    evals = [x for x in read_jsonl(d / "metrics.jsonl") if x["kind"] == "eval"]
    first, last = evals[0], evals[-1]
    assert first["step"] == 3 and last["step"] == 30
    assert first["f1"] < 0.3 and last["f1"] > 0.8, [round(x["f1"], 3) for x in evals]
    r = json.loads((d / "results.json").read_text())
    assert r["best"]["metric"] == "f1" and r["validation"]["f1"] == last["f1"]
    per_type = r["validation_per_type"]
    assert set(per_type) == {"LOC", "ORG", "PER"}
    assert sum(t["support"] for t in per_type.values()) == r["validation"]["num_entities"]
    assert (d / "entity_report.txt").read_text().startswith(r["entity_report"])
    from transformers import AutoConfig

    exported = AutoConfig.from_pretrained(d / "final")
    assert exported.architectures == ["BertForTokenClassification"]
    assert exported.id2label[0] == "B-LOC" and exported.label2id["O"] == 6


@pytest.mark.slow
def test_ner_config_through_the_cli_and_the_exported_model_tags_words(tmp_path, cache_dir):
    """`zerotune train configs/ner-tiny.yaml` as the README shows it; final/ is a plain
    AutoModelForTokenClassification whose id2label turns its outputs into tags."""
    from conftest import check_ok, results, zerotune

    d = tmp_path / "ner"
    check_ok(
        zerotune(["train", str(ROOT / "configs" / "ner-tiny.yaml"), "--run-dir", str(d)], cache_dir)
    )
    r = results(d)
    assert r["world_size"] == 2 and r["validation"]["f1"] > 0.95, r["validation"]
    assert r["test"]["f1"] > 0.95 and set(r["test_per_type"]) == {"LOC", "ORG", "PER"}
    assert (d / "entity_report_test.txt").is_file()
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    model = AutoModelForTokenClassification.from_pretrained(d / "final").eval()
    tok = AutoTokenizer.from_pretrained(d / "final")
    words, tags = tagged(
        "anna/B-PER smith/I-PER moved/O to/O new/B-LOC york/I-LOC last/O year/O ./O"
    )
    enc = tok([words], is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        ids = model(**enc).logits.argmax(-1)[0].tolist()
    firsts = [i for i, w in enumerate(enc.word_ids(0)) if w is not None]
    assert [model.config.id2label[ids[i]] for i in firsts] == tags
