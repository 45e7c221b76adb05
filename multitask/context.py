"""What every stage of a run needs, loaded once: the config, the task and its heads, the image
table, the folds and the decoded caches. A run directory holds everything to rebuild it.

`read_data` is the one place that knows a task's kind: the competition preset reads its layout,
a table task its table; both give the same image table, and nothing after this module asks which.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from multitask.config import Config, ConfigError, TableTaskCfg, dump_config, load_config
from multitask.data.cache import ImageDecodeError, cached_images, undecodable_error
from multitask.data.folds import assign_folds, check_labels, make_folds, read_folds
from multitask.data.layout import read_layout
from multitask.data.table import DataError, ImageTable, read_table
from multitask.labels import FLAT_HEAD, Factor, Head, Task, mask_task
from multitask.lock import LOCK, describe_holder, held_lock
from multitask.numeric import numerics
from multitask.run import RunDir, RunError, atomic_write_text, provenance_file
from multitask.subjects import subject_spec

# Settings that may differ between invocations on one run directory without changing what it holds.
PER_INVOCATION = {("train", "fold"), ("train", "device"), ("train", "jobs"), ("pseudo", "precision"), ("pseudo", "rounds"),
                  ("pseudo", "soft"), ("pseudo", "bound"),
                  ("data", "cache_dir"), ("data", "decode_workers"), ("data", "num_workers"),
                  ("train", "eval_batch_size"), ("train", "tensorboard")}


# Where things are, not what they are: a data set (or a teacher run, or a checkpoint file) may move,
# and the run with it. Whether there is one stays a setting (a run started from a checkpoint or from
# scratch), and so does what a checkpoint is: its digest, model.checkpoint_sha256.
LOCATIONS = {("data_root",), ("task", "table"), ("task", "images"), ("task", "test"), ("distill", "teacher"),
             ("model", "checkpoint")}
# Locations that earlier versions of mt hashed as settings, place and all (and the other locations
# not at all): folds trained then carry such a hash.
FORMER_SETTINGS = {("model", "checkpoint")}
_LEFT_OUT = object()


def settings_hash(cfg: Config, written: dict | None = None, former: bool = False) -> str:
    """The run's settings, the per-invocation ones left out and locations counted by whether there is
    one, not where: every fold's outputs carry it, so a fold trained under other settings than
    config.yaml now holds is found, not voted (the images themselves are checked by their
    identities, kfold.check_identities). `written` is the run's config.yaml as it was written: a
    setting it does not name was added to mt after the run was made, is at its default (what the run
    did), and is left out, so that a newer mt still reads the run's folds. `former`: the hash as mt
    computed it before FORMER_SETTINGS became locations."""
    def counted(key: tuple, value):
        if key in PER_INVOCATION:
            return _LEFT_OUT
        if former:
            return value if key in FORMER_SETTINGS else _LEFT_OUT if key in LOCATIONS else value
        return value is not None if key in LOCATIONS else value

    def kept(node: dict, like, prefix: tuple = ()) -> dict:
        out = {}
        for k, v in node.items():
            if like is not None and k not in like:
                continue
            value = kept(v, like.get(k) if isinstance(like, dict) else None, prefix + (k,)) if isinstance(v, dict) \
                else counted(prefix + (k,), v)
            if value is not _LEFT_OUT:
                out[k] = value
        return out
    return hashlib.sha1(json.dumps(kept(cfg.model_dump(mode="json"), written), sort_keys=True).encode()).hexdigest()[:16]


def former_checkpoint_hint(cfg: Config) -> str:
    """What a settings mismatch may be in a run started from a checkpoint: folds of an earlier mt hold
    the checkpoint's place in their settings (FORMER_SETTINGS), so for them it cannot move."""
    if not cfg.model.checkpoint:
        return ""
    return (". If only model.checkpoint moved and the folds were trained by an earlier mt (which counted its "
            "place as a setting), write its old place back and put the file there (or a link to it)")


def run_settings_hashes(run: RunDir, cfg: Config) -> tuple[str, str]:
    """settings_hash of a run's settings, against the settings its config.yaml names (all of them in
    a folder without one: the time-limit probe's scratch run): the hash new folds carry, then the
    former one, which folds trained by an earlier mt carry and which still counts for them."""
    import yaml

    written = yaml.safe_load(run.config.read_text(encoding="utf-8")) if run.config.exists() else None
    return settings_hash(cfg, written), settings_hash(cfg, written, former=True)


def check_round(run: RunDir, r: int, cfg: Config) -> None:
    """Round r may be read: its results come from the fold outputs there now, made under these settings."""
    run.check_round_current(r, cfg.train.folds, run_settings_hashes(run, cfg), former_checkpoint_hint(cfg))


def round_trainings(run: RunDir, r: int, cfg: Config) -> dict | None:
    """Which trainings made round r's predictions, to tell a file made from them (an export, a
    submission) from one of the run as it is now: its folds' training ids, or an ensemble's members'
    rounds and theirs (it has no fold models of its own). None for a round made before training ids."""
    if cfg.ensemble is not None:
        return {"member_rounds": cfg.ensemble.rounds, "member_train_ids": cfg.ensemble.train_ids}
    return run.round_train_ids(r)


def check_ensemble_members(cfg: Config) -> None:
    """An ensemble's members (and theirs) may be read, and still hold the fold models the ensemble's
    weights and decision were fitted on; nothing to check for a run that is not an ensemble."""
    ens = cfg.ensemble
    if ens is None:
        return
    for i, (path, r) in enumerate(zip(ens.runs, ens.rounds)):
        member = RunDir(path)
        if not member.config.exists():
            raise RunError(f"{path}: the ensemble's member run is not there; if it moved, write its new place in "
                           f"ensemble.runs of the ensemble's config.yaml (an ensemble's models are its members')")
        member_cfg = load_run_config(member)
        check_round(member, r, member_cfg)
        check_ensemble_members(member_cfg)
        if ens.train_ids is not None and (member.round_train_ids(r) or {}) != ens.train_ids[i]:
            raise RunError(f"{member.round_dir(r)}: retrained since the ensemble was made, so its weights and "
                           f"decision were fitted on other models; make the ensemble again (`mt ensemble`)")


@dataclass
class Context:
    run: RunDir
    cfg: Config
    task: Task
    heads: list[Head]
    table: ImageTable
    train_images: np.ndarray | None  # None when opened without images (submit)
    test_images: np.ndarray | None
    folds: np.ndarray  # fold of each train row


def no_test_images(ctx: Context, what: str) -> FileNotFoundError:
    """The error for a command that needs test images the run's data has none of, naming where it looked."""
    where = (f"no task.test in the table task {ctx.cfg.task.table}" if isinstance(ctx.cfg.task, TableTaskCfg)
             else f"no eval/ in the competition root {ctx.cfg.data_root}")
    return FileNotFoundError(f"{ctx.run.root}: the task has no test images ({where}): {what}")


def task_of(cfg: Config) -> Task:
    if isinstance(cfg.task, TableTaskCfg):
        return Task("table", tuple(Factor.binned(f.name, f.bins, f.integer) if f.bins is not None else Factor(f.name, tuple(f.classes))
                                   for f in cfg.task.factors))
    return mask_task(cfg.data.age_bins)


def build_task(cfg: Config) -> tuple[Task, list[Head]]:
    task = task_of(cfg)
    heads = task.heads(cfg.heads)
    names = [h.name for h in heads]
    unknown = sorted(set(cfg.losses) - set(names))
    if unknown:
        raise ConfigError(f"losses given for {unknown}, which are not among the heads {','.join(names)!r}")
    if cfg.train.sampler not in ("none", FLAT_HEAD, *names):
        raise ConfigError(f"train.sampler {cfg.train.sampler!r} is neither 'none', {FLAT_HEAD!r} (the final class) "
                          f"nor one of the heads {names}")
    soft_f1_weighted = [n for n in names if cfg.loss_for(n).class_weights and cfg.loss_for(n).name == "soft_f1"]
    if soft_f1_weighted:
        raise ConfigError(f"losses {soft_f1_weighted}: soft_f1 weighs every class alike; class_weights do not apply")
    numerics(task, cfg)  # numeric settings name numeric factors of this task
    subject_spec(task, cfg)  # and decide.subjects names its factors and classes
    return task, heads


def read_data(cfg: Config, task: Task) -> ImageTable:
    if isinstance(cfg.task, TableTaskCfg):
        return read_table(cfg.task, task, cfg.data.skip_bad)
    if not cfg.data_root:
        raise ConfigError("no data root: pass --data DATA (or set data_root in the config)")
    return read_layout(cfg.data_root, cfg.data.age_bins, cfg.data.skip_bad)


def read_checked(cfg: Config, task: Task, progress=None) -> ImageTable:
    """`read_data` for a new run, with every problem at once: when the reader refuses rows, the
    images of the rows it accepted are decoded too, and the files that cannot be decoded join the
    same error, so one pass over the data finds everything to fix."""
    try:
        return read_data(cfg, task)
    except DataError as refused:
        if cfg.data.skip_bad:
            raise
        loose = cfg.model_copy(update={"data": cfg.data.model_copy(update={"skip_bad": True})})
        test_failed = None
        try:
            table = read_data(loose, task)
            refused_by_reader = len(table.skipped)  # the decoder's findings are appended after these
            load_images(loose, table, progress)
        except DataError:
            raise refused from None
        except ImageDecodeError as e:  # the test images' (the training images' were left out, and listed)
            test_failed = e
        undecodable = table.skipped.iloc[refused_by_reader:]
        if len(undecodable):
            refused.args = (f"{refused}\nand {len(undecodable)} image(s) of the rows it accepted cannot be decoded:\n  "
                            + "\n  ".join(f"{w}: {path}: {why}" for w, path, why in
                                           undecodable[["where", "path", "reason"]].head(50).itertuples(index=False)),)
        if test_failed is not None:
            refused.args = (f"{refused}\nand {test_failed}",)
        raise refused from None


def differing_keys(a: dict, b: dict, prefix: tuple = ()) -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        key = prefix + (k,)
        if key in PER_INVOCATION:
            continue
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += differing_keys(va, vb, key)
        elif va != vb:
            out.append(".".join(key))
    return out


def moved_only(a: dict, b: dict, changed: list[str]) -> bool:
    """The `changed` keys between settings `a` and `b` (differing_keys) are all locations with a
    place on both sides: something moved, nothing was added, removed or set otherwise."""
    def at(node, key):
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node
    return bool(changed) and all(tuple(k.split(".")) in LOCATIONS and at(a, k) is not None and at(b, k) is not None
                                 for k in changed)


def clear_run(run: RunDir) -> None:
    """`--force`: remove everything `mt` wrote into a run directory (every round, the folds, the
    config, the summaries and the submission); other files stay. Refused while a live process holds a
    lock in it: its folds would be written on into the new run."""
    held = held_lock(sorted(run.root.rglob(LOCK)))
    if held:
        lock, holder = held
        doing = "trained" if lock.parent.name.startswith("fold") else "written"  # a fold's lock, or its round's
        raise ConfigError(f"{lock.parent} is {describe_holder(holder, doing, lock)}: --force would remove what it "
                          f"is writing; stop that process first")
    for r in run.started_rounds():
        shutil.rmtree(run.round_dir(r))
    for path in (run.summary, run.submission, run.submission_onnx, provenance_file(run.submission),
                 provenance_file(run.submission_onnx), run.folds, run.config, run.skipped, run.teacher, run.report,
                 run.onnx, run.onnx_int8):
        path.unlink(missing_ok=True)


def claim_run_dir(run: RunDir, cfg: Config, force: bool = False) -> None:
    """Write config.yaml. An existing run is refused unless `force` starts it over: other settings
    would mix two runs in one directory, and the same settings would silently retrain folds and keep
    pseudo-label rounds made from the old models. Folds of round 0 that were never started may be
    added (`--fold K` from another shell or machine)."""
    if force:
        clear_run(run)
    if run.config.exists():
        old = load_config(run.config)
        then, now = old.model_dump(mode="json"), cfg.model_dump(mode="json")
        diff = differing_keys(then, now)
        if moved_only(then, now, diff):
            raise ConfigError(f"{run.root} already holds this run with {', '.join(diff)} at another place; if it "
                              f"moved, write its new place in {run.config} and train on (--force would remove "
                              f"every fold the run has)")
        if diff:
            raise ConfigError(f"{run.root} already holds a run with other settings ({', '.join(diff)}); "
                              f"choose another --out, or --force to start it over with these settings")
        selected = cfg.train.selected_folds()
        started = [k for k in selected if run.fold_dir(0, k).is_dir() and any(run.fold_dir(0, k).iterdir())]
        later = [r for r in run.started_rounds() if r > 0]
        if started or later:
            held = f"round 0 fold(s) {started} already trained or started" if started else "round 0"
            held += f", and pseudo-label round(s) {later}" if later else ""
            raise ConfigError(f"{run.root} already holds a run ({held}): `mt resume --run {run.root}` finishes an "
                              f"interrupted round; --force starts it over (every round is removed)")
    atomic_write_text(run.config, dump_config(cfg))


def load_images(cfg: Config, table: ImageTable, progress=None) -> tuple[np.ndarray, np.ndarray | None]:
    """The decoded train and test caches (built on first use). An image that cannot be decoded is
    reported with the table line it came from, all of them at once; with `data.skip_bad`, training
    images that cannot be decoded are left out of `table` instead (test images never are: each
    needs a prediction)."""
    size = tuple(cfg.data.img_size)

    def images(frame, what: str) -> np.ndarray:
        paths = frame["path"].tolist()

        def say_decoding():  # minutes on a large set: said, for logs with no bar
            progress.console.print(f"decoding {len(paths)} {what} images at {size[0]}x{size[1]} px into the cache "
                                   f"(once: later commands and runs read them from there)", soft_wrap=True)
        tid = progress.add_task(f"decoding {what} images", total=len(paths)) if progress else None
        try:
            arr = cached_images(paths, size, cfg.data.cache_dir, cfg.data.decode_workers,
                                on_progress=(lambda n: progress.update(tid, advance=n)) if progress else None,
                                on_build=say_decoding if progress else None)
        except ImageDecodeError as e:
            if not e.bad:
                raise
            where = frame["where"].tolist() if "where" in frame else None
            raise undecodable_error(paths, e.bad, where) from None
        finally:
            if progress:
                progress.remove_task(tid)
        return arr

    failed = {}  # the training images' and the test images' problems, in one error
    train = test = None
    try:
        train = images(table.train, "train")
    except ImageDecodeError as e:
        if not e.bad:
            raise
        if not cfg.data.skip_bad:
            failed["training images"] = e
        else:
            table.skip([i for i, _ in e.bad], [f"cannot be decoded ({why})" for _, why in e.bad])
            train = images(table.train, "train")
    if table.test is not None:
        try:
            test = images(table.test, "test")
        except ImageDecodeError as e:
            if not e.bad:
                raise
            failed["test images"] = e
    if len(failed) == 1:
        raise next(iter(failed.values()))
    if failed:
        raise ImageDecodeError("\n".join(f"{what}: {e}" for what, e in failed.items()))
    return train, test


def image_root(cfg: Config) -> Path:
    """The folder the task's image paths hang from: the competition root, or a table's `task.images`."""
    return Path(cfg.task.images) if isinstance(cfg.task, TableTaskCfg) else Path(cfg.data_root)


def skipped_listing(cfg: Config, skipped: pd.DataFrame) -> str:
    """RUN/skipped.csv: each item left out, why, and its path below the data's root (`id`), by which
    later commands find it again wherever the data set has moved."""
    root = image_root(cfg)
    # a table row whose image is missing, absolute or outside the images folder has no path to list
    ids = [os.path.relpath(p, root) if isinstance(p, str) and p else "" for p in skipped["path"]]
    return skipped.assign(id=ids).to_csv(index=False)


def open_context(run: RunDir, cfg: Config, progress=None, table: ImageTable | None = None,
                 images: tuple | None = None, with_images: bool = True, make_missing_folds: bool = False) -> Context:
    """Read the data and the run's folds, and build (or find) the decoded caches. Only training makes
    folds (`make_missing_folds`): a command that reads a run must not write into it, nor give it
    folds other than those its models were trained on."""
    task, heads = build_task(cfg)
    table = table or read_data(cfg, task)
    if cfg.data.skip_bad and run.skipped.exists() and images is None:
        # what the run's first read found undecodable, left out again without decoding it again
        listed = pd.read_csv(run.skipped, dtype=str, keep_default_na=False)
        if "id" in listed.columns:
            keys = [os.path.relpath(p, image_root(cfg)) for p in table.train["path"]]
        else:  # an older mt listed the paths as they were, which a moved data set no longer matches
            keys, listed["id"] = table.train["path"].tolist(), listed["path"]
        reason = {i: why for i, why in zip(listed["id"], listed["reason"]) if i}
        rows = [i for i, key in enumerate(keys) if key in reason]
        table.skip(rows, [reason[keys[i]] for i in rows])
    if run.folds.exists():
        folds_table = read_folds(run.folds)
    elif make_missing_folds:
        folds_table = make_folds(table.train, task, cfg.train.folds, cfg.train.fold_seed)
        atomic_write_text(run.folds, folds_table.to_csv(index=False))
    else:
        raise RunError(f"{run.folds}: not found; the run's folds are gone (or `mt train` was stopped before it "
                       f"wrote them): `mt resume --run {run.root}` makes them again from the same seed")
    data = cfg.data_root or (cfg.task.table if cfg.task != "mask" else "")
    folds = assign_folds(table.train, folds_table, str(run.folds), data)
    check_labels(folds_table, table.train, task, str(run.folds))
    if images is None:
        images = load_images(cfg, table, progress) if with_images else (None, None)
    return Context(run, cfg, task, heads, table, images[0], images[1], folds)


def every_fold(overrides: list[str]) -> list[str]:
    """Overrides for a later command on a run: every fold of its round unless `train.fold` is given
    (config.yaml keeps the folds a `--fold` once named)."""
    if any(o.split("=", 1)[0].strip() == "train.fold" for o in overrides):
        return list(overrides)
    return [*overrides, "train.fold=null"]


def reopen_context(run_dir: str | Path, overrides: list[str] = (), progress=None,
                   with_images: bool = True, make_missing_folds: bool = False) -> Context:
    """The context of an existing run, from its run directory alone. Overrides may change only the
    per-invocation settings: anything else would make the run differ from its config.yaml."""
    run = RunDir(run_dir)
    cfg = load_run_config(run, overrides)
    check_data_places(run, cfg)
    return open_context(run, cfg, progress, with_images=with_images, make_missing_folds=make_missing_folds)


def check_data_places(run: RunDir, cfg: Config) -> None:
    """The data the run was trained on is where config.yaml says; where it moved, say how to follow it
    (its place is a location: it may change in config.yaml, and the folds still count)."""
    if isinstance(cfg.task, TableTaskCfg):  # a table task reads no data_root, as read_data
        places = {"task.table": cfg.task.table, "task.images": cfg.task.images}
    else:
        places = {"data_root": cfg.data_root}
    for key, place in places.items():
        if place and not Path(place).exists():
            raise RunError(f"{place}: not found ({key} in {run.config}); if the data moved, write its new place "
                           f"there: where the data is may change in a run, what it is may not")


def check_checkpoint_place(run: RunDir, cfg: Config) -> None:
    """The checkpoint the run started from is where config.yaml says, for folds trained later (resume,
    a pseudo-label round); where it moved, say how to follow it (model.checkpoint is a location; its
    digest, checked when the file is read, keeps what it is)."""
    place = cfg.model.checkpoint
    if place and not Path(place).is_file():
        raise RunError(f"{place}: checkpoint file not found (model.checkpoint in {run.config}); if it moved, write "
                       f"its new place there: where it is may change in a run, what it is may not")


def load_run_config(run: RunDir, overrides: list[str] = ()) -> Config:
    if not run.config.exists():
        raise FileNotFoundError(f"{run.config}: not found; is {run.root} a run directory made by `mt train`?")
    cfg = load_config(run.config, overrides)
    written, now = load_config(run.config).model_dump(mode="json"), cfg.model_dump(mode="json")
    changed = differing_keys(written, now)
    if moved_only(written, now, changed):
        raise ConfigError(f"{', '.join(changed)}: where things are is not set per command; if it moved, write its "
                          f"new place in {run.config}, which the run's later commands read too")
    if changed:
        raise ConfigError(f"{run.config}: {', '.join(changed)} cannot change in an existing run (only "
                          f"{', '.join(sorted('.'.join(k) for k in PER_INVOCATION))} can); start another run with `mt train`")
    return cfg
