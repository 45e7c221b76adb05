"""Macro F1 per head and combined, exactly as the competition's score.py (scikit-learn's
`f1_score(average="macro")`) counts it.

The mean runs over the classes that occur in the truth or the prediction: a class the model never
predicts but that is there scores 0 and counts (a model that ignores a rare class pays for it); a
class absent from both is not averaged in, so a fold without some class is scored as the
competition would score it.
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
    present = denom > 0  # in the truth or the prediction
    if not present.any():
        return 0.0
    return float((2 * tp[present] / denom[present]).mean())


def score_probs(task: Task, heads: list[Head], probs: dict[str, np.ndarray], factors: np.ndarray) -> dict:
    """Macro F1 of each head's own argmax (`f1_<head>`), of each factor read off the final class's
    argmax (`f1_<factor>_combined`), and of the final class (`f1`), from head probabilities and true
    factor values (N, F). decide.scores_of, which reads every factor off given final classes, names
    those `f1_<factor>`."""
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


def heads_nll(heads: list[Head], probs: dict[str, np.ndarray], factors: np.ndarray) -> dict[str, float]:
    """Each head's mean negative log-likelihood of the true class (the validation loss, read from
    probabilities), and their sum (`total`)."""
    out = {}
    for h in heads:
        p = probs[h.name][np.arange(len(factors)), h.targets(factors)]
        out[h.name] = float(-np.log(np.clip(p, 1e-7, 1.0)).mean())
    out["total"] = float(sum(out.values()))
    return out
