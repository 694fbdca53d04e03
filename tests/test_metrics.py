from __future__ import annotations

import pytest

from trainer.tasks import classification_metrics, classification_report, lm_metrics


def test_classification_metrics_by_hand():
    preds = [0, 0, 1, 1, 2, 2]
    labels = [0, 1, 1, 1, 2, 0]
    m = classification_metrics(preds, labels, 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    pc = m["per_class"]
    assert pc["0"]["precision"] == pytest.approx(0.5) and pc["0"]["recall"] == pytest.approx(0.5)
    assert pc["1"]["precision"] == pytest.approx(1.0) and pc["1"]["recall"] == pytest.approx(2 / 3)
    assert pc["2"]["precision"] == pytest.approx(0.5) and pc["2"]["recall"] == pytest.approx(1.0)
    f1 = [0.5, 0.8, 2 / 3]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    report = classification_report(m)
    assert "accuracy" in report and "macro f1" in report


def test_lm_metrics():
    m = lm_metrics(loss_sum=20.0, tokens=10)
    assert m["loss"] == pytest.approx(2.0) and m["perplexity"] == pytest.approx(7.389056, rel=1e-5)
