"""Pseudo-labelling rounds, honest and per factor.

Honest: fold k of round r trains on test images labelled by fold k's own model of round r-1, which
never saw fold k's groups (it validated on them). A vote of all folds would not do: four of five
trained on fold k's groups, so a test image that resembles (or copies) one of them would carry its
true label into the model that is scored on it, and round r's OOF would flatter.

Per factor: each factor gets its own confidence threshold, the lowest at which the previous round's
OOF predictions of that factor reach `pseudo.precision`. A test image joins with the factors that
clear their threshold; the others stay unknown (-1) and its rows add nothing to the heads that need
them. One threshold on the final class selects almost nothing where one factor (age) stays uncertain.
Pseudo images only ever train: never a validation fold, so OOF scores stay honest.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from multitask import dist
from multitask.config import ConfigError
from multitask.context import check_round, every_fold
from multitask.decide import blend_only, load_decision, predict_classes
from multitask.kfold import check_identities, refuse_ensemble, reopen_context, train_round
from multitask.run import SOFT_FILE, RunDir, atomic_write_text, head_probs, load_npz, read_json, save_npz, write_json

UNKNOWN = -1


def precision_threshold(conf: np.ndarray, correct: np.ndarray, target: float) -> float:
    """The lowest confidence t such that the rows with conf >= t are right at least `target` of the
    time (inf where no t reaches it; 0 for a target of 0, which takes everything)."""
    if target <= 0:
        return 0.0
    order = np.argsort(-conf, kind="stable")
    precision = np.cumsum(correct[order]) / np.arange(1, len(conf) + 1)
    ok = np.flatnonzero(precision >= target - 1e-12)
    return float(conf[order][ok[-1]]) if len(ok) else float("inf")


def factor_thresholds(task, combined_oof: np.ndarray, factors: np.ndarray, target: float) -> dict[str, float]:
    """Per factor, the threshold on its marginal confidence that meets `target` precision on OOF."""
    out = {}
    for i, f in enumerate(task.factors):
        marginal = task.marginal(combined_oof, i)
        out[f.name] = precision_threshold(marginal.max(1), marginal.argmax(1) == factors[:, i], target)
    return out


def oof_precision(task, combined_oof: np.ndarray, factors: np.ndarray, thresholds: dict[str, float]) -> dict:
    """Per factor, what its threshold keeps of the OOF predictions and how often those are right: the
    promise the pseudo labels are made under."""
    out = {}
    for i, f in enumerate(task.factors):
        marginal = task.marginal(combined_oof, i)
        kept = marginal.max(1) >= thresholds[f.name]
        right = marginal.argmax(1)[kept] == factors[kept, i]
        out[f.name] = {"threshold": None if np.isinf(thresholds[f.name]) else thresholds[f.name],
                       "kept_share": float(kept.mean()), "precision": float(right.mean()) if kept.any() else None}
    return out


def select_factors(task, combined: np.ndarray, thresholds: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """(factor labels (N, F) with -1 where not confident enough, each factor's confidence (N, F))."""
    labels = np.full((len(combined), len(task.factors)), UNKNOWN, np.int64)
    conf = np.zeros(labels.shape)
    for i, f in enumerate(task.factors):
        marginal = task.marginal(combined, i)
        conf[:, i] = marginal.max(1)
        keep = conf[:, i] >= thresholds[f.name]
        labels[keep, i] = marginal.argmax(1)[keep]
    return labels, conf


def own_test_probs(ctx, prev: int):
    """(fold, its own round-prev head probabilities of the test images), for every fold done: the
    only predictions a fold's next pseudo labels may come from."""
    for k in read_json(ctx.run.round_dir(prev) / "summary.json")["folds_done"]:
        test = load_npz(ctx.run.fold_dir(prev, k) / "test.npz")
        check_identities(ctx, prev, k, None, test)
        yield k, head_probs(test)


def pseudo_table(ctx, prev: int) -> tuple[pd.DataFrame, dict[str, float]]:
    """Round prev+1's pseudo labels: for each fold, its own round-prev model's test predictions under
    the round's decision, kept per factor where they clear the OOF-calibrated thresholds."""
    task, heads, cfg, run = ctx.task, ctx.heads, ctx.cfg, ctx.run
    check_round(run, prev, cfg)
    decision = load_decision(run.round_dir(prev))
    oof = load_npz(run.round_dir(prev) / "oof.npz")
    oof_probs = head_probs(oof)
    combined_oof, _ = predict_classes(task, heads, oof_probs, cfg, decision)
    thresholds = factor_thresholds(task, combined_oof, oof["factors"], cfg.pseudo.precision)
    image_ids = ctx.table.test["image_id"].to_numpy().astype(str)
    frames = []
    for k, probs in own_test_probs(ctx, prev):
        labels, conf = select_factors(task, predict_classes(task, heads, probs, cfg, decision)[0], thresholds)
        rows = np.flatnonzero((labels != UNKNOWN).any(1))
        frame = pd.DataFrame({"ImageID": image_ids[rows], "fold": k})
        for i, f in enumerate(task.factors):
            frame[f.name] = labels[rows, i]
            frame[f"conf_{f.name}"] = conf[rows, i].round(4)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True), thresholds, oof_precision(task, combined_oof, oof["factors"], thresholds)


def soft_table(ctx, prev: int) -> dict[str, np.ndarray]:
    """Round prev+1's soft pseudo labels: for each fold, its own round-prev model's final-class
    probabilities of every test image (the auxiliary blend in, the offsets out)."""
    task, heads, cfg, run = ctx.task, ctx.heads, ctx.cfg, ctx.run
    check_round(run, prev, cfg)
    blend = blend_only(load_decision(run.round_dir(prev)))
    out = {"image_id": ctx.table.test["image_id"].to_numpy().astype(str)}
    for k, probs in own_test_probs(ctx, prev):
        out[f"fold{k}"] = predict_classes(task, heads, probs, cfg, blend)[0].astype(np.float32)
    return out


def write_labels(run: RunDir, r: int, info: dict, table: pd.DataFrame | dict) -> None:
    write_json(run.round_dir(r) / "pseudo.json", info)
    if isinstance(table, dict):
        save_npz(run.round_dir(r) / SOFT_FILE, **table)
    else:
        atomic_write_text(run.round_dir(r) / "pseudo.csv", table.to_csv(index=False))


def pseudo_label(run_dir: str | Path, precision: float | None = None, rounds: int | None = None,
                 overrides: list[str] = (), progress=None) -> list[dict]:
    """Run `rounds` new rounds after the latest one; return each round's report. A round whose
    thresholds select no test image is not trained (its report says `trained: False`), and no
    round follows it."""
    extra = every_fold(overrides)
    if precision is not None:
        extra.append(f"pseudo.precision={precision}")
    if rounds is not None:
        extra.append(f"pseudo.rounds={rounds}")
    ctx = reopen_context(run_dir, extra, progress)
    refuse_ensemble(ctx)
    if ctx.cfg.distill is not None:
        raise ConfigError(f"{ctx.run.root} is a distilled student: it already learns the test images from its teacher's "
                          f"probabilities; pseudo-label the teacher ({ctx.cfg.distill.teacher}) and distil again")
    if ctx.test_images is None:
        raise FileNotFoundError("the task has no test images (no eval/ in the competition root, or no "
                                "task.test in a table task): nothing to pseudo-label")
    reports = []
    for _ in range(ctx.cfg.pseudo.rounds):
        prev = ctx.run.latest_round()
        r = prev + 1
        if ctx.cfg.pseudo.soft:
            dist.on_main(write_labels, ctx.run, r, {"from_round": prev, "soft": True}, soft_table(ctx, prev))
            summary = train_round(ctx, r, progress)  # each fold reads its own probabilities of every test image
            n = len(ctx.table.test)
            reports.append({"round": r, "from_round": prev, "soft": True, "precision": None, "thresholds": None,
                            "added": n, "of": n, "labelled": {f.name: n for f in ctx.task.factors},
                            "oof_f1": summary["oof"]["f1"], "oof": summary["oof"], "trained": True})
            continue
        table, thresholds, promise = pseudo_table(ctx, prev)
        if table.empty:
            # a round with nothing to add would only retrain round prev with other seeds and become
            # a round to choose from; the next one would select nothing either
            reports.append({"round": r, "from_round": prev, "precision": ctx.cfg.pseudo.precision,
                            "thresholds": thresholds, "added": 0, "of": int(len(ctx.table.test)),
                            "labelled": {f.name: 0 for f in ctx.task.factors}, "trained": False})
            break
        # every rank of a torchrun has made the same table from the same files; rank 0 writes it,
        # and the others go on once it has (on_main waits for it)
        dist.on_main(write_labels, ctx.run, r, {"from_round": prev, "precision": ctx.cfg.pseudo.precision,
                                                "factors": promise}, table)
        summary = train_round(ctx, r, progress)  # each fold reads its own rows of the round's pseudo.csv
        per_fold = table.groupby("fold").size()
        reports.append({"round": r, "from_round": prev, "precision": ctx.cfg.pseudo.precision,
                        "thresholds": thresholds, "added": int(round(per_fold.mean())) if len(per_fold) else 0,
                        "of": int(len(ctx.table.test)),
                        "labelled": {f.name: int((table[f.name] != UNKNOWN).sum() / max(len(per_fold), 1))
                                     for f in ctx.task.factors},
                        "oof_f1": summary["oof"]["f1"], "oof": summary["oof"], "trained": True})
    return reports
