"""A finished run (or an ensemble of runs) applied to new images: `mt predict`, streamed a chunk at a
time, with the round's fold models, TTA views and fitted decision. The work on the images (TTA views,
the folds' vote, an ensemble's members) is inference.py's, which training, distillation and export
run too. The file has the columns of a table task's `mt submit` file (outputs.prediction_table).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from multitask.context import build_task, check_ensemble_members, check_round, load_run_config
from multitask.decide import load_decision, predict_classes
from multitask.inference import DecodedImages, round_models, run_outputs
from multitask.outputs import CHUNK, list_images, stream_predictions
from multitask.run import RunDir, check_output_file


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
    models = {}  # each fold model is loaded once, for every chunk

    def read():
        check_round(run, r, cfg)
        if cfg.ensemble is None:  # the folds that vote, read with the decision fitted on their OOF
            models[("folds", str(run.root), r)] = round_models(run, r, cfg)
        return load_decision(run.round_dir(r))

    decision = run.read_settled(r, read)
    check_ensemble_members(cfg)  # once, not for every chunk run_outputs predicts
    ids, paths = list_images(source)
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
    note = None
    if decision is not None and decision.subjects > 0:
        note = (f"subjects are not read: each picture is predicted on its own, while `mt submit --run {run.root}` "
                f"reads what a person keeps from their clearest picture among the test images (weight "
                f"{decision.subjects:.2f}); on the run's own test images, its answers are the ones to submit")
    return result | {"round": r, "why": why, "note": note}
