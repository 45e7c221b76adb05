"""A finished run (or an ensemble of runs) applied to new images: `mt predict`, streamed a chunk at a
time, with the round's fold models, TTA views and fitted decision. The model-level work (TTA views,
the folds' vote) is inference.py's, which training's validation runs too; the file is written as
`mt submit` writes a table task's predictions (outputs.prediction_table).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from multitask.config import Config
from multitask.context import build_task, check_ensemble_members, check_round, load_run_config
from multitask.data.cache import decode_into
from multitask.data.dataset import RowImages
from multitask.decide import blend_only, load_decision, predict_classes
from multitask.device import resolve_device
from multitask.inference import load_model, predict_probs, vote
from multitask.labels import FLAT_HEAD, Head, Task
from multitask.outputs import CHUNK, list_images, stream_predictions
from multitask.run import RunDir, check_output_file, fold_checkpoint, read_json


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


def read_once(cfg: Config) -> Config:
    """Images decoded for one prediction are read once: a device copy of them (data.cache_on_device)
    would stay in the process-wide store of training's cache copies (dataset.device_copy), and
    memory would grow with every chunk of `mt predict`."""
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"cache_on_device": False})})


def run_outputs(run: RunDir, r: int, overrides: list[str], decoded: DecodedImages, keep: np.ndarray,
                progress=None, models: dict | None = None) -> dict[str, np.ndarray]:
    """Round r's voted outputs on the kept images; for an ensemble run, its members' final-class
    probabilities (each with its own auxiliary blend), weighted as `mt ensemble` fitted them."""
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
    return ensemble_probs(round_models(run, r, cfg), images, cfg, task, heads, resolve_device(cfg.train.device), progress,
                          models)


def predict_images(run_dir: str | Path, source: str | Path, out: str | Path, batch_size: int | None = None,
                   with_probs: bool = False, skip_bad: bool = False, progress=None, round: int | None = None,
                   chunk: int = CHUNK, device: str | None = None) -> dict:
    """`mt predict`: round `round` of the run, by default the one `submit` uses (its fold ensemble,
    TTA views and fitted decision) on any images, streamed `chunk` at a time into the predictions file
    (outputs.stream_predictions: bounded memory; undecodable images stop it, all listed, or with
    `skip_bad` are left out and listed in <out>.skipped.csv). `device`: where to predict, in place of
    the run's `train.device` (a run trained on a GPU, predicted on a machine without one)."""
    run = RunDir(run_dir)
    check_output_file(Path(out))  # before the work, not after it
    overrides = [f"train.eval_batch_size={batch_size}"] if batch_size else []
    overrides += [f"train.device={device}"] if device else []
    cfg = load_run_config(run, overrides)
    task, heads = build_task(cfg)
    r, why = run.choose_round(cfg.train.folds, round)
    check_round(run, r, cfg)
    check_ensemble_members(cfg)  # once, not for every chunk run_outputs predicts
    decision = load_decision(run.round_dir(r))
    ids, paths = list_images(source)
    models = {}  # each fold model is loaded once, for every chunk
    tid = progress.add_task("predicting images", total=len(paths)) if progress else None

    def decode(part: list[str]) -> tuple[DecodedImages, list[tuple[int, str]]]:
        decoded = DecodedImages(part, cfg.data.decode_workers)
        return decoded, decoded.bad(tuple(cfg.data.img_size))

    def predict(decoded: DecodedImages, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return predict_classes(task, heads, run_outputs(run, r, overrides, decoded, keep, progress, models), cfg,
                               decision)

    result = stream_predictions(task, ids, paths, out, chunk, decode, predict, with_probs, skip_bad,
                                advance=(lambda n: progress.update(tid, advance=n)) if progress else None)
    if progress:
        progress.remove_task(tid)
    return result | {"round": r, "why": why}
