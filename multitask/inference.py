"""A model's head probabilities over images, with TTA, and the vote of several models: what a fold's
validation, a round's aggregate and prediction on new images all run.

Soft voting (the default) averages each head's probabilities (over TTA views, then over folds) before
the heads are combined into the final class: averaging probabilities keeps each model's confidence,
which a hard majority vote (`decide.vote: hard`) throws away.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from multitask.config import Config
from multitask.data.augment import tta_view
from multitask.data.dataset import RowImages, eval_batches
from multitask.device import autocast, place_model, prepare_input
from multitask.labels import Head, Task
from multitask.model import MultiHeadNet, build_model
from multitask.numeric import aux_activation, aux_kind, aux_outputs, is_aux
from multitask.run import load_torch


@torch.no_grad()
def predict_probs(model: MultiHeadNet, images: RowImages, cfg: Config, device: torch.device,
                  views: list[str] | None = None) -> dict[str, np.ndarray]:
    """Softmax probabilities per head (N, n_h), averaged over the TTA views (and each auxiliary
    output's reading, see numeric.aux_activation). They stay on the device
    until the end: a copy to the host per batch would wait for the GPU every batch.

    With `train.compile` the forward is compiled too, and a short last batch is padded to the full
    one: every call then runs the one graph. Dynamo treats the weights as inputs, so every fold's
    model (and the EMA copy validated each epoch) reuses it. Unpadded, each new short size compiled
    again: a graph dynamic in the batch size came back narrowed to a range by the backend (on the
    CPU, 2 to 15 rows), so the next short batch outside it compiled another, inside the timed
    prediction of bench_throughput too."""
    views = list(cfg.aug.tta if views is None else views)
    was_training = model.training
    model.eval()
    forward = torch.compile(model) if cfg.train.compile else model
    probs = {name: torch.empty((len(images), head.out_features), device=device)
             for name, head in model.heads.items()}
    start = 0
    for x in eval_batches(images, cfg.train.eval_batch_size, device, cfg.data.cache_on_device):
        n = len(x)
        if cfg.train.compile and n < cfg.train.eval_batch_size:  # eval-mode layers see each image alone
            x = padded(x, cfg.train.eval_batch_size)
        for i, view in enumerate(views):
            with autocast(device, cfg.train.amp):
                out = forward(prepare_input(tta_view(x, view), cfg, device))
            for name, logits in out.items():
                logits = logits[:n]
                p = aux_activation(logits, aux_kind(cfg, name)) if is_aux(name) else logits.float().softmax(1)
                batch = probs[name][start:start + n]
                if i == 0:
                    batch.copy_(p)
                else:
                    batch.add_(p)
        for p in probs.values():
            p[start:start + n].div_(len(views))
        start += n
    model.train(was_training)
    return {name: p.cpu().numpy() for name, p in probs.items()}


def padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    """`x` with zero rows up to `rows`, in its own memory layout: the batches come channels-last from
    the NHWC caches, and a padded batch of another layout would compile a graph of its own."""
    out = x.new_empty_strided((rows, *x.shape[1:]), x.stride())
    out[:len(x)] = x
    out[len(x):] = 0
    return out


def soft_vote(prob_sets: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.mean([p[name] for p in prob_sets], axis=0) for name in prob_sets[0]}


HARD_TIE_BREAK = 1e-3  # the soft vote's share in a hard vote: it only decides ties


def vote(prob_sets: list[dict[str, np.ndarray]], kind: str = "soft") -> dict[str, np.ndarray]:
    """Combine the folds' outputs. soft: average each head's probabilities. hard: each fold votes its
    argmax per head (a fold torn between classes of equal probability votes for each, as the
    exported graph counts them); the vote shares (ties broken by the soft vote) stand in for
    probabilities. Auxiliary outputs are numbers, always averaged."""
    soft = soft_vote(prob_sets)
    if kind == "soft":
        return soft
    out = dict(soft)
    for name in soft:
        if is_aux(name):
            continue
        votes = np.mean([(p[name] == p[name].max(1, keepdims=True)).astype(np.float64) for p in prob_sets], axis=0)
        mixed = votes + HARD_TIE_BREAK * soft[name]
        out[name] = mixed / mixed.sum(1, keepdims=True)
    return out


def load_model(path: Path, cfg: Config, task: Task, heads: list[Head], device: torch.device) -> MultiHeadNet:
    """A fold's model from its checkpoint; the backbone is built without fetching pretrained weights,
    since the checkpoint already holds every weight."""
    model_cfg = cfg.model.model_copy(update={"pretrained": False, "checkpoint": None})
    model = build_model(model_cfg, heads, aux_outputs(task, cfg, heads))
    state = load_torch(path)
    model.load_state_dict(state["model"])
    return place_model(model, cfg, device).eval()
