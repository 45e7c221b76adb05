"""Per-head losses and their weighted sum.

Every loss takes soft targets (N, K) (a hard label is a one-hot row), so batch-level MixUp/CutMix
(augment.BatchMixer) mixes every head's targets without touching this module.
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
    # 1 - p floored: with gamma < 1, (1 - p)^gamma has an infinite slope at p = 1, which a float32
    # softmax reaches on a confident row, and its 0 * inf made the gradient NaN
    return -(target * (-torch.expm1(logp)).clamp(min=1e-6).pow(gamma) * logp).sum(1).mean()


def soft_f1(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """1 − macro F1 over the batch, with probabilities in place of hard counts."""
    p = F.softmax(logits.float(), 1)
    tp = (p * target).sum(0)
    fp = (p * (1 - target)).sum(0)
    fn = ((1 - p) * target).sum(0)
    return 1 - (2 * tp / (2 * tp + fp + fn + eps)).mean()


def make_loss(cfg: LossCfg, class_weights: torch.Tensor | None = None) -> LossFn:
    """The head's loss; `class_weights` (n,) scale each class's term (ce, label_smoothing, focal)."""
    w = (lambda t: t * class_weights.to(t.device)) if class_weights is not None else (lambda t: t)  # noqa: E731
    if cfg.name == "ce":
        return lambda logits, t: cross_entropy(logits, w(t))
    if cfg.name == "label_smoothing":
        return lambda logits, t: cross_entropy(logits, w(smooth(t, cfg.smoothing)))
    if cfg.name == "focal":
        return lambda logits, t: focal(logits, w(t), cfg.gamma)
    if cfg.name == "soft_f1":
        if class_weights is not None:
            raise ValueError("soft_f1 already weighs every class alike; class_weights do not apply to it")
        return soft_f1
    raise ValueError(f"unknown loss {cfg.name!r}")


class MultiHeadLoss:
    """Σ_h w_h · L_h(logits_h, target_h); also returns each head's unweighted loss. `extra` adds
    outputs with their own loss function and weight (name -> (fn, weight)), e.g. auxiliary heads."""

    def __init__(self, cfgs: dict[str, LossCfg], extra: dict[str, tuple[LossFn, float]] | None = None,
                 class_weights: dict[str, torch.Tensor] | None = None, partial: bool = False):
        """`partial`: some rows lack some heads' labels (partial pseudo labels); only then are rows
        checked, since the check waits for the device every batch."""
        class_weights = class_weights or {}
        self.heads = set(cfgs) if partial else set()
        self.fns = {name: make_loss(c, class_weights.get(name)) for name, c in cfgs.items()}
        self.weights = {name: c.weight for name, c in cfgs.items()}
        for name, (fn, weight) in (extra or {}).items():
            self.fns[name], self.weights[name] = fn, weight

    def __call__(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]):
        parts = {}
        total = 0.0
        for name, fn in self.fns.items():
            logits, target = outputs[name], targets[name]
            if name in self.heads:
                # a row without this head's label (a partial pseudo label: -1, or an all-zero soft row)
                # adds nothing to it
                labelled = target >= 0 if target.ndim == 1 else target.sum(1) > 0
                if not labelled.all():
                    logits, target = logits[labelled], target[labelled]
            parts[name] = fn(logits, as_soft(target, logits.shape[1])) if len(target) else logits.sum() * 0
            total = total + self.weights[name] * parts[name]
        return total, parts
