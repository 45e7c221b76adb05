"""Per-head losses and their weighted sum.

Every loss takes soft targets (N, K) (a hard label is a one-hot row), so batch-level MixUp/CutMix can
later mix every head's targets without touching this module.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from multitask.config import LossCfg

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def as_soft(target: torch.Tensor, n_classes: int) -> torch.Tensor:
    if target.ndim == 2:
        return target.float()
    return F.one_hot(target.long(), n_classes).float()


def smooth(target: torch.Tensor, eps: float) -> torch.Tensor:
    return target * (1 - eps) + eps / target.shape[1]


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * F.log_softmax(logits.float(), 1)).sum(1).mean()


def focal(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """Cross-entropy with each class term scaled by (1 - p)^gamma: easy examples weigh less."""
    logp = F.log_softmax(logits.float(), 1)
    return -(target * (1 - logp.exp()).pow(gamma) * logp).sum(1).mean()


def soft_f1(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """1 − macro F1 over the batch, with probabilities in place of hard counts."""
    p = F.softmax(logits.float(), 1)
    tp = (p * target).sum(0)
    fp = (p * (1 - target)).sum(0)
    fn = ((1 - p) * target).sum(0)
    return 1 - (2 * tp / (2 * tp + fp + fn + eps)).mean()


def make_loss(cfg: LossCfg) -> LossFn:
    if cfg.name == "ce":
        return cross_entropy
    if cfg.name == "label_smoothing":
        return lambda logits, t: cross_entropy(logits, smooth(t, cfg.smoothing))
    if cfg.name == "focal":
        return lambda logits, t: focal(logits, t, cfg.gamma)
    if cfg.name == "soft_f1":
        return soft_f1
    raise ValueError(f"unknown loss {cfg.name!r}")


class MultiHeadLoss:
    """Σ_h w_h · L_h(logits_h, target_h); also returns each head's unweighted loss. `extra` adds
    outputs with their own loss function and weight (name -> (fn, weight)), e.g. auxiliary heads."""

    def __init__(self, cfgs: dict[str, LossCfg], extra: dict[str, tuple[LossFn, float]] | None = None):
        self.fns = {name: make_loss(c) for name, c in cfgs.items()}
        self.weights = {name: c.weight for name, c in cfgs.items()}
        for name, (fn, weight) in (extra or {}).items():
            self.fns[name], self.weights[name] = fn, weight

    def __call__(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]):
        parts = {}
        total = 0.0
        for name, fn in self.fns.items():
            logits = outputs[name]
            parts[name] = fn(logits, as_soft(targets[name], logits.shape[1]))
            total = total + self.weights[name] * parts[name]
        return total, parts
