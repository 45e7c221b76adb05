"""A round of k-fold training over a run directory: folds, every fold's model, its OOF and test
probabilities, and the round's aggregate (OOF scores, test probabilities voted over the folds).

Each fold writes its own files, and the round's aggregate is rebuilt from whichever folds are done,
so folds can be trained one at a time (`--fold K`), or by different processes into one run.
"""
from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from multitask import dist
from multitask.config import Config, ConfigError
from multitask.context import (Context, build_task, check_checkpoint_place, claim_run_dir, every_fold, load_images,
                               former_checkpoint_hint, open_context, read_checked, reopen_context,
                               run_settings_hashes, skipped_listing)
from multitask.budget import epochs_of_run, fit_epochs
from multitask.curves import plot_round
from multitask.data.augment import check_albumentations
from multitask.data.dataset import RowImages
from multitask.data.folds import make_folds
from multitask.data.table import factor_values, numeric_matrix, numeric_values
from multitask.decide import decide_round, is_active
from multitask.device import resolve_device, worker_devices
from multitask.engine import FoldData, tensorboard_writer_class, train_fold
from multitask.inference import load_model, predict_probs, vote
from multitask.labels import Head, Task
from multitask.metrics import score_probs
from multitask.model import check_model
from multitask.numeric import check_training_bins, training_rows
from multitask.parallel import WorkerDied, run_in_workers
from multitask.run import (SOFT_FILE, RunDir, RunError, as_id, atomic_write_text, check_writable, fold_checkpoint,
                           head_probs, load_npz, load_torch, read_json, save_npz, write_json)
from multitask.subjects import likeness


def pseudo_labelled(ctx: Context, r: int, k: int) -> tuple[RowImages, np.ndarray] | None:
    """The test images round r adds to fold k's training set, with their pseudo factor values (-1
    where a factor was not confident enough), read from the round's pseudo.csv (so a worker process
    rebuilds them from the run directory alone)."""
    path = ctx.run.round_dir(r) / "pseudo.csv"
    if not path.exists():
        return None
    table = pd.read_csv(path, dtype={"ImageID": str})
    table = table[table["fold"] == k]
    row_of = {image_id: i for i, image_id in enumerate(ctx.table.test_ids())}
    missing = sorted(set(table["ImageID"]) - set(row_of))
    if missing:
        raise RunError(f"{path}: images not among the task's test images: {missing[:5]}")
    rows = np.array([row_of[i] for i in table["ImageID"]], dtype=np.int64)
    return RowImages.of(ctx.test_images, rows), table[ctx.task.factor_names].to_numpy(dtype=np.int64)


def soft_pseudo(ctx: Context, r: int, k: int) -> np.ndarray | None:
    """Round r's soft pseudo labels for fold k: its own previous model's final-class probabilities of
    every test image (None when the round has none)."""
    path = ctx.run.round_dir(r) / SOFT_FILE
    if not path.exists():
        return None
    z = load_npz(path)
    if not np.array_equal(z["image_id"], ctx.table.test_ids()):
        raise RunError(f"{path}: made for other test images, or in another order, than the task lists now")
    return z[f"fold{k}"]


def distilled(ctx: Context) -> tuple[np.ndarray, np.ndarray | None] | None:
    """A distilled student's teacher probabilities (final class) for its training and test rows,
    from RUN/teacher.npz, checked against the images the task lists now."""
    if ctx.cfg.distill is None:
        return None
    z = load_npz(ctx.run.teacher)
    if not np.array_equal(z["train_ids"], ctx.table.train_ids()):
        raise RunError(f"{ctx.run.teacher}: made for other training images than the task's table now lists; "
                       f"distil again with `mt distill`")
    test = None
    if ctx.cfg.distill.unlabeled and ctx.table.test is not None:
        if not np.array_equal(z["test_ids"], ctx.table.test_ids()):
            raise RunError(f"{ctx.run.teacher}: made for other test images than the task lists now")
        test = z["test"]
    return z["train"], test


def fold_finished(ctx: Context, r: int, k: int) -> bool:
    return ctx.run.fold_done(r, k, with_test=ctx.table.test is not None)


def check_identities(ctx: Context, r: int, k: int, oof: dict | None, test: dict | None) -> None:
    """A fold's predictions name the images they were made for; the task's tables must still list
    those images in those places (an edited train table or a reordered test list is an error here,
    not a silent misalignment)."""
    fold_dir = ctx.run.fold_dir(r, k)
    ids = ctx.table.train_ids() if oof is not None and "ids" in oof else None
    if ids is not None and (oof["rows"].max(initial=-1) >= len(ids) or not np.array_equal(oof["ids"], ids[oof["rows"]])):
        raise RunError(f"{fold_dir / 'oof.npz'}: predicted for other training images than the task's table now "
                        f"lists in those rows (was the table edited?); retrain with `mt train --force`")
    if test is not None and "image_id" in test:
        ids = ctx.table.test_ids()
        if not np.array_equal(test["image_id"], ids):
            raise RunError(f"{fold_dir / 'test.npz'}: predicted for other test images, or in another order, than "
                            f"the task's test list now holds; retrain with `mt train --force`")


def train_round_fold(ctx: Context, r: int, k: int, device: torch.device, progress=None,
                     resume: bool = False, on_epoch=None) -> None:
    """Fold k of round r: train (pseudo-labelled images join the training set, never the validation
    set), then write the OOF and test probabilities of the checkpoint it keeps (the best epoch's, or
    the average of the top epochs with `train.avg_top_k`: run.fold_checkpoint). With `resume`, training carries
    on from the fold's last.pt where there is one."""
    cfg = ctx.cfg
    factors = factor_values(ctx.table.train, ctx.task)
    values = numeric_matrix(ctx.table.train, ctx.task)
    va = np.flatnonzero(ctx.folds == k)
    tr = np.flatnonzero((ctx.folds != k) & training_rows(ctx.task, cfg, values))
    train_images, train_factors, train_values = RowImages.of(ctx.train_images, tr), factors[tr], values[tr]
    pseudo = pseudo_labelled(ctx, r, k)
    if pseudo is not None:
        train_images = train_images.concat(pseudo[0])
        train_factors = np.concatenate([train_factors, pseudo[1]])
        # a pseudo label is a class, not a number
        train_values = np.concatenate([train_values, np.full((len(pseudo[1]), values.shape[1]), np.nan)])
    if len(train_images) == 0:  # pseudo-labelled rows alone would do
        dropping = ", ".join(f"numeric.{f}.drop_near_edge={n.drop_near_edge:g}"
                             for f, n in cfg.numeric.items() if n.drop_near_edge)
        why = (f" ({dropping} leaves out every row of the other folds; lower it)"
               if dropping and (ctx.folds != k).any() else "")
        raise ConfigError(f"round {r} fold {k}: no training row is left to learn from{why}")
    # a teacher's probabilities: a student's for every row (distill.py), or soft pseudo labels for the
    # test images alone; the test images then join, unlabelled, and learn from them
    teacher, soft = distilled(ctx), soft_pseudo(ctx, r, k)
    if r > 0 and pseudo is None and soft is None:  # a plain copy of round 0, called a pseudo-label round
        raise RunError(f"{ctx.run.round_dir(r)}: round {r} has no labels to learn (pseudo.csv or {SOFT_FILE}); another "
                       f"`mt pseudo-label` on this run may be making them again: let it finish, then "
                       f"`mt resume --run {ctx.run.root}`")
    train_teacher, test_taught = None, None
    if teacher is not None:
        train_teacher, test_taught = teacher[0][tr], teacher[1]
    elif soft is not None:
        train_teacher, test_taught = np.zeros((len(train_factors), soft.shape[1]), np.float32), soft
    if test_taught is not None:
        train_images = train_images.concat(RowImages.of(ctx.test_images))
        train_factors = np.concatenate([train_factors, np.full((len(test_taught), factors.shape[1]), -1)])
        train_values = np.concatenate([train_values, np.full((len(test_taught), values.shape[1]), np.nan)])
        train_teacher = np.concatenate([train_teacher, test_taught])
    data = FoldData(train_images, train_factors, train_values, RowImages.of(ctx.train_images, va), factors[va],
                    train_teacher)
    fold_dir = ctx.run.fold_dir(r, k)
    best = train_fold(cfg, ctx.task, ctx.heads, data, fold_dir, seed=cfg.train.seed * 1000 + r * 100 + k,
                      device=device, progress=progress, label=f"round {r} fold {k}", resume=resume,
                      on_epoch=on_epoch, settings=run_settings_hashes(ctx.run, cfg)[0])
    dist.on_main(save_predictions, ctx, r, k, best["train_id"], data, va, device)


def save_predictions(ctx: Context, r: int, k: int, train_id: str, data: FoldData, va: np.ndarray,
                     device: torch.device) -> None:
    """The fold's OOF and test probabilities from the checkpoint that training kept."""
    cfg, fold_dir = ctx.cfg, ctx.run.fold_dir(r, k)
    made_by, settings = np.array(train_id), np.array(run_settings_hashes(ctx.run, cfg)[0])
    model = load_model(fold_dir / fold_checkpoint(cfg), cfg, ctx.task, ctx.heads, device)
    oof = predict_probs(model, data.val_images, cfg, device)
    # rows are positions in the train table; ids say which images they were, to be checked
    save_npz(fold_dir / "oof.npz", rows=va, ids=ctx.table.train_ids()[va], train_id=made_by, settings=settings,
             **{f"p_{h}": p for h, p in oof.items()})
    if ctx.test_images is not None:
        test = predict_probs(model, RowImages.of(ctx.test_images), cfg, device)
        save_npz(fold_dir / "test.npz", image_id=ctx.table.test_ids(), train_id=made_by,
                 settings=settings, **{f"p_{h}": p for h, p in test.items()})


def train_claimed_fold(ctx: Context, r: int, k: int, device: torch.device, progress=None, on_epoch=None) -> None:
    """Fold k of round r under its lock: skipped (and said) when another process holds it or has
    finished it since this one looked. A held fold that has a last.pt was left by a process that died
    holding it (a fresh `mt train` refuses started folds), so training carries on from there."""
    with dist.main_only(ctx.run.fold_lock(r, k)) as holder:  # under torchrun: rank 0 holds, all decide alike
        if dist.is_main() and holder is None and fold_finished(ctx, r, k):
            holder = "finished by another process"
        holder = dist.broadcast(holder)
        if holder is not None:
            if progress:
                progress.console.print(f"  round {r} fold {k}: {holder}; skipped here")
            return
        train_round_fold(ctx, r, k, device, progress, resume=True, on_epoch=on_epoch)


def _fold_worker(payload: dict, folds, device: str, progress) -> None:
    """One worker process of a parallel round: open the run (the caches are already built), then
    train the folds handed to it."""
    cfg = Config.model_validate(payload["cfg"])
    ctx = open_context(RunDir(payload["run"]), cfg, progress)
    for k in folds:
        train_claimed_fold(ctx, payload["round"], k, torch.device(device), progress)


def refuse_ensemble(ctx: Context) -> None:
    if ctx.cfg.ensemble is not None:
        raise ConfigError(f"{ctx.run.root} is an ensemble of runs, with no models of its own to train: "
                          f"pseudo-label or resume its member runs (`mt pseudo-label --run MEMBER --labels-from "
                          f"{ctx.run.root}` teaches them the ensemble's votes), then run `mt ensemble` again")


def check_processes(cfg: Config) -> None:
    """Settings that torchrun's processes cannot share, refused before anything is written."""
    if dist.world() > 1 and cfg.train.jobs > 1:
        raise ConfigError("train.jobs > 1 and torchrun do not mix: under torchrun every process trains each fold together")
    if dist.world() > 1 and cfg.train.batch_size % dist.world():
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} does not split evenly over {dist.world()} processes")


def train_round(ctx: Context, r: int, progress=None, resume: bool = False, on_epoch=None) -> dict:
    """Train the selected folds of round r, one after another or `train.jobs` at once in worker
    processes, and rebuild the round's aggregate."""
    cfg = ctx.cfg
    refuse_ensemble(ctx)
    check_processes(cfg)
    t0 = time.perf_counter()
    folds = cfg.train.selected_folds()
    if resume:
        folds = [k for k in folds if not fold_finished(ctx, r, k)]
    if progress and dist.is_main():  # a log that is not a terminal shows no bar: say what starts, and where
        epochs = f"{cfg.train.epochs} epoch{'s' * (cfg.train.epochs != 1)}"
        progress.console.print(f"round {r}: fold(s) {', '.join(map(str, folds)) or 'none left'} of {cfg.train.folds}, "
                               f"{epochs} each, {len(ctx.table.train)} labelled training images, "
                               f"{cfg.model.backbone} at {'x'.join(map(str, cfg.data.img_size))} px -> {ctx.run.root}",
                               soft_wrap=True)
    if cfg.train.jobs > 1 and len(folds) > 1:
        payload = {"cfg": cfg.model_dump(mode="json"), "run": str(ctx.run.root), "round": r}
        try:
            run_in_workers(_fold_worker, payload, folds, cfg.train.jobs, worker_devices(cfg.train.device), progress)
        except WorkerDied as e:  # a user's kill, or the system's for memory: the folds done are kept
            raise RunError(f"{e}; the folds that finished are kept, and `mt resume --run {ctx.run.root}` trains "
                           f"the rest (with fewer --jobs if it ran out of memory)") from None
    else:
        device = dist.device_for(resolve_device(cfg.train.device))
        for k in folds:
            train_claimed_fold(ctx, r, k, device, progress if dist.is_main() else None,
                               None if on_epoch is None else partial(on_epoch, k))
    return dist.on_main(aggregate_round, ctx, r, wall_s=time.perf_counter() - t0)


def aggregate_round(ctx: Context, r: int, wall_s: float | None = None) -> dict:
    """OOF probabilities and scores, the folds' vote (`decide.vote`) of the test probabilities, and
    the round summary, from the folds of round r that have finished. One process at a time: with
    folds trained by several, the last to write has seen every fold the others finished."""
    with ctx.run.round_lock(r):
        return _aggregate_round(ctx, r, wall_s)


def _aggregate_round(ctx: Context, r: int, wall_s: float | None) -> dict:
    run, task, heads = ctx.run, ctx.task, ctx.heads
    done = [k for k in range(ctx.cfg.train.folds) if fold_finished(ctx, r, k)]
    if not done:
        raise FileNotFoundError(f"{run.round_dir(r)}: no finished fold")
    factors = factor_values(ctx.table.train, task)
    oofs = [load_npz(run.fold_dir(r, k) / "oof.npz") for k in done]
    tests = [load_npz(run.fold_dir(r, k) / "test.npz") for k in done] if ctx.table.test is not None else None
    for i, k in enumerate(done):
        check_identities(ctx, r, k, oofs[i], tests[i] if tests else None)
    rows = np.concatenate([o["rows"] for o in oofs])
    order = np.argsort(rows)
    # every output the models have: the heads, and auxiliary outputs where configured
    oof = {key[2:]: np.concatenate([o[key] for o in oofs])[order] for key in oofs[0] if key.startswith("p_")}
    rows = rows[order]
    oof_scores = score_probs(task, heads, oof, factors[rows])
    numbers = {f: v[rows] for f, v in numeric_values(ctx.table.train, task).items()}
    train_look, test_look = pictures_likeness(ctx) if ctx.cfg.decide.subjects is not None else (None, None)
    oof_look = train_look[rows] if train_look is not None else None
    save_npz(run.round_dir(r) / "oof.npz", rows=rows, group=ctx.table.train["group"].to_numpy().astype(str)[rows],
             factors=factors[rows], fold=ctx.folds[rows], **{f"p_{h}": p for h, p in oof.items()},
             **{f"value_{f}": v for f, v in numbers.items()},
             **({"likeness": oof_look} if oof_look is not None else {}))
    # two figures per fold, named for how they were made: the epoch was picked by its validation F1
    # on the plain images; the fold's OOF predictions average the TTA views
    fold_scores = {}
    for k, o in zip(done, oofs):
        metrics = pd.read_csv(run.fold_dir(r, k) / "metrics.csv")
        best = metrics.loc[metrics["val_f1"].idxmax()]
        fold_oof = score_probs(task, heads, head_probs(o), factors[o["rows"]])
        fold_scores[str(k)] = {"best_epoch": int(best["epoch"]), "val_f1_no_tta": float(best["val_f1"]),
                               "oof_f1_tta": fold_oof["f1"],
                               # its epochs' time, whichever invocations trained them (a resumed fold too)
                               "train_s": round(float(metrics["train_s"].sum() + metrics["validate_s"].sum()), 1)}
    if tests is not None:
        test = vote([head_probs(t) for t in tests], ctx.cfg.decide.vote)
        save_npz(run.round_dir(r) / "test_probs.npz", image_id=ctx.table.test_ids(),
                 **{f"p_{h}": p for h, p in test.items()}, **({"likeness": test_look} if test_look is not None else {}))
    # folds trained elsewhere (other shells or machines, `--fold K`) join when they are done: the
    # last process to finish one rebuilds this aggregate with every fold
    missing = {str(k): run.why_missing(r, k) for k in range(ctx.cfg.train.folds) if k not in done}
    summary = {"round": r, "folds_done": done, "folds_missing": missing, "complete": not missing, "oof": oof_scores, "oof_tta": list(ctx.cfg.aug.tta), "folds": fold_scores,
               "train_ids": {str(k): as_id(o.get("train_id")) for k, o in zip(done, oofs)},
               "train_s": round(sum(f["train_s"] for f in fold_scores.values()), 1),
               "wall_s": round(wall_s, 1) if wall_s is not None else None}  # of the invocation that wrote this
    if is_active(task, ctx.cfg):
        summary["decision"] = decide_round(run.round_dir(r), task, heads, oof, factors[rows], numbers,
                                           ctx.folds[rows], ctx.cfg, oof_look)
    pseudo_file = run.round_dir(r) / "pseudo.csv"
    if pseudo_file.exists():
        summary["pseudo_added"] = {str(k): int(n) for k, n in pd.read_csv(pseudo_file).groupby("fold").size().items()}
    if (run.round_dir(r) / SOFT_FILE).exists():
        summary["pseudo_added"] = {str(k): len(ctx.table.test) for k in done}
        summary["pseudo_soft"] = True
    write_json(run.round_dir(r) / "summary.json", summary)
    plot_round(run, r)
    update_run_summary(run)
    return summary


def update_run_summary(run: RunDir) -> None:
    rounds = [read_json(run.round_dir(r) / "summary.json") for r in run.rounds()]
    skipped = len(pd.read_csv(run.skipped)) if run.skipped.exists() else 0
    write_json(run.summary, {"latest_round": rounds[-1]["round"], "skipped": skipped, "rounds": rounds})


def pictures_likeness(ctx: Context) -> tuple[np.ndarray, np.ndarray | None]:
    """(train, test) pictures' likeness (subjects.likeness), from the decoded images."""
    train, test = ((ctx.train_images, ctx.test_images) if ctx.train_images is not None
                   else load_images(ctx.cfg, ctx.table))
    return likeness(train), likeness(test) if test is not None else None


def resume_run(run_dir: str | Path, overrides: list[str] = (), progress=None) -> dict:
    """`mt resume`: finish the latest round a killed `mt train` or `mt pseudo-label` left, from the run
    directory alone: every fold not done and not held by another process. Finished folds are kept;
    interrupted ones carry on from their last.pt."""
    # a run stopped between its config.yaml and its folds.csv gets the folds `mt train` would have written
    ctx = reopen_context(run_dir, every_fold(overrides), progress, make_missing_folds=True)
    dist.on_main(ctx.run.sweep_killed_writes)
    started = ctx.run.started_rounds()
    r = started[-1] if started else 0
    if not all(fold_finished(ctx, r, k) for k in range(ctx.cfg.train.folds)):  # else only the results are rebuilt
        check_checkpoint_place(ctx.run, ctx.cfg)
        check_model(ctx.cfg.model)  # the checkpoint the run started from is still there, unchanged
    check_round_labels(ctx, r)
    check_finished_folds(ctx, r)
    return train_round(ctx, r, progress, resume=True)


def check_finished_folds(ctx: Context, r: int) -> None:
    """The folds of round r already finished still predict the images the task's tables list, and
    they and the folds killed part-way (their last.pt) were trained under the settings config.yaml
    holds: an edited table or config.yaml stops `mt resume` here, before the unfinished folds train
    on it (a killed fold would carry on its old schedule under new settings) or a finished round is
    rebuilt."""
    trained = {}
    for k in range(ctx.cfg.train.folds):
        fold_dir = ctx.run.fold_dir(r, k)
        if fold_finished(ctx, r, k):
            oof = load_npz(fold_dir / "oof.npz")
            check_identities(ctx, r, k, oof, load_npz(fold_dir / "test.npz") if ctx.table.test is not None else None)
            trained[k] = oof.get("settings")
        elif (fold_dir / "last.pt").exists():  # an older mt's last.pt has no settings: not checked
            trained[k] = load_torch(fold_dir / "last.pt", "; delete it, and `mt resume` trains the fold from its "
                                    "start").get("settings")
    ctx.run.check_fold_settings(r, trained, run_settings_hashes(ctx.run, ctx.cfg), former_checkpoint_hint(ctx.cfg))


def check_round_labels(ctx: Context, r: int) -> None:
    """A pseudo-label round has its labels: without them its folds would train as a plain copy of
    round 0 and pass for a pseudo-label round (a round killed before its labels were written)."""
    round_dir = ctx.run.round_dir(r)
    if r > 0 and not (round_dir / "pseudo.csv").exists() and not (round_dir / SOFT_FILE).exists():
        raise RunError(f"{round_dir}: a pseudo-label round without its labels (neither pseudo.csv nor {SOFT_FILE}): "
                       f"it was stopped before they were written. `mt pseudo-label --run {ctx.run.root}` makes "
                       f"round {r} again from round {r - 1}; or remove {round_dir} to leave the run at round {r - 1}")


def checked_settings(cfg: Config, task: Task, heads: list[Head]) -> Config:
    """The settings' own checks, before any data is read or anything written (a bad backbone, heads,
    checkpoint, device, process count, training bins or augmentation): `cfg` with its checkpoint's
    digest pinned."""
    cfg = cfg.model_copy(update={"model": check_model(cfg.model, heads)})
    check_training_bins(task, cfg)
    check_processes(cfg)
    resolve_device(cfg.train.device)
    if cfg.aug.backend == "albumentations":
        check_albumentations(cfg.aug.train, tuple(cfg.data.img_size))
    if cfg.train.tensorboard:
        tensorboard_writer_class()
    return cfg


def train_run(cfg: Config, out: str | Path, progress=None, force: bool = False, on_epoch=None,
              started: float | None = None) -> dict:
    """`mt train`: round 0 of a run; `force` clears an existing run in `out` first. `on_epoch(fold,
    epoch, row)` sees every epoch's metrics row (folds trained one after another only). `started`
    (time.perf_counter()): when the command began, where that was before this call."""
    # a time limit is the whole command's: reading and decoding count, and what came before this call
    started = time.perf_counter() if started is None else started
    run = RunDir(out)
    task, heads = build_task(cfg)
    # check, read and decode everything before touching the run directory: bad settings, a bad table
    # or an undecodable image stop here, with nothing written
    cfg = checked_settings(cfg, task, heads)
    device = resolve_device(cfg.train.device)
    table = read_checked(cfg, task, progress)
    check_writable(run.root)  # before the cache build, which may take long
    if dist.world() > 1:  # rank 0 decodes into the cache first; the others then find it there
        dist.on_main(lambda: load_images(cfg, table, progress) and None)
    images = load_images(cfg, table, progress if dist.is_main() else None)
    if cfg.train.time_limit_s:
        say = progress.console.print if progress else print
        say = say if dist.is_main() else (lambda _: None)
        # a run already there (`--fold K` from another shell) keeps its epochs: checked before the probe
        kept = None if force else dist.on_main(epochs_of_run, run, cfg, say)
        cfg = kept if kept is not None else fit_epochs(cfg, table, images, dist.device_for(device), progress, say,
                                                              time.perf_counter() - started)
    dist.on_main(write_run_start, run, cfg, task, force, table)
    ctx = open_context(run, cfg, progress, table, images)
    return train_round(ctx, 0, progress=progress, on_epoch=on_epoch) | {"skipped": len(table.skipped)}


def write_run_start(run: RunDir, cfg: Config, task: Task, force: bool, table) -> None:
    """What `mt train` writes before the first fold: config.yaml, skipped.csv and folds.csv. The folds
    are made first, so that data they cannot be made from leaves the directory as it was."""
    new_folds = force or not run.folds.exists()
    folds = make_folds(table.train, task, cfg.train.folds, cfg.train.fold_seed) if new_folds else None
    claim_run_dir(run, cfg, force)
    if folds is not None:
        atomic_write_text(run.folds, folds.to_csv(index=False))
    if not table.skipped.empty:
        atomic_write_text(run.skipped, skipped_listing(cfg, table.skipped))
