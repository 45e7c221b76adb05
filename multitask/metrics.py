"""Macro F1 per head and combined, exactly as the competition's score.py counts it.

A class with no true positive scores 0, absent or not, and every class counts in the mean: a model
that never predicts a rare class pays for it.
"""
from __future__ import annotations

import numpy as np

from multitask.labels import Head, Task


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(np.asarray(y_true) * n + np.asarray(y_pred), minlength=n * n).reshape(n, n)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> float:
    cm = confusion(y_true, y_pred, n)
    tp = np.diag(cm).astype(float)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    denom = 2 * tp + fp + fn
    f1 = np.where(tp > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return float(f1.mean())


def score_probs(task: Task, heads: list[Head], probs: dict[str, np.ndarray], factors: np.ndarray) -> dict:
    """Macro F1 of each head's own argmax, of each factor read off the combined 18-class argmax, and
    the combined macro F1 (`f1`), from head probabilities and true factor values (N, F)."""
    out = {}
    for h in heads:
        out[f"f1_{h.name}"] = macro_f1(h.targets(factors), probs[h.name].argmax(1), h.n)
    combined = task.combine(heads, probs).argmax(1)
    decoded = task.decode(combined)
    for i, f in enumerate(task.factors):
        out[f"f1_{f.name}_combined"] = macro_f1(factors[:, i], decoded[:, i], f.n)
    out["f1"] = macro_f1(task.encode(factors), combined, task.n_classes)
    out["acc"] = float((task.encode(factors) == combined).mean())
    return out
