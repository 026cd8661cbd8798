"""Evaluation metrics for the text tasks (GLUE's choices), in numpy so no sklearn is needed."""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats

METRICS: tuple[str, ...] = ("accuracy", "f1", "matthews", "pearson_spearman")


def primary_metric(metric: str) -> str:
    """The key of `compute_metrics`' result to select the best checkpoint on (higher is better)."""
    _check_metric(metric)
    return metric


def compute_metrics(metric: str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Score predictions against labels.

    Classification metrics take logits [N, C] (argmax) or predicted class ids [N]; "pearson_spearman" takes
    scores [N] or [N, 1]. F1 is the binary F1 of class 1 (GLUE's convention for MRPC and QQP).
    """
    _check_metric(metric)
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    if metric == "pearson_spearman":
        return _correlations(_scores(predictions, len(labels)), labels.astype(np.float64))

    predicted = _class_ids(predictions, len(labels))
    labels = labels.astype(np.int64)
    result = {"accuracy": float(np.mean(predicted == labels))}
    if metric == "f1":
        result["f1"] = binary_f1(predicted, labels)
    elif metric == "matthews":
        result["matthews"] = matthews_corrcoef(predicted, labels)
    return result


def binary_f1(predicted: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    """F1 of the positive class: 2·TP / (2·TP + FP + FN); 0 when there are no positives at all."""
    tp = int(np.sum((predicted == positive) & (labels == positive)))
    fp = int(np.sum((predicted == positive) & (labels != positive)))
    fn = int(np.sum((predicted != positive) & (labels == positive)))
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


def matthews_corrcoef(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation (multiclass form, Gorodkin 2004); 0 when either side is constant."""
    classes, index = np.unique(np.concatenate([labels, predicted]), return_inverse=True)
    k = len(classes)
    confusion = np.zeros((k, k), dtype=np.float64)
    np.add.at(confusion, (index[: len(labels)], index[len(labels):]), 1.0)
    true_counts, pred_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    n, correct = confusion.sum(), np.trace(confusion)
    covariance = correct * n - pred_counts @ true_counts
    variance = (n * n - pred_counts @ pred_counts) * (n * n - true_counts @ true_counts)
    return float(covariance / np.sqrt(variance)) if variance > 0 else 0.0


def _correlations(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    # A constant prediction (common early in training) has no defined correlation: score it 0, not NaN, so
    # comparisons for checkpoint selection stay meaningful.
    if len(scores) < 2 or np.ptp(scores) == 0 or np.ptp(labels) == 0:
        pearson = spearman = 0.0
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", stats.ConstantInputWarning)
            pearson = float(stats.pearsonr(scores, labels)[0])
            spearman = float(stats.spearmanr(scores, labels)[0])
    return {"pearson": pearson, "spearman": spearman, "pearson_spearman": (pearson + spearman) / 2}


def _class_ids(predictions: np.ndarray, n: int) -> np.ndarray:
    if predictions.ndim == 2 and predictions.shape[1] > 1:
        predicted = predictions.argmax(axis=1)
    elif predictions.ndim == 1 and (np.issubdtype(predictions.dtype, np.integer)
                                    or np.all(np.mod(predictions, 1) == 0)):
        predicted = predictions.astype(np.int64)
    else:
        raise ValueError(f"classification predictions must be logits [N, C>1] or class ids [N], "
                         f"got shape {predictions.shape} dtype {predictions.dtype}")
    if len(predicted) != n:
        raise ValueError(f"{len(predicted)} predictions for {n} labels")
    return predicted


def _scores(predictions: np.ndarray, n: int) -> np.ndarray:
    if predictions.ndim == 2 and predictions.shape[1] == 1:
        predictions = predictions[:, 0]
    if predictions.ndim != 1:
        raise ValueError(f"regression predictions must be [N] or [N, 1], got shape {predictions.shape}")
    if len(predictions) != n:
        raise ValueError(f"{len(predictions)} predictions for {n} labels")
    return predictions.astype(np.float64)


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
