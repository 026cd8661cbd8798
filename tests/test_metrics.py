"""Metrics against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from metadistil_scale.metrics import binary_f1, compute_metrics, matthews_corrcoef, primary_metric

# Binary case: TP=3 (rows 0, 2, 6), FN=1 (row 1), FP=1 (row 3), TN=3 (rows 4, 5, 7).
LABELS = np.array([1, 1, 1, 0, 0, 0, 1, 0])
PREDICTED = np.array([1, 0, 1, 1, 0, 0, 1, 0])


def logits_for(predicted: np.ndarray, num_classes: int = 2) -> np.ndarray:
    logits = np.random.default_rng(0).normal(size=(len(predicted), num_classes))
    logits[np.arange(len(predicted)), predicted] = 10.0
    return logits


def test_accuracy_from_logits() -> None:
    assert compute_metrics("accuracy", logits_for(PREDICTED), LABELS) == {"accuracy": 0.75}


def test_f1_by_hand() -> None:
    # F1 = 2·TP / (2·TP + FP + FN) = 6 / 8
    result = compute_metrics("f1", logits_for(PREDICTED), LABELS)
    assert result == {"f1": pytest.approx(0.75), "accuracy": 0.75}
    # precision 1/3, recall 1/1 -> F1 = 2·(1/3)/(4/3) = 0.5
    assert binary_f1(np.array([1, 1, 1, 0]), np.array([1, 0, 0, 0])) == pytest.approx(0.5)
    assert binary_f1(np.zeros(4, dtype=int), np.zeros(4, dtype=int)) == 0.0  # no positives anywhere


def test_matthews_binary_by_hand() -> None:
    # (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (9 − 1) / sqrt(4·4·4·4) = 0.5
    result = compute_metrics("matthews", logits_for(PREDICTED), LABELS)
    assert result == {"matthews": pytest.approx(0.5), "accuracy": 0.75}
    assert matthews_corrcoef(LABELS, LABELS) == pytest.approx(1.0)
    assert matthews_corrcoef(1 - LABELS, LABELS) == pytest.approx(-1.0)
    assert matthews_corrcoef(np.ones(8, dtype=int), LABELS) == 0.0  # constant prediction


def test_matthews_multiclass_by_hand() -> None:
    # Confusion (true x pred): [[2,0,0],[1,0,1],[0,1,1]]; c=3, s=6, t=(2,2,2), p=(3,1,2)
    # (c·s − p·t) / sqrt((s² − p·p)(s² − t·t)) = (18 − 12) / sqrt(22·24)
    labels = np.array([0, 1, 2, 0, 1, 2])
    predicted = np.array([0, 2, 1, 0, 0, 2])
    assert matthews_corrcoef(predicted, labels) == pytest.approx(6 / math.sqrt(22 * 24))


def test_class_ids_accepted_directly() -> None:
    assert compute_metrics("f1", PREDICTED, LABELS)["f1"] == pytest.approx(0.75)


def test_pearson_spearman_by_hand() -> None:
    # Deviations (−1.5, −.5, .5, 1.5) vs (−1.5, .5, −.5, 1.5): covariance 4, variances 5 and 5 -> 0.8;
    # the values are their own ranks, so Spearman is 0.8 too.
    result = compute_metrics("pearson_spearman", np.array([[1.0], [2.0], [3.0], [4.0]]), np.array([1, 3, 2, 4]))
    assert result == {"pearson": pytest.approx(0.8), "spearman": pytest.approx(0.8),
                      "pearson_spearman": pytest.approx(0.8)}
    # Monotone but not linear: Spearman 1, Pearson below 1, the key is their mean.
    result = compute_metrics("pearson_spearman", np.array([1.0, 2.0, 3.0, 10.0]), np.array([1.0, 2.0, 3.0, 4.0]))
    assert result["spearman"] == pytest.approx(1.0)
    assert result["pearson"] < 0.99
    assert result["pearson_spearman"] == pytest.approx((result["pearson"] + 1.0) / 2)


def test_constant_regression_prediction_scores_zero() -> None:
    result = compute_metrics("pearson_spearman", np.full(4, 2.5), np.array([1.0, 2.0, 3.0, 4.0]))
    assert result == {"pearson": 0.0, "spearman": 0.0, "pearson_spearman": 0.0}


def test_primary_metric_is_a_returned_key() -> None:
    inputs = {"pearson_spearman": (np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0]))}
    for metric in ("accuracy", "f1", "matthews", "pearson_spearman"):
        predictions, labels = inputs.get(metric, (logits_for(PREDICTED), LABELS))
        assert primary_metric(metric) == metric
        assert primary_metric(metric) in compute_metrics(metric, predictions, labels)
    with pytest.raises(ValueError, match="unknown metric"):
        primary_metric("loss")


@pytest.mark.parametrize(("metric", "predictions", "labels", "match"), [
    ("bleu", np.zeros((2, 2)), np.zeros(2), "unknown metric"),
    ("accuracy", np.zeros((3, 2)), np.zeros(2), "3 predictions for 2 labels"),
    ("accuracy", np.array([0.2, 0.7]), np.zeros(2), "logits"),
    ("pearson_spearman", np.zeros((2, 3)), np.zeros(2), r"\[N\] or \[N, 1\]"),
    ("accuracy", np.zeros((0, 2)), np.zeros(0), "non-empty"),
])
def test_bad_inputs(metric: str, predictions: np.ndarray, labels: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compute_metrics(metric, predictions, labels)
