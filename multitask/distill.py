"""`mt distill`: one student model that learns what a finished run predicts, so that the run's
many forward passes (folds × TTA views, or several runs) become one.

The teacher is the round `submit` uses: its fold ensemble with its TTA views and its auxiliary
blend (or an `mt ensemble` run), read as final-class probabilities on every training image and,
by default, every test image: the unlabelled images are where a student catches up with its
teachers. Each student head learns the teacher's probabilities summed out to its factors, with the
true label mixed in at `true_weight` where there is one (numeric.Targets does the mixing).

The student is a run directory of its own (train.folds = 1): it trains on every group but those of
one teacher fold (`val_fold`), which it keeps out to pick its epoch and to report on. Those figures
are the student's own validation, not an OOF estimate of the run: the teacher's models that
labelled the other images saw these groups. RUN/teacher.npz holds the teacher's probabilities, so
`mt resume` needs nothing but the student's directory; the student takes the teacher's decision
offsets (its probabilities imitate the teacher's, blend included).
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from multitask.config import Config, ConfigError, DistillCfg, apply_overrides, validate
from multitask.context import (build_task, check_checkpoint_place, check_round, claim_run_dir, clear_run, load_run_config,
                               open_context, reopen_context, task_of)
from multitask.data.cache import undecodable_error
from multitask.data.folds import with_labels
from multitask.decide import Decision, blend_only, load_decision, predict_classes
from multitask.kfold import checked_settings, train_round
from multitask.labels import FLAT_HEAD
from multitask.outputs import CHUNK
from multitask.inference import DecodedImages, run_outputs
from multitask.run import RunDir, atomic_write_text, save_npz, write_json


def teacher_probs(run: RunDir, r: int, cfg: Config, decision: Decision | None, paths: list[str], progress=None,
                  chunk: int = CHUNK, device: str | None = None) -> np.ndarray:
    """Round r's final-class probabilities on `paths`: its auxiliary blend in, its offsets out (the
    student takes them over as its own decision). On `device` (the student's), in place of the
    teacher's own: a teacher trained on a GPU teaches on a machine without one."""
    overrides = [f"train.device={device}"] if device else []
    task, heads = build_task(cfg)
    blend = blend_only(decision)
    models, out, bad = {}, [], []
    tid = progress.add_task("teacher predictions", total=len(paths)) if progress else None
    for start in range(0, len(paths), chunk):
        decoded = DecodedImages(paths[start:start + chunk], cfg.data.decode_workers)
        bad += [(start + i, why) for i, why in decoded.bad(tuple(cfg.data.img_size))]
        if not bad:  # after a failure the later chunks are only decoded, so that the error lists them all
            probs = run_outputs(run, r, overrides, decoded, np.arange(len(decoded.paths)), None, models)
            out.append(predict_classes(task, heads, probs, cfg, blend)[0].astype(np.float32))
        if progress:
            progress.update(tid, advance=len(decoded.paths))
    if progress:
        progress.remove_task(tid)
    if bad:
        raise undecodable_error(paths, bad)
    return np.concatenate(out)


def student_config(teacher: Config, teacher_dir: Path, r: int, backbone: str | None, img_size: tuple[int, int] | None,
                   epochs: int | None, heads: str | None, true_weight: float, unlabeled: bool, val_fold: int,
                   overrides: list[str]) -> Config:
    """The teacher's settings with the student's model, size, epochs and heads; no auxiliary outputs
    and no decision of its own (the teacher's probabilities already hold both; a student serves
    pictures one at a time, so it reads no subjects either), and one view at
    prediction: the teacher's TTA views are in the targets already, and a second view would halve
    the speed the student is for (measured in docs/PERFORMANCE.md). `overrides` come last."""
    if heads is None:
        heads = teacher.heads if teacher.ensemble is None else None  # an ensemble votes final classes: a head per factor
    model = teacher.model
    if backbone:
        # the teacher's checkpoint does not fit another backbone, and a backbone without weights to
        # keep would stay random if it stayed frozen
        model = model.model_copy(update={"backbone": backbone, "checkpoint": None, "checkpoint_sha256": None,
                                         "freeze_backbone": model.freeze_backbone and model.pretrained})
    numeric = {name: c.model_copy(update={"aux": "none"}) for name, c in teacher.numeric.items()}
    raw = teacher.model_copy(update={
        "heads": heads, "model": model, "numeric": numeric, "ensemble": None,
        "aug": teacher.aug.model_copy(update={"tta": ["none"]}),
        "data": teacher.data.model_copy(update={"img_size": tuple(img_size)} if img_size else {}),
        "train": teacher.train.model_copy(update={"folds": 1, "fold": None} | ({"epochs": epochs} if epochs is not None else {})),
        "decide": teacher.decide.model_copy(update={"offsets": "none", "blend_aux": False, "subjects": None}),
        "distill": DistillCfg(teacher=str(teacher_dir.resolve()), round=r, true_weight=true_weight,
                              unlabeled=unlabeled, val_fold=val_fold),
    }).model_dump(mode="json")
    names = [h.name for h in task_of(teacher).heads(heads)]
    raw["losses"] = {h: c for h, c in raw["losses"].items() if h in names}  # the teacher's losses of heads kept
    if raw["train"]["sampler"] not in ("none", FLAT_HEAD, *names):
        raw["train"]["sampler"] = "none"  # it named a head the student does not have
    raw = apply_overrides(raw, list(overrides))
    if raw["model"]["checkpoint"] != model.checkpoint and not any(o.startswith("model.checkpoint_sha256=") for o in overrides):
        raw["model"]["checkpoint_sha256"] = None  # another file than the teacher's: its own digest is pinned below
    student = validate(raw, "the student's settings", list(overrides))
    build_task(student)
    return student


def distill(run_dir: str | Path, out: str | Path, backbone: str | None = None, img_size: tuple[int, int] | None = None,
            epochs: int | None = None, heads: str | None = None, true_weight: float = 0.5, unlabeled: bool = True,
            val_fold: int = 0, overrides: list[str] = (), progress=None, force: bool = False) -> dict:
    """Train a student of run `run_dir` into `out`; returns the student's round summary."""
    teacher = RunDir(run_dir)
    t_cfg = load_run_config(teacher)
    r, why = teacher.choose_round(t_cfg.train.folds, can_pick=False)
    check_round(teacher, r, t_cfg)
    if not 0 <= val_fold < t_cfg.train.folds:
        raise ConfigError(f"--val-fold {val_fold}: the teacher has folds 0..{t_cfg.train.folds - 1}")
    cfg = student_config(t_cfg, teacher.root, r, backbone, img_size, epochs, heads, true_weight, unlabeled, val_fold,
                         list(overrides))
    if cfg.model.checkpoint and cfg.model.checkpoint == t_cfg.model.checkpoint:
        check_checkpoint_place(teacher, t_cfg)  # the student starts where the teacher did
    # as `mt train` checks them, before the teacher predicts (its augmentation at another --img-size)
    cfg = checked_settings(cfg, *build_task(cfg))
    t_ctx = reopen_context(teacher.root, with_images=False)
    run = RunDir(out)
    if run.root.resolve() == teacher.root.resolve():
        raise ConfigError(f"--out {out} is the teacher's own directory; choose another")
    if run.config.exists() and not force:
        raise ConfigError(f"{run.root} already holds a run; choose another --out, or --force to start it over")
    # the teacher's work first: a failure here leaves no student directory behind
    train_paths = t_ctx.table.train["path"].tolist()
    test_paths = t_ctx.table.test["path"].tolist() if unlabeled and t_ctx.table.test is not None else []
    teacher_decision = load_decision(teacher.round_dir(r))
    probs = teacher_probs(teacher, r, t_cfg, teacher_decision, train_paths + test_paths, progress,
                          device=cfg.train.device)
    if force:
        clear_run(run)
    # what the student needs first, config.yaml (the mark of a run) last: a student stopped in between
    # is not taken for one by a plain retry
    if teacher.skipped.exists():  # the items the teacher left out (--skip-bad), left out again
        atomic_write_text(run.skipped, teacher.skipped.read_text(encoding="utf-8"))
    # fold 0 is the teacher's validation fold, fold 1 every other group: the student trains fold 0
    folds = with_labels(t_ctx.table.train[["group"]].drop_duplicates().assign(
        fold=lambda d: (d["group"].map(dict(zip(t_ctx.table.train["group"], t_ctx.folds))) != val_fold).astype(int)),
        t_ctx.table.train, t_ctx.task)
    atomic_write_text(run.folds, folds.to_csv(index=False))
    save_npz(run.teacher, train_ids=t_ctx.table.train_ids(), train=probs[:len(train_paths)],
             test_ids=t_ctx.table.test_ids() if test_paths else np.array([], dtype=str),
             test=probs[len(train_paths):])
    if teacher_decision is not None and teacher_decision.offsets is not None:
        offsets = Decision(offsets=teacher_decision.offsets)
        write_json(run.round_dir(0) / "decision.json", {"decision": asdict(offsets), "from_teacher": str(teacher.root)})
    claim_run_dir(run, cfg)
    ctx = open_context(run, cfg, progress)
    summary = train_round(ctx, 0, progress)
    return summary | {"teacher_round": r, "teacher_why": why}
