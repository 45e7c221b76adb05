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


def score_classes(task: Task, classes: np.ndarray, factors: np.ndarray) -> dict:
    """Macro F1 of given final classes (`f1`) and of each factor read off them (`f1_<factor>`), against
    true factor values (N, F)."""
    decoded = task.decode(classes)
    out = {"f1": macro_f1(task.encode(factors), classes, task.n_classes)}
    for i, f in enumerate(task.factors):
        out[f"f1_{f.name}"] = macro_f1(factors[:, i], decoded[:, i], f.n)
    return out


def score_probs(task: Task, heads: list[Head], probs: dict[str, np.ndarray], factors: np.ndarray) -> dict:
    """Macro F1 of each head's own argmax (`f1_<head>`), of each factor read off the final class's
    argmax (`f1_<factor>_combined`: a head may share a factor's name), of the final class (`f1`), and
    its accuracy, from head probabilities and true factor values (N, F)."""
    out = {f"f1_{h.name}": macro_f1(h.targets(factors), probs[h.name].argmax(1), h.n) for h in heads}
    combined = task.combine(heads, probs).argmax(1)
    final = score_classes(task, combined, factors)
    out |= {f"f1_{f.name}_combined": final[f"f1_{f.name}"] for f in task.factors}
    out["f1"] = final["f1"]
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
