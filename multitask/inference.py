"""A model's head probabilities over images, with TTA, and the vote of several models: what a fold's
validation, a round's aggregate and prediction on new images all run; and a finished round's (or an
ensemble's) outputs on decoded images, which `mt predict`, `mt distill` and `mt export` read.

Soft voting (the default) averages each head's probabilities (over TTA views, then over folds) before
the heads are combined into the final class: averaging probabilities keeps each model's confidence,
which a hard majority vote (`decide.vote: hard`) throws away.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from multitask.config import Config
from multitask.context import build_task, load_run_config
from multitask.data.augment import tta_view
from multitask.data.cache import decode_into, undecodable_error
from multitask.data.dataset import RowImages, eval_batches
from multitask.decide import blend_only, load_decision, predict_classes
from multitask.device import autocast, compiled, place_model, prepare_input, resolve_device
from multitask.labels import FLAT_HEAD, Head, Task
from multitask.model import MultiHeadNet, build_model
from multitask.numeric import aux_activation, aux_kind, aux_outputs, is_aux
from multitask.run import RunDir, fold_checkpoint, load_torch, read_json


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
    forward = compiled(model, cfg)
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


def round_models(run: RunDir, r: int, cfg: Config) -> list[Path]:
    """The checkpoint that made the predictions of every fold the round's aggregate voted over."""
    done = read_json(run.round_dir(r) / "summary.json")["folds_done"]
    return [run.fold_dir(r, k) / fold_checkpoint(cfg) for k in done]


def ensemble_probs(checkpoints: list[Path], images: RowImages, cfg: Config, task: Task, heads: list[Head],
                   device: torch.device, progress=None, models: dict | None = None) -> dict[str, np.ndarray]:
    """Every fold model with the run's TTA views, voted (`decide.vote`): what the round's test_probs.npz holds.
    `models` keeps the loaded models across calls (prediction in chunks loads each fold once)."""
    tid = progress.add_task("predicting", total=len(checkpoints)) if progress else None
    sets = []
    for path in checkpoints:
        model = models.get(path) if models is not None else None
        if model is None:
            model = load_model(path, cfg, task, heads, device)
            if models is not None:
                models[path] = model
        sets.append(predict_probs(model, images, cfg, device))
        if progress:
            progress.update(tid, advance=1)
    if progress:
        progress.remove_task(tid)
    return vote(sets, cfg.decide.vote)


class DecodedImages:
    """The images decoded once per size (the runs of an ensemble may differ in size)."""

    def __init__(self, paths: list[str], workers: int):
        self.paths, self.workers, self.arrays, self.failed = paths, workers, {}, {}

    def at(self, size: tuple[int, int]) -> np.ndarray:
        if size not in self.arrays:
            self.arrays[size] = np.empty((len(self.paths), *size, 3), dtype=np.uint8)
            self.failed[size] = decode_into(self.arrays[size], self.paths, size, self.workers)
        return self.arrays[size]

    def bad(self, size: tuple[int, int]) -> list[tuple[int, str]]:
        self.at(size)
        return self.failed[size]

    def whole(self, size: tuple[int, int]) -> np.ndarray:
        """`at(size)`, refusing it where a picture failed: its pixels would be whatever memory held."""
        if self.bad(size):
            raise undecodable_error(self.paths, self.failed[size])
        return self.arrays[size]


def read_once(cfg: Config) -> Config:
    """Images decoded for one prediction are read once: a whole device copy of each chunk of `mt
    predict` (data.cache_on_device, dataset.device_copy) would cost more than sending its batches."""
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"cache_on_device": False})})


def run_outputs(run: RunDir, r: int, overrides: list[str], decoded: DecodedImages, keep: np.ndarray,
                progress=None, models: dict | None = None) -> dict[str, np.ndarray]:
    """Round r's voted outputs on the kept images; for an ensemble run, its members' final-class
    probabilities (each with its own auxiliary blend), weighted as `mt ensemble` fitted them.
    `models`, kept across the chunks of one prediction: the fold models loaded, and each round's
    fold set as first read."""
    cfg = read_once(load_run_config(run, overrides))
    task, heads = build_task(cfg)
    if cfg.ensemble is not None:
        total = 0
        for member, mr, w in zip(cfg.ensemble.runs, cfg.ensemble.rounds, cfg.ensemble.weights):
            m_run = RunDir(member)
            m_cfg = load_run_config(m_run, overrides)
            m_task, m_heads = build_task(m_cfg)
            m_probs = run_outputs(m_run, mr, overrides, decoded, keep, progress, models)
            total = total + w * predict_classes(m_task, m_heads, m_probs, m_cfg,
                                                blend_only(load_decision(m_run.round_dir(mr))))[0]
        return {FLAT_HEAD: total}
    images = RowImages.of(decoded.at(tuple(cfg.data.img_size)), keep)  # rows of the decoded array, not a copy
    # the round's folds as the first chunk found them: a fold another shell finishes meanwhile would
    # vote the later chunks only, under a decision and a "which folds" said at the start
    checkpoints = (models.setdefault(("folds", str(run.root), r), round_models(run, r, cfg)) if models is not None
                   else round_models(run, r, cfg))
    return ensemble_probs(checkpoints, images, cfg, task, heads, resolve_device(cfg.train.device), progress, models)
