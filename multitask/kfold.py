"""A round of k-fold training over a run directory: folds, every fold's model, its OOF and test
probabilities, and the round's aggregate (OOF scores, soft-voted test probabilities).

Each fold writes its own files, and the round's aggregate is rebuilt from whichever folds are done,
so folds can be trained one at a time (`--fold K`), or by different processes into one run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from multitask.config import Config, ConfigError, dump_config, load_config
from multitask.data.cache import cached_images
from multitask.data.dataset import RowImages
from multitask.data.folds import assign_folds, check_no_leak, make_folds
from multitask.data.layout import Layout, factor_values, read_layout
from multitask.engine import FoldData, train_fold
from multitask.labels import Head, Task, mask_task
from multitask.metrics import score_probs
from multitask.parallel import run_in_workers
from multitask.predict import load_model, predict_probs, resolve_device, soft_vote
from multitask.report import plot_round
from multitask.run import RunDir, atomic_write_text, load_npz, read_json, save_npz, write_json

# Settings that may differ between invocations on one run directory without changing what it holds.
PER_INVOCATION = {("train", "fold"), ("train", "device"), ("train", "jobs"), ("pseudo", "threshold"), ("pseudo", "rounds"),
                  ("data", "cache_dir"), ("data", "decode_workers"), ("data", "num_workers")}


@dataclass
class Context:
    """What every stage of a run needs, loaded once: config, task, heads, tables and caches."""
    run: RunDir
    cfg: Config
    task: Task
    heads: list[Head]
    layout: Layout
    train_images: np.ndarray | None  # None when opened without images (submit)
    test_images: np.ndarray | None
    folds: np.ndarray  # fold of each train row


def build_task(cfg: Config) -> tuple[Task, list[Head]]:
    task = mask_task(cfg.data.age_bins)
    heads = task.heads(cfg.heads)
    unknown = sorted(set(cfg.losses) - {h.name for h in heads})
    if unknown:
        raise ConfigError(f"losses given for {unknown}, which are not among the heads {cfg.heads!r}")
    return task, heads


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


def claim_run_dir(run: RunDir, cfg: Config) -> None:
    """Write config.yaml, or check that an existing run was made with the same settings."""
    if run.config.exists():
        old = load_config(run.config)
        diff = differing_keys(old.model_dump(mode="json"), cfg.model_dump(mode="json"))
        if diff:
            raise ConfigError(f"{run.root} already holds a run with other settings ({', '.join(diff)}); "
                              f"use another --out, or the same settings to retrain folds")
    atomic_write_text(run.config, dump_config(cfg))


def read_data(cfg: Config) -> Layout:
    if not cfg.data_root:
        raise ConfigError("no data root: pass --data DATA (or set data_root in the config)")
    return read_layout(cfg.data_root, cfg.data.age_bins)


def open_context(run: RunDir, cfg: Config, progress=None, layout: Layout | None = None,
                 with_images: bool = True) -> Context:
    """Read the data, make or reuse folds, and build (or find) the decoded caches."""
    task, heads = build_task(cfg)
    layout = layout or read_data(cfg)
    if run.folds.exists():
        folds_table = pd.read_csv(run.folds, dtype={"person": str})
        check_no_leak(folds_table)
    else:
        folds_table = make_folds(layout.train, task, cfg.train.folds, cfg.train.seed)
        atomic_write_text(run.folds, folds_table.to_csv(index=False))
    folds = assign_folds(layout.train, folds_table)
    size = tuple(cfg.data.img_size)

    def images(paths: list[str], what: str) -> np.ndarray:
        tid = progress.add_task(f"decoding {what} images", total=len(paths)) if progress else None
        arr = cached_images(paths, size, cfg.data.cache_dir, cfg.data.decode_workers,
                            on_progress=(lambda n: progress.update(tid, advance=n)) if progress else None)
        if progress:
            progress.remove_task(tid)
        return arr

    train_images = images(layout.train["path"].tolist(), "train") if with_images else None
    test_images = images(layout.test["path"].tolist(), "test") if with_images and layout.test is not None else None
    return Context(run, cfg, task, heads, layout, train_images, test_images, folds)


def reopen_context(run_dir: str | Path, overrides: list[str] = (), progress=None,
                   with_images: bool = True) -> Context:
    """The context of an existing run, from its run directory alone. Overrides may change only the
    per-invocation settings: anything else would make the run differ from its config.yaml."""
    run = RunDir(run_dir)
    if not run.config.exists():
        raise FileNotFoundError(f"{run.config}: not found; is {run.root} a run directory made by `mt train`?")
    cfg = load_config(run.config, overrides)
    changed = differing_keys(load_config(run.config).model_dump(mode="json"), cfg.model_dump(mode="json"))
    if changed:
        raise ConfigError(f"{run.config}: {', '.join(changed)} cannot change in an existing run (only "
                          f"{', '.join(sorted('.'.join(k) for k in PER_INVOCATION))} can); start another run with `mt train`")
    return open_context(run, cfg, progress, with_images=with_images)


def pseudo_labelled(ctx: Context, r: int) -> tuple[RowImages, np.ndarray] | None:
    """The test images round r adds to every training fold, with their pseudo factor values, read
    from the round's pseudo.csv (so a worker process rebuilds them from the run directory alone)."""
    path = ctx.run.round_dir(r) / "pseudo.csv"
    if not path.exists():
        return None
    table = pd.read_csv(path, dtype={"ImageID": str})
    row_of = {image_id: i for i, image_id in enumerate(ctx.layout.test["image_id"].astype(str))}
    missing = sorted(set(table["ImageID"]) - set(row_of))
    if missing:
        raise ValueError(f"{path}: images not in {ctx.cfg.data_root}/eval/info.csv: {missing[:5]}")
    rows = np.array([row_of[i] for i in table["ImageID"]], dtype=np.int64)
    return RowImages.of(ctx.test_images, rows), ctx.task.decode(table["class"].to_numpy())


def fold_finished(ctx: Context, r: int, k: int) -> bool:
    fold_dir = ctx.run.fold_dir(r, k)
    return (fold_dir / "oof.npz").exists() and (ctx.test_images is None or (fold_dir / "test.npz").exists())


def train_round_fold(ctx: Context, r: int, k: int, device: torch.device, progress=None,
                     resume: bool = False) -> None:
    """Fold k of round r: train (pseudo-labelled images join the training set, never the validation
    set), then write the best checkpoint's OOF and test probabilities. With `resume`, training carries
    on from the fold's last.pt where there is one."""
    cfg = ctx.cfg
    factors = factor_values(ctx.layout.train, ctx.task)
    tr, va = np.flatnonzero(ctx.folds != k), np.flatnonzero(ctx.folds == k)
    train_images, train_factors = RowImages.of(ctx.train_images, tr), factors[tr]
    pseudo = pseudo_labelled(ctx, r)
    if pseudo is not None:
        train_images = train_images.concat(pseudo[0])
        train_factors = np.concatenate([train_factors, pseudo[1]])
    data = FoldData(train_images, train_factors, RowImages.of(ctx.train_images, va), factors[va])
    fold_dir = ctx.run.fold_dir(r, k)
    train_fold(cfg, ctx.task, ctx.heads, data, fold_dir, seed=cfg.train.seed * 1000 + r * 100 + k,
               device=device, progress=progress, label=f"round {r} fold {k}", resume=resume)
    model = load_model(fold_dir / "best.pt", cfg, ctx.heads, device)
    oof = predict_probs(model, data.val_images, cfg, device)
    save_npz(fold_dir / "oof.npz", rows=va, **{f"p_{h}": p for h, p in oof.items()})
    if ctx.test_images is not None:
        test = predict_probs(model, RowImages.of(ctx.test_images), cfg, device)
        save_npz(fold_dir / "test.npz", **{f"p_{h}": p for h, p in test.items()})


def _fold_worker(payload: dict, folds, device: str, progress) -> None:
    """One worker process of a parallel round: open the run (the caches are already built), then
    train the folds handed to it."""
    cfg = Config.model_validate(payload["cfg"])
    ctx = open_context(RunDir(payload["run"]), cfg, progress)
    for k in folds:
        train_round_fold(ctx, payload["round"], k, torch.device(device), progress, payload["resume"])


def worker_devices(name: str) -> list[str]:
    """`auto` spreads workers over every visible GPU; any other name puts them all on that device."""
    if name == "auto" and torch.cuda.device_count() > 1:
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [str(resolve_device(name))]


def train_round(ctx: Context, r: int, progress=None, resume: bool = False) -> dict:
    """Train the selected folds of round r, one after another or `train.jobs` at once in worker
    processes, and rebuild the round's aggregate."""
    cfg = ctx.cfg
    folds = cfg.train.fold if cfg.train.fold is not None else list(range(cfg.train.folds))
    if resume:
        folds = [k for k in folds if not fold_finished(ctx, r, k)]
    if cfg.train.jobs > 1 and len(folds) > 1:
        payload = {"cfg": cfg.model_dump(mode="json"), "run": str(ctx.run.root), "round": r, "resume": resume}
        run_in_workers(_fold_worker, payload, folds, cfg.train.jobs, worker_devices(cfg.train.device), progress)
    else:
        device = resolve_device(cfg.train.device)
        for k in folds:
            train_round_fold(ctx, r, k, device, progress, resume)
    return aggregate_round(ctx, r)


def aggregate_round(ctx: Context, r: int) -> dict:
    """OOF probabilities and scores, soft-voted test probabilities, and the round summary, from the
    folds of round r that have finished."""
    run, task, heads = ctx.run, ctx.task, ctx.heads
    done = [k for k in range(ctx.cfg.train.folds) if fold_finished(ctx, r, k)]
    if not done:
        raise FileNotFoundError(f"{run.round_dir(r)}: no finished fold")
    factors = factor_values(ctx.layout.train, task)
    oofs = [load_npz(run.fold_dir(r, k) / "oof.npz") for k in done]
    rows = np.concatenate([o["rows"] for o in oofs])
    order = np.argsort(rows)
    oof = {h.name: np.concatenate([o[f"p_{h.name}"] for o in oofs])[order] for h in heads}
    rows = rows[order]
    oof_scores = score_probs(task, heads, oof, factors[rows])
    save_npz(run.round_dir(r) / "oof.npz", rows=rows, person=ctx.layout.train["person"].to_numpy().astype(str)[rows],
             factors=factors[rows], fold=ctx.folds[rows], **{f"p_{h}": p for h, p in oof.items()})
    fold_scores = {}
    for k in done:
        metrics = pd.read_csv(run.fold_dir(r, k) / "metrics.csv")
        best = metrics.loc[metrics["val_f1"].idxmax()]
        fold_scores[str(k)] = {"best_epoch": int(best["epoch"]), "val_f1": float(best["val_f1"])}
    if ctx.test_images is not None:
        test = soft_vote([{h.name: load_npz(run.fold_dir(r, k) / "test.npz")[f"p_{h.name}"] for h in heads}
                          for k in done])
        save_npz(run.round_dir(r) / "test_probs.npz", image_id=ctx.layout.test["image_id"].to_numpy().astype(str),
                 **{f"p_{h}": p for h, p in test.items()})
    summary = {"round": r, "folds_done": done, "oof": oof_scores, "folds": fold_scores}
    pseudo_file = run.round_dir(r) / "pseudo.csv"
    if pseudo_file.exists():
        summary["pseudo_added"] = int(len(pd.read_csv(pseudo_file)))
    write_json(run.round_dir(r) / "summary.json", summary)
    plot_round(run, r)
    update_run_summary(run)
    return summary


def update_run_summary(run: RunDir) -> None:
    rounds = [read_json(run.round_dir(r) / "summary.json") for r in run.rounds()]
    write_json(run.summary, {"latest_round": rounds[-1]["round"], "rounds": rounds})


def load_round_test_probs(ctx: Context, r: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    path = ctx.run.round_dir(r) / "test_probs.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no test probabilities (does {ctx.cfg.data_root}/eval exist?)")
    z = load_npz(path)
    return z["image_id"], {h.name: z[f"p_{h.name}"] for h in ctx.heads}


def resume_run(run_dir: str | Path, overrides: list[str] = (), progress=None) -> dict:
    """`mt resume`: finish the latest round a killed `mt train` or `mt pseudo-label` left, from the run
    directory alone. Finished folds are kept; interrupted ones carry on from their last.pt."""
    ctx = reopen_context(run_dir, overrides, progress)
    started = ctx.run.started_rounds()
    return train_round(ctx, started[-1] if started else 0, progress, resume=True)


def train_run(cfg: Config, out: str | Path, progress=None) -> dict:
    """`mt train`: round 0 of a run."""
    run = RunDir(out)
    build_task(cfg)  # refuse bad heads or data before touching the run directory
    layout = read_data(cfg)
    claim_run_dir(run, cfg)
    ctx = open_context(run, cfg, progress, layout)
    return train_round(ctx, 0, progress=progress)
