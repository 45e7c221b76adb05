"""`mt runs`: the leaderboard of your own experiments. One row per finished run (found under the
folders given), with what it is (task, heads, backbone, image size, epochs, folds) and how it scores
(OOF macro F1 of the round `submit` uses, per head and final; with an answer key, the held-out
macro F1 of its submission), sorted by score."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from multitask.config import Config, TableTaskCfg, load_config
from multitask.context import task_of
from multitask.decide import honest_f1
from multitask.labels import Factor
from multitask.metrics import macro_f1
from multitask.run import RunDir, read_json, read_record


class AnswerKeyError(ValueError):
    pass


def find_runs(roots: list[Path]) -> list[RunDir]:
    """Every run directory at or below the given folders (a folder with config.yaml and a finished round)."""
    found = {}  # by resolved path: a run reached from two of the folders given is listed once
    for root in roots:
        candidates = [root] if (root / "config.yaml").exists() else sorted(p.parent for p in root.rglob("config.yaml"))
        for c in candidates:
            if RunDir(c).rounds():
                found.setdefault(Path(c).resolve(), RunDir(c))
    return sorted(found.values(), key=lambda run: str(run.root))


def _read_str_csv(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise AnswerKeyError(f"{path}: {what} not found")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # pandas raises many kinds for a broken CSV
        raise AnswerKeyError(f"{path}: cannot be read as CSV ({e})") from None


def _need(df: pd.DataFrame, path: Path, columns: list[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise AnswerKeyError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")


def _class_index(f: Factor, values: pd.Series, paths: pd.Series, where: Path, column: str, numbers: bool) -> np.ndarray:
    """Class indices of one factor's column; a value that is none of its classes is an error."""
    values = values.str.strip().reset_index(drop=True)
    index = values.map({c: i for i, c in enumerate(f.classes)})
    if numbers and f.numeric:
        # the key holds the number, as the task's table does; a bin name (a predictions file used
        # as the key) is taken as it is: no bin name reads as a number, so the two cannot clash
        rest = index.isna()
        num = pd.to_numeric(values[rest], errors="coerce").to_numpy(float)
        ok = np.isfinite(num)
        index.loc[rest[rest].index[ok]] = f.bin(num[ok])
    bad = np.flatnonzero(index.isna().to_numpy())
    if len(bad):
        kind = "a number or a bin name" if numbers and f.numeric else f"one of {list(f.classes)}"
        raise AnswerKeyError(f"{where}: column {column!r} of {paths.iloc[bad[0]]!r} is {values.iloc[bad[0]]!r}, not "
                             f"{kind} of factor {f.name!r} ({len(bad)} such row(s))")
    return index.to_numpy(np.int64)


def table_codes(cfg: Config, answers: Path, preds: Path) -> tuple[np.ndarray, np.ndarray]:
    """The factor classes (N, F) of a table task's answer key and of the predictions of its paths,
    row for row in the key's order: what `mt runs --answers` and scripts/score_table.py score.

    The key is `path` plus each factor's column under the name the task's table gives it (the
    factor's `column`), holding what that table holds: a number for a binned factor, binned here
    with the factor's edges, a class name for a categorical one (scripts/utkface_table.py and the
    synthetic table maker write it so). The predictions are `mt predict`'s file: `path` and one
    column per factor, by the factor's name, holding class or bin names."""
    task = task_of(cfg)
    answers, preds = Path(answers), Path(preds)
    key, pred = _read_str_csv(answers, "answer key"), _read_str_csv(preds, "predictions")
    columns = [fc.column or fc.name for fc in cfg.task.factors]
    _need(key, answers, ["path", *columns])
    _need(pred, preds, ["path", *task.factor_names])
    twice = pred["path"][pred["path"].duplicated()]
    if len(twice):
        raise AnswerKeyError(f"{preds}: {len(twice)} path(s) predicted more than once, e.g. {twice.iloc[0]!r}")
    pred = pred.set_index("path")
    missing = key["path"][~key["path"].isin(pred.index)]
    if len(missing):
        raise AnswerKeyError(f"{preds}: no prediction for {len(missing)} of the {len(key)} path(s) of {answers}, "
                             f"e.g. {missing.iloc[0]!r}")
    pred = pred.loc[key["path"]]
    truth = np.stack([_class_index(f, key[c], key["path"], answers, c, numbers=True)
                      for f, c in zip(task.factors, columns)], 1)
    guess = np.stack([_class_index(f, pred[f.name], key["path"], preds, f.name, numbers=False)
                      for f in task.factors], 1)
    return truth, guess


def class_numbers(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """`df` (ImageID,ans read as text) with ans as numbers; a blank or a word is named, as the
    key's (or the submission's) fault, not taken for every run's row being unreadable."""
    ans = df["ans"].str.strip()
    bad = ~ans.str.fullmatch(r"\d+")
    if bad.any():
        raise AnswerKeyError(f"{path}: ans must be a class number on every row; line {bad.idxmax() + 2} "
                             f"holds {ans[bad].iloc[0]!r}")
    return df.assign(ans=ans.astype(np.int64))


def held_out(run: RunDir, answers: Path) -> float | None:
    """The macro F1 of the run's submission against an answer key: ImageID,ans (the competition) or
    a table task's key (see table_codes), as score.py and scripts/score_table.py count it; None
    where the run has no submission or the key is of the other kind."""
    if not run.submission.exists():
        return None
    sub, truth = pd.read_csv(run.submission, dtype=str, keep_default_na=False), _read_str_csv(answers, "answer key")
    if {"ImageID", "ans"} <= set(sub.columns) and {"ImageID", "ans"} <= set(truth.columns):
        truth, sub = (class_numbers(df, path) for df, path in ((truth, answers), (sub, run.submission)))
        merged = truth.merge(sub, on="ImageID", suffixes=("_true", "_pred"), how="left")
        if merged["ans_pred"].isna().any():
            raise AnswerKeyError(f"{run.submission}: no prediction for {int(merged['ans_pred'].isna().sum())} of the "
                                 f"key's images, e.g. {merged['ImageID'][merged['ans_pred'].isna()].iloc[0]!r}: a "
                                 f"submission of other test images than {answers} scores")
        y, p = merged["ans_true"].to_numpy(np.int64), merged["ans_pred"].to_numpy(np.int64)
        return macro_f1(y, p, int(max(y.max(), p.max())) + 1)
    cfg = load_config(run.config)
    if isinstance(cfg.task, TableTaskCfg) and "path" in sub.columns and "path" in truth.columns:
        task = task_of(cfg)
        truth_codes, pred_codes = table_codes(cfg, answers, run.submission)
        return macro_f1(task.encode(truth_codes), task.encode(pred_codes), task.n_classes)
    return None


def submitted_round(run: RunDir) -> int | None:
    """The round the run's submission holds, from the record beside it; None where there is no
    record (an mt before records) or the file is no longer the one it describes."""
    record = read_record(run.submission)
    try:
        if record is None or record["sha256"] != hashlib.sha256(run.submission.read_bytes()).hexdigest():
            return None
        return int(record["predicted_by"]["round"])
    except (OSError, ValueError, KeyError, TypeError):  # the file gone since; a record without a round
        return None


def factor_columns(oof: dict, task) -> dict:
    """oof_<factor>: each factor read off the final class, the one figure every run has alike (a
    trained run's f1_<head> is its head's own argmax, and a joined or flat head has no factor of
    its own; an ensemble's summary holds the factor figures under f1_<factor>)."""
    return {f"oof_{f.name}": oof.get(f"f1_{f.name}_combined", oof.get(f"f1_{f.name}")) for f in task.factors}


def run_row(run: RunDir, answers: Path | None = None) -> dict:
    cfg = load_config(run.config)
    r, _ = run.shown_round(cfg.train.folds)  # a partial round's "folds" column says so
    summary = read_json(run.round_dir(r) / "summary.json")
    # an ensemble's fitted weights saw every OOF row its plain figure scores: its fold-honest figure
    # (weights refitted without each fold) is the one that ranks fairly beside trained runs
    oof = summary.get("oof_weights_honest") or summary["oof"]
    task = cfg.task.table if isinstance(cfg.task, TableTaskCfg) else cfg.task
    name = f"{Path(task).parent.name}/{Path(task).stem}" if isinstance(cfg.task, TableTaskCfg) else task
    row = {"run": str(run.root), "task": name,
           "heads": cfg.heads or ",".join(f.name for f in task_of(cfg).factors),
           "backbone": "ensemble" if cfg.ensemble else cfg.model.backbone + ("" if cfg.model.sharing == "shared" else " x heads"),
           "img": "x".join(map(str, cfg.data.img_size)), "epochs": cfg.train.epochs,
           "folds": f"{len(summary['folds_done'])}/{cfg.train.folds}", "round": r,
           "oof_f1": oof["f1"],
           # the final class as `mt submit` decides it, fold-honest: runs whose decide settings differ
           # compare here, where the argmax (oof_f1, what rounds are chosen by) leaves the decision out
           "decided_f1": honest_f1(summary)}
    row |= factor_columns(oof, task_of(cfg))
    notes = []
    if cfg.distill is not None:  # ranked beside OOF figures, it would pass for one
        notes.append("a student (mt distill): its oof figures are its validation fold's, whose persons the teacher's "
                     "other folds trained on: optimistic, not OOF")
    if answers is not None:
        try:
            row["held_out_f1"] = held_out(run, answers)
        except AnswerKeyError as e:  # the run's own figures still count; the note says why it has no score
            row["held_out_f1"] = None
            notes.append(f"no held-out score: {e}")
        held = submitted_round(run) if row["held_out_f1"] is not None else r
        if held != r:  # a submission made before a better round (`mt pseudo-label`), or of a round asked for
            made = f"round {held}'s" if held is not None else "a submission whose round is unknown (no record, or changed since)"
            notes.append(f"held-out score of {made}, the OOF figures round {r}'s")
            if len(summary["folds_done"]) == cfg.train.folds:  # a partial round is shown, not submitted
                notes[-1] += f"; `mt submit --run {run.root}` submits round {r}"
    if notes:
        row["note"] = "; ".join(notes)
    # the folds' epochs summed, whatever invocations trained them: a killed and resumed run costs what
    # it cost (the last invocation's wall time would show only its own share); a pseudo-label round
    # costs its own and the rounds it learnt from
    spent = [read_json(run.round_dir(q) / "summary.json").get("train_s") for q in run.rounds() if q <= r]
    row["train_s"] = round(sum(spent), 1) if spent and None not in spent else None
    return row


def runs_table(roots: list[Path], answers: Path | None = None) -> pd.DataFrame:
    """The leaderboard: one row per finished run, best first (held-out score when an answer key is
    given, else the final OOF macro F1)."""
    if answers is not None and not Path(answers).is_file():
        raise FileNotFoundError(f"{answers}: answer key not found")
    rows = []
    for run in find_runs(roots):
        try:
            rows.append(run_row(run, answers))
        except (ValueError, KeyError, OSError) as e:  # one unreadable run does not hide the others
            rows.append({"run": str(run.root), "note": f"unreadable: {str(e).splitlines()[-1].strip()}"})
    if not rows:
        raise FileNotFoundError(f"no finished run under {', '.join(map(str, roots))}")
    table = pd.DataFrame(rows)
    for column in ("epochs", "round"):  # whole numbers, where an unreadable run's row leaves them blank
        if column in table:
            table[column] = table[column].astype("Int64")
    scored = [k for k in (["held_out_f1"] if answers is not None else []) + ["oof_f1"]
              if k in table.columns and table[k].notna().any()]
    if not scored:  # every run unreadable: the rows are their notes, nothing to sort by
        return table
    # runs without a held-out score (no submission yet) follow the scored ones, best OOF first
    return table.sort_values(scored, ascending=False, na_position="last").reset_index(drop=True)
