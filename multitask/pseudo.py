"""Pseudo-labelling rounds, honest and per factor.

Honest: fold k of round r trains on test images labelled by fold k's own model of round r-1, which
never saw fold k's groups (it validated on them). A vote of all folds would not do: four of five
trained on fold k's groups, so a test image that resembles (or copies) one of them would carry its
true label into the model that is scored on it, and round r's OOF would flatter.

Per factor: each factor gets its own confidence threshold, the lowest at which the previous round's
OOF predictions of that factor reach `pseudo.precision` (with `pseudo.bound`, as a lower bound that
counts persons: a few persons' pictures above a threshold promise little for other persons). A test
image joins with the factors that clear their threshold; the others stay unknown (-1) and its rows
add nothing to the heads that need them. One threshold on the final class selects almost nothing
where one factor (age) stays uncertain.
Pseudo images only ever train: never a validation fold, so OOF scores stay honest.

Another teacher (`--labels-from RUN`, the first new round only): a run under the same split, such
as an `mt ensemble` of this run and others, or a stronger backbone. Fold k then learns from that
run's fold-k models (an ensemble's: the vote of its members' fold-k models, weighted as refitted
without fold k), which never saw fold k's groups either; its thresholds come from that run's OOF.

Subjects: where the teacher's decision reads them (`decide.subjects`), fold k's labels of a
person's pictures are read from fold k's own prediction of that person's clearest picture (matched
by pixels alone), and the thresholds come from the OOF read the same way.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd

from multitask import dist
from multitask.config import Config, ConfigError
from multitask.context import (build_task, check_checkpoint_place, check_round, every_fold, load_run_config,
                               no_test_images, reopen_context)
from multitask.decide import Decision, honest_f1, load_decision, predict_classes
from multitask.ensemble import check_same_split, fold_test_probs, fold_votes
from multitask.kfold import check_identities, refuse_ensemble, train_round
from multitask.labels import FLAT_HEAD, Head, Task
from multitask.lock import LOCK, describe_holder, held_lock
from multitask.model import check_model
from multitask.run import SOFT_FILE, RunDir, RunError, atomic_write_text, head_probs, load_npz, read_json, save_npz, write_json
from multitask.subjects import Pictures, likeness, stored_pictures

UNKNOWN = -1


def wilson_lower(precision: np.ndarray, n: np.ndarray, level: float) -> np.ndarray:
    """The one-sided lower bound, at `level`, of a precision observed over n independent readings
    (Wilson's score interval, which stays inside [0, 1] and is sound for few readings)."""
    z = NormalDist().inv_cdf(level)
    n = np.asarray(n, float)
    centre = precision + z * z / (2 * n)
    spread = z * np.sqrt(precision * (1 - precision) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)


def precision_threshold(conf: np.ndarray, correct: np.ndarray, target: float, groups: np.ndarray | None = None,
                        bound: float = 0.0) -> float:
    """The lowest confidence t such that the rows with conf >= t are right at least `target` of the
    time (inf where no t reaches it; 0 for a target of 0, which takes everything). With `bound` > 0
    it is their precision's lower bound at that level that must reach `target`, counting the distinct
    `groups` above t as the readings (every row its own reading where groups is None). The precision
    stays the rows' (the labels are rows); counting their groups as readings is exact where a group's
    rows are read alike, and cautious where they are not.

    Under a bound the cuts are tested in a fixed sequence, from the most confident down, and the last
    cut before the first that fails is taken. Taking the lowest of all the cuts that pass would be a
    choice among hundreds of tests, and the bound would hold less often than its level says. The
    sequence starts at the first cut whose readings could reach the target if every one were right;
    that cut depends on the confidences alone, so the sequence is still fixed before any reading is
    known to be right (tests/test_pipeline.py measures how often the promise holds)."""
    if target <= 0:
        return 0.0
    if len(conf) == 0:  # no rows: no cut reaches anything
        return float("inf")
    order = np.argsort(-conf, kind="stable")
    ranked = conf[order]
    precision = np.cumsum(correct[order]) / np.arange(1, len(conf) + 1)
    # `conf >= t` keeps every row of a run of equal confidences: a cut inside one is no cut at all,
    # so only the precision at each run's last row is the precision some t gives
    cuts = np.append(ranked[1:] != ranked[:-1], True)
    if bound > 0:
        ranked_groups = np.arange(len(conf)) if groups is None else np.asarray(groups)[order]
        first_seen = np.zeros(len(conf), bool)
        first_seen[np.unique(ranked_groups, return_index=True)[1]] = True
        readings = np.cumsum(first_seen)
        precision = wilson_lower(precision, readings, bound)
        cuts &= wilson_lower(np.ones(len(conf)), readings, bound) >= target - 1e-12
        tested = np.flatnonzero(cuts)
        failed = tested[precision[tested] < target - 1e-12]
        ok = tested[tested < failed[0]] if len(failed) else tested
    else:
        ok = np.flatnonzero((precision >= target - 1e-12) & cuts)
    return float(ranked[ok[-1]]) if len(ok) else float("inf")


def factor_thresholds(task, combined_oof: np.ndarray, factors: np.ndarray, target: float,
                      groups: np.ndarray | None = None, bound: float = 0.0) -> dict[str, float]:
    """Per factor, the threshold on its marginal confidence that meets `target` precision on OOF (as a
    lower bound over `groups`, with `bound` > 0)."""
    out = {}
    for i, f in enumerate(task.factors):
        marginal = task.marginal(combined_oof, i)
        out[f.name] = precision_threshold(marginal.max(1), marginal.argmax(1) == factors[:, i], target, groups, bound)
    return out


def oof_precision(task, combined_oof: np.ndarray, factors: np.ndarray, thresholds: dict[str, float],
                  groups: np.ndarray | None, bound: float = 0.0) -> dict:
    """Per factor, what its threshold keeps of the OOF predictions, from how many persons, and how
    often those are right (with `bound` > 0, also the lower bound the threshold was set by): the
    promise the pseudo labels are made under."""
    out = {}
    for i, f in enumerate(task.factors):
        marginal = task.marginal(combined_oof, i)
        kept = marginal.max(1) >= thresholds[f.name]
        right = marginal.argmax(1)[kept] == factors[kept, i]
        persons = len(np.unique(groups[kept])) if groups is not None else None
        out[f.name] = {"threshold": None if np.isinf(thresholds[f.name]) else thresholds[f.name],
                       "kept_share": float(kept.mean()), "persons": persons,
                       "precision": float(right.mean()) if kept.any() else None}
        if bound > 0:
            out[f.name]["lower_bound"] = float(wilson_lower(right.mean(), persons, bound)) if kept.any() else None
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


@dataclass
class Teacher:
    """Where a round's pseudo labels come from: a round of a run under the same split (its OOF sets the
    thresholds, its decision reads its heads), and per fold the head probabilities of the test images
    from models that never saw that fold's groups."""
    task: Task
    heads: list[Head]
    cfg: Config
    round_dir: Path
    test: dict[int, dict[str, np.ndarray]]  # fold -> head probabilities of the test images
    source: str | None = None  # the other run the labels come from (None: the run's own previous round)


def teacher_of(ctx, prev: int, labels_from: str | Path | None) -> Teacher:
    teacher = other_teacher(ctx, labels_from) if labels_from else own_teacher(ctx, prev)
    wanted = ctx.cfg.train.selected_folds()
    missing = sorted(set(wanted) - set(teacher.test))
    if missing:  # such a fold would train without a single pseudo label
        if teacher.source is None:
            fix = f"`mt resume --run {ctx.run.root}` trains them (a round begun with train.fold), then pseudo-label again"
        else:
            fix = f"finish that run's round first (`mt resume --run {teacher.source}`)"
        raise ConfigError(f"{teacher.round_dir}: no test predictions of fold(s) {missing}, which this round trains; {fix}")
    return teacher


def own_teacher(ctx, prev: int) -> Teacher:
    """The run's own round prev: fold k's labels from fold k's own model."""
    check_round(ctx.run, prev, ctx.cfg)
    test = {}
    for k in read_json(ctx.run.round_dir(prev) / "summary.json")["folds_done"]:
        z = load_npz(ctx.run.fold_dir(prev, k) / "test.npz")
        check_identities(ctx, prev, k, None, z)
        test[k] = head_probs(z)
    return Teacher(ctx.task, ctx.heads, ctx.cfg, ctx.run.round_dir(prev), test)


def other_teacher(ctx, path: str | Path) -> Teacher:
    """Another run under the same split (its round that `submit` uses), or an `mt ensemble` run."""
    other = RunDir(path)
    cfg = load_run_config(other)
    if cfg.distill is not None:
        raise ConfigError(f"{other.root} is a distilled student: it learned every training image from its teacher, "
                          f"so its labels would carry fold k's groups into fold k; take the teacher's labels instead")
    check_same_split(other.root, ctx.run.root, "fold k's labels must come from models that never saw fold k's groups")
    task, heads = build_task(cfg)
    if task.factors != ctx.task.factors:
        raise ConfigError(f"{other.root} predicts other factors than {ctx.run.root}: {task.factor_names} vs "
                          f"{ctx.task.factor_names}")
    r, _ = other.choose_round(cfg.train.folds, can_pick=False)
    test_ids = ctx.table.test_ids()
    if cfg.ensemble is not None:
        test = {k: {FLAT_HEAD: p} for k, p in fold_votes(other.root, test_ids).items()}
    else:
        check_round(other, r, cfg)
        test = fold_test_probs(other, r, test_ids)
    return Teacher(task, heads, cfg, other.round_dir(r), test, str(other.root))


def subject_pictures(ctx, decision: Decision | None) -> Pictures | None:
    """The test pictures' likeness where the teacher's decision reads subjects: fold k's test labels
    are then read per person from fold k's own predictions (and the thresholds from the OOF the
    teacher's round stored its likeness with, read the same way)."""
    return Pictures(likeness(ctx.test_images)) if decision is not None and decision.subjects > 0 else None


def oof_groups(round_dir: Path, oof: dict, bound: float) -> np.ndarray | None:
    """The OOF rows' groups (persons): `person` in rounds of an mt before table tasks; a bound
    cannot count without them."""
    groups = oof.get("group", oof.get("person"))
    if groups is None and bound > 0:
        raise RunError(f"{round_dir / 'oof.npz'}: no groups of its rows to count persons by; pseudo-label it "
                       f"with pseudo.bound 0")
    return groups


def pseudo_table(ctx, teacher: Teacher) -> tuple[pd.DataFrame, dict[str, float], dict]:
    """The next round's pseudo labels: for each fold, the teacher's fold-k test predictions under its
    decision, kept per factor where they clear the thresholds calibrated on the teacher's OOF."""
    task, cfg = ctx.task, ctx.cfg
    decision = load_decision(teacher.round_dir)
    oof = load_npz(teacher.round_dir / "oof.npz")
    pictures = subject_pictures(ctx, decision)
    combined_oof, _ = predict_classes(teacher.task, teacher.heads, head_probs(oof), teacher.cfg, decision,
                                      stored_pictures(oof))
    groups = oof_groups(teacher.round_dir, oof, cfg.pseudo.bound)
    thresholds = factor_thresholds(task, combined_oof, oof["factors"], cfg.pseudo.precision, groups, cfg.pseudo.bound)
    image_ids = ctx.table.test_ids()
    frames = []
    for k, probs in sorted(teacher.test.items()):
        combined = predict_classes(teacher.task, teacher.heads, probs, teacher.cfg, decision, pictures)[0]
        labels, conf = select_factors(task, combined, thresholds)
        rows = np.flatnonzero((labels != UNKNOWN).any(1))
        frame = pd.DataFrame({"ImageID": image_ids[rows], "fold": k})
        for i, f in enumerate(task.factors):
            frame[f.name] = labels[rows, i]
            frame[f"conf_{f.name}"] = conf[rows, i].round(4)
        frames.append(frame)
    promise = oof_precision(task, combined_oof, oof["factors"], thresholds, groups, cfg.pseudo.bound)
    return pd.concat(frames, ignore_index=True), thresholds, promise


def soft_table(ctx, teacher: Teacher) -> dict[str, np.ndarray]:
    """The next round's soft pseudo labels: for each fold, the teacher's fold-k final-class
    probabilities of every test image (the auxiliary blend and subjects in, the offsets out)."""
    decision = load_decision(teacher.round_dir)
    decision = replace(decision, offsets=None) if decision is not None else None
    pictures = subject_pictures(ctx, decision)
    out = {"image_id": ctx.table.test_ids()}
    for k, probs in sorted(teacher.test.items()):
        out[f"fold{k}"] = predict_classes(teacher.task, teacher.heads, probs, teacher.cfg, decision,
                                          pictures)[0].astype(np.float32)
    return out


def write_labels(run: RunDir, r: int, info: dict, table: pd.DataFrame | dict) -> None:
    """Round r's labels, then what they were made under. The labels first: the first file makes the
    round's folder, and a round folder without labels would be trained by `mt resume` as a plain
    copy of round 0 (kfold.resume_run refuses one)."""
    if isinstance(table, dict):
        save_npz(run.round_dir(r) / SOFT_FILE, **table)
    else:
        atomic_write_text(run.round_dir(r) / "pseudo.csv", table.to_csv(index=False))
    write_json(run.round_dir(r) / "pseudo.json", info)


def clear_unfinished_round(run: RunDir, r: int) -> None:
    """Round r's folder, left by a killed `mt pseudo-label`, before new labels go into it. Once a fold
    has begun, the round is finished by `mt resume` with the labels it began with: new ones would
    mix with those its finished folds learnt. Before that it holds labels alone, and is made again
    whole, so that no label file of the earlier try (a soft one beside new hard ones) stays."""
    folder = run.round_dir(r)
    if not folder.exists():
        return
    begun = sorted(p.name for p in folder.glob("fold*") if p.is_dir())
    held = held_lock(sorted(folder.glob(f"fold*/{LOCK}")))
    if held:  # another `mt pseudo-label` (or `mt resume`) is at work on it now: never advise removing it
        raise RunError(f"{folder}: round {r} is {describe_holder(held[1])} ({held[0].parent.name}); let it finish, "
                       f"or `mt resume --run {run.root}` to help it")
    if begun:
        raise RunError(f"{folder}: round {r} was started and is not finished ({', '.join(begun)} began training on its "
                       f"labels): `mt resume --run {run.root}` finishes it with those labels; or remove {folder} to "
                       f"make it again with new ones")
    shutil.rmtree(folder)


def pseudo_label(run_dir: str | Path, precision: float | None = None, rounds: int | None = None,
                 overrides: list[str] = (), progress=None, labels_from: str | Path | None = None,
                 bound: float | None = None) -> list[dict]:
    """Run `rounds` new rounds after the latest one; return each round's report. A round whose
    thresholds select no test image is not trained (its report says `trained: False`), and no
    round follows it. With `labels_from`, the first new round learns that run's labels instead of
    this run's own (see Teacher)."""
    extra = every_fold(overrides)
    if precision is not None:
        extra.append(f"pseudo.precision={precision}")
    if bound is not None:
        extra.append(f"pseudo.bound={bound}")
    if rounds is not None:
        extra.append(f"pseudo.rounds={rounds}")
    ctx = reopen_context(run_dir, extra, progress)
    refuse_ensemble(ctx)
    check_checkpoint_place(ctx.run, ctx.cfg)
    check_model(ctx.cfg.model)  # the checkpoint the run started from is still there, unchanged
    if ctx.cfg.distill is not None:
        raise ConfigError(f"{ctx.run.root} is a distilled student: it already learns the test images from its teacher's "
                          f"probabilities; pseudo-label the teacher ({ctx.cfg.distill.teacher}) and distil again")
    if ctx.test_images is None:
        raise no_test_images(ctx, "nothing to pseudo-label")
    reports = []
    for i in range(ctx.cfg.pseudo.rounds):
        prev = ctx.run.latest_round()
        r = prev + 1
        dist.on_main(clear_unfinished_round, ctx.run, r)
        teacher = teacher_of(ctx, prev, labels_from if i == 0 else None)
        source = {"labels_from": teacher.source} if teacher.source else {}
        if ctx.cfg.pseudo.soft:
            dist.on_main(write_labels, ctx.run, r, {"from_round": prev, "soft": True} | source, soft_table(ctx, teacher))
            summary = train_round(ctx, r, progress)  # each fold reads its own probabilities of every test image
            n = len(ctx.table.test)
            reports.append({"round": r, "from_round": prev, "soft": True, "precision": None, "thresholds": None,
                            "added": n, "of": n, "labelled": {f.name: n for f in ctx.task.factors},
                            "oof_f1": summary["oof"]["f1"], "oof": summary["oof"], "trained": True,
                            "decided_f1": honest_f1(summary)})
            continue
        table, thresholds, promise = pseudo_table(ctx, teacher)
        cut = {"from_round": prev, "precision": ctx.cfg.pseudo.precision, "bound": ctx.cfg.pseudo.bound}
        if table.empty:
            # a round with nothing to add would only retrain round prev with other seeds and become
            # a round to choose from; the next one would select nothing either
            reports.append({"round": r} | cut | {"thresholds": thresholds, "added": 0, "of": int(len(ctx.table.test)),
                                                 "labelled": {f.name: 0 for f in ctx.task.factors}, "trained": False})
            break
        # every rank of a torchrun has made the same table from the same files; rank 0 writes it,
        # and the others go on once it has (on_main waits for it)
        dist.on_main(write_labels, ctx.run, r, cut | {"factors": promise} | source, table)
        summary = train_round(ctx, r, progress)  # each fold reads its own rows of the round's pseudo.csv
        # a fold that selected nothing counts too: pseudo.csv has no rows of it
        per_fold = table.groupby("fold").size().reindex(sorted(teacher.test), fill_value=0)
        reports.append({"round": r} | cut | {
                        "thresholds": thresholds, "added": int(round(per_fold.mean())) if len(per_fold) else 0,
                        "of": int(len(ctx.table.test)),
                        "labelled": {f.name: int(round((table[f.name] != UNKNOWN).sum() / max(len(per_fold), 1)))
                                     for f in ctx.task.factors},  # rounded as the report rounds them
                        "oof_f1": summary["oof"]["f1"], "oof": summary["oof"], "trained": True,
                        "decided_f1": honest_f1(summary)})
    return reports
