"""Class balance: how often each training row is drawn, and per-class loss weights, from the fold's
own training rows (validation never weighs in).

Both use (frequency) ** -power: power 1 balances the classes fully, 0.5 (the default) halfway in log
terms, which keeps a rare class from being repeated so often that it is memorised.
"""
from __future__ import annotations

import numpy as np

from multitask.config import ConfigError
from multitask.labels import FLAT_HEAD, Head, Task


def class_of_rows(task: Task, heads: list[Head], factors: np.ndarray, by: str) -> tuple[np.ndarray, int]:
    """(class index of each row, number of classes) by the final class or by a head's class."""
    if by == FLAT_HEAD:
        return task.encode(factors), task.n_classes
    head = next((h for h in heads if h.name == by), None)
    if head is None:
        raise ConfigError(f"train.sampler {by!r} is neither 'none', {FLAT_HEAD!r} nor one of the heads "
                          f"{[h.name for h in heads]}")
    return head.targets(factors), head.n


def sample_weights(task: Task, heads: list[Head], factors: np.ndarray, by: str, power: float,
                   labelled: np.ndarray | None = None) -> np.ndarray:
    """A draw weight per training row (N,), summing to 1. Rows not `labelled` in every factor (partial
    pseudo labels) keep the mean weight."""
    labelled = np.ones(len(factors), bool) if labelled is None else labelled
    cls, n = class_of_rows(task, heads, np.where(labelled[:, None], factors, 0), by)
    counts = np.bincount(cls[labelled], minlength=n).astype(float)
    w = np.maximum(counts[cls], 1) ** -power
    w[~labelled] = w[labelled].mean() if labelled.any() else 1.0
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
