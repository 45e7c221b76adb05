"""Class balance: how often each training row is drawn, and per-class loss weights, from the fold's
own training rows (validation never weighs in).

Both use (frequency) ** -power: power 1 balances the classes fully, 0.5 (the default) halfway in log
terms, which keeps a rare class from being repeated so often that it is memorised.
"""
from __future__ import annotations

import numpy as np

from multitask.config import ConfigError
from multitask.labels import FLAT_HEAD, Head, Task


def class_of_rows(task: Task, heads: list[Head], factors: np.ndarray, by: str) -> tuple[np.ndarray, int, np.ndarray]:
    """(class index of each row, number of classes, which rows hold the factors that class needs) by
    the final class or by a head's class. A partial pseudo label (-1 where a factor fell short of its
    confidence) has a head's class where that head's factors are known."""
    if by == FLAT_HEAD:
        idx = list(range(len(task.factors)))
    else:
        head = next((h for h in heads if h.name == by), None)
        if head is None:
            raise ConfigError(f"train.sampler {by!r} is neither 'none', {FLAT_HEAD!r} nor one of the heads "
                              f"{[h.name for h in heads]}")
        idx = list(head.factor_idx)
    known = (factors[:, idx] >= 0).all(1)
    safe = np.where(known[:, None], factors, 0)
    return (task.encode(safe), task.n_classes, known) if by == FLAT_HEAD else (head.targets(safe), head.n, known)


def sample_weights(task: Task, heads: list[Head], factors: np.ndarray, by: str, power: float) -> np.ndarray:
    """A draw weight per training row (N,), summing to 1. Rows without the chosen class (a partial
    pseudo label unknown in one of its factors) keep the mean weight and count for no class."""
    cls, n, known = class_of_rows(task, heads, factors, by)
    counts = np.bincount(cls[known], minlength=n).astype(float)
    w = np.maximum(counts[cls], 1) ** -power
    w[~known] = w[known].mean() if known.any() else 1.0
    return w / w.sum()


def class_weights(counts: np.ndarray, power: float) -> np.ndarray:
    """Loss weight per class, mean 1 over the classes present; an absent class gets the largest weight
    of a present one (it has nothing to weigh in training, but the vector must be whole)."""
    counts = np.asarray(counts, float)
    present = counts > 0
    w = np.zeros_like(counts)
    w[present] = (counts[present].mean() / counts[present]) ** power
    w[~present] = w[present].max() if present.any() else 1.0
    return w / w[present].mean() if present.any() else w
