"""The submission: a finished round's voted predictions of the task's test images, written
atomically (a refused file leaves the old one intact), with a record beside it of what made it. For
the competition, ImageID,ans in info.csv's order, checked against a fresh read of info.csv; for a
table task, the predictions file `mt predict` writes (path, each factor's class, class, prob)."""
from __future__ import annotations

import hashlib
import io
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from multitask import __version__
from multitask.context import Context, check_round, no_test_images, reopen_context, round_trainings
from multitask.data.layout import read_csv
from multitask.data.table import factor_values
from multitask.decide import load_decision, predict_classes
from multitask.outputs import prediction_table, write_rows
from multitask.run import (RunError, atomic_writer, check_output_file, head_probs, load_npz, provenance_file, read_record,
                           write_json)
from multitask.subjects import Pictures, stored_pictures


class SubmissionError(ValueError):
    pass


def check_submission(sub: pd.DataFrame, info_ids: np.ndarray, n_classes: int) -> None:
    if list(sub.columns) != ["ImageID", "ans"]:
        raise SubmissionError(f"columns must be ['ImageID', 'ans'], got {list(sub.columns)}")
    if len(sub) != len(info_ids):
        raise SubmissionError(f"{len(sub)} rows, but info.csv has {len(info_ids)}")
    mismatch = np.flatnonzero(sub["ImageID"].to_numpy().astype(str) != np.asarray(info_ids).astype(str))
    if len(mismatch):
        i = mismatch[0]
        raise SubmissionError(f"ImageID differs from info.csv at row {i + 1}: "
                              f"{sub['ImageID'].iloc[i]!r} vs {info_ids[i]!r} ({len(mismatch)} rows differ)")
    if not pd.api.types.is_integer_dtype(sub["ans"]):
        raise SubmissionError(f"ans must be integers, got {sub['ans'].dtype}")
    bad = sub["ans"][(sub["ans"] < 0) | (sub["ans"] >= n_classes)]
    if len(bad):
        raise SubmissionError(f"ans outside 0..{n_classes - 1}, e.g. {bad.iloc[0]}")


def submission_text(sub: pd.DataFrame, info_csv: Path, n_classes: int) -> str:
    """`sub` as the file's text, checked against info.csv read afresh from disk (not the list it was
    built from, which would agree with it whatever happened)."""
    check_submission(sub, read_csv(Path(info_csv), ["ImageID", "ans"])["ImageID"].to_numpy(), n_classes)
    return sub.to_csv(index=False)


def load_round_test_probs(ctx: Context, r: int) -> tuple[np.ndarray, dict[str, np.ndarray], Pictures | None]:
    """(image ids, voted probabilities, the pictures' likeness where subjects are read) of round r."""
    path = ctx.run.round_dir(r) / "test_probs.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no test probabilities (the task has no test images: "
                                f"a competition root without eval/, or a table task without task.test)")
    z = load_npz(path)
    # the competition's file follows info.csv, read afresh and checked (submission_text); a table
    # task's is written in the order predicted, which must still be the test list's
    if ctx.table.info_csv is None and not np.array_equal(z["image_id"], ctx.table.test_ids()):
        raise RunError(f"{path}: predicted for other test images, or in another order, than {ctx.cfg.task.test} now "
                       f"lists ({len(z['image_id'])} predicted, {len(ctx.table.test)} listed); `mt predict --run "
                       f"{ctx.run.root}` predicts any list of images, or retrain with `mt train --force`")
    return z["image_id"], head_probs(z), stored_pictures(z)


def make_submission(run_dir: str | Path, out: str | Path | None = None, progress=None, round: int | None = None,
                    log=None) -> Path:
    """The submission of round `round`, by default the finished round with the best OOF macro F1;
    `log` is told which round was used and why."""
    ctx = reopen_context(run_dir, progress=progress, with_images=False)
    out = Path(out) if out else ctx.run.submission
    check_places(out)
    r, why = ctx.run.choose_round(ctx.cfg.train.folds, round)

    def read():
        check_round(ctx.run, r, ctx.cfg)
        return (*load_round_test_probs(ctx, r), load_decision(ctx.run.round_dir(r)), ctx.run.round_train_ids(r))

    image_ids, probs, pictures, decision, train_ids = ctx.run.read_settled(r, read)
    if log:
        log(f"using {why}")
    combined, classes = predict_classes(ctx.task, ctx.heads, probs, ctx.cfg, decision, pictures)
    made = {"round": r, "why": why, "train_ids": train_ids}
    if ctx.cfg.ensemble is not None:  # no fold models of its own: its members and their trainings say what voted
        made |= {"members": ctx.cfg.ensemble.runs, "member_rounds": ctx.cfg.ensemble.rounds,
                 "member_train_ids": ctx.cfg.ensemble.train_ids}
    return write_predictions(ctx, image_ids, combined, classes, out, f"round {r}", made, log)


def make_submission_onnx(run_dir: str | Path, onnx: str | Path, out: str | Path | None = None, log=None) -> Path:
    """The submission of the run's test images predicted by an exported file (`mt export`) with
    onnxruntime instead of the round's stored probabilities."""
    from multitask.serve import ServedModel, onnx_file

    ctx = reopen_context(run_dir, with_images=False)
    out = Path(out) if out else ctx.run.submission_onnx
    check_places(out)  # before the predictions, not after them
    onnx = onnx_file(onnx)  # before it is hashed
    with open(onnx, "rb") as fh:  # what predicts is read after this: a file replaced since would not match
        onnx_sha256 = hashlib.file_digest(fh, "sha256").hexdigest()
    served = ServedModel(onnx)
    label = lambda task: [(f.name, f.classes, f.bins) for f in task.factors]  # noqa: E731 - files before `integer` lack it
    if label(served.task) != label(ctx.task):
        raise SubmissionError(f"{onnx} predicts factors {served.task.factor_names}, the run's task has "
                              f"{ctx.task.factor_names}")
    made, r = served.meta.get("train_ids"), served.meta["round"]  # files exported before training ids: None
    same_place = Path(served.meta["run"]) == ctx.run.root.resolve()
    current = bool(made) and r in ctx.run.rounds() and made == round_trainings(ctx.run, r, ctx.cfg)
    this_run = same_place or current  # a run that moved keeps its folds' training ids
    if made and same_place and not current:
        raise SubmissionError(f"{onnx} was exported from round {served.meta['round']} of {ctx.run.root} as it was "
                              f"before it was trained again; export it again (`mt export --run {ctx.run.root}`)")
    if ctx.table.test is None:
        raise no_test_images(ctx, "nothing to submit")
    if log:
        log(f"predicting {len(ctx.table.test)} test images with {onnx} (run {served.meta['run']}, round {served.meta['round']})")
        if made and not this_run:  # another run of the task, which a submission may take; or this one, moved and trained since
            log(f"its folds are not those of round {r} of {ctx.run.root} as it is now: if that is this run, moved and "
                f"trained again since, export it again (`mt export --run {ctx.run.root}`)")
    if log and this_run:  # another run's rounds say nothing of the file's
        decision = load_decision(ctx.run.round_dir(r)) if r in ctx.run.rounds() else None
        if decision is not None and decision.subjects > 0:
            log(f"subjects are not read: the exported file takes each picture on its own, while `mt submit --run "
                f"{ctx.run.root}` reads what a person keeps from their clearest picture (weight {decision.subjects:.2f})")
        try:
            best, _ = ctx.run.choose_round(ctx.cfg.train.folds, can_pick=False)
        except FileNotFoundError:  # no round has every fold done: `mt export --round N` exports one all the same
            best = r
        if best != r:
            log(f"the exported file holds round {r}; `mt submit --run {ctx.run.root}` would submit round {best}, "
                f"the best by OOF since (`mt export --run {ctx.run.root}` exports that one)")
    combined, classes = served.predict_paths(ctx.table.test["path"].tolist())
    image_ids = ctx.table.test_ids()
    by = {"onnx": str(Path(onnx).resolve()), "onnx_sha256": onnx_sha256,
          "exported_from": served.meta["run"], "round": r, "train_ids": made, "this_run": this_run}
    return write_predictions(ctx, image_ids, combined, classes, out, str(onnx), by, log)


def write_predictions(ctx, image_ids, combined: np.ndarray, classes: np.ndarray, out: Path, source: str,
                      made: dict, log=None) -> Path:
    """The competition's ImageID,ans in info.csv's order, or a table task's predictions file (`source`
    names what predicted them in errors), and beside it a record of what made it (`made`: what predicted,
    the round's or the ONNX file's), its digest and the classes in it; `log` hears of final classes the
    training set has that no prediction takes. The callers have checked both places (`check_places`)
    before predicting."""
    record_path = provenance_file(out)
    if ctx.table.info_csv is None:
        columns, rows = prediction_table(ctx.task, image_ids, combined, classes)
        text = io.StringIO()
        write_rows(text, columns, rows)  # as `mt predict` writes it
        text, written = text.getvalue(), classes
    else:
        pred = dict(zip(image_ids, classes))
        info_ids = read_csv(ctx.table.info_csv, ["ImageID", "ans"])["ImageID"].to_numpy()
        missing = [i for i in info_ids if i not in pred]
        if missing:
            raise SubmissionError(f"{source} has no prediction for {len(missing)} info.csv image(s), e.g. {missing[0]}")
        sub = pd.DataFrame({"ImageID": info_ids, "ans": np.array([pred[i] for i in info_ids], dtype=np.int64)})
        text, written = submission_text(sub, ctx.table.info_csv, ctx.task.n_classes), sub["ans"].to_numpy()
    counts = class_counts(ctx.task, written, ctx.task.encode(factor_values(ctx.table.train, ctx.task)))
    unseen = [name for name, c in counts.items() if c["predicted"] == 0 and c["train"] > 0]
    data = text.encode()  # the bytes hashed are the bytes written, whatever the locale's encoding
    record = {"file": out.name, "sha256": hashlib.sha256(data).hexdigest(), "rows": int(len(written)),
              "made": datetime.now(timezone.utc).isoformat(timespec="seconds"), "mt": __version__,
              "run": str(ctx.run.root.resolve()), "predicted_by": made, "never_predicted": unseen, "classes": counts}
    with atomic_writer(out) as fh:
        fh.write(data)
        # once the new file is whole, and before it takes the old one's place: stopped anywhere, the
        # old file keeps its record, or the new one has none until its own is written
        record_path.unlink(missing_ok=True)
    write_json(record_path, record)
    if unseen and log:
        log(f"no prediction is of {len(unseen)} class(es) the training set has, each of which scores 0 wherever the "
            f"test set has it: {', '.join(unseen)}")
    return out


def check_places(out: Path) -> None:
    """Before anything is predicted: the file can be written, and so can its record, which replaces
    only an earlier record, never another file of that name."""
    check_output_file(out)
    path = provenance_file(out)
    if path.is_dir() or path.is_symlink():
        raise SubmissionError(f"{path}: the submission's record goes here, and this is a folder or a link; "
                              f"write the submission under another name (--out)")
    if path.exists() and read_record(out) is None:
        raise SubmissionError(f"{path}: the submission's record goes here, and this file is not one; write the "
                              f"submission under another name (--out)")


def class_counts(task, predicted: np.ndarray, train: np.ndarray) -> dict[str, dict[str, int]]:
    """Each final class (by its title): how many predictions are of it, and how many training images."""
    n = task.n_classes
    return {name: {"predicted": int(p), "train": int(q)}
            for name, p, q in zip(task.class_titles(), np.bincount(predicted, minlength=n), np.bincount(train, minlength=n))}
