"""`mt runs`: the leaderboard of your own experiments. One row per finished run (found under the
folders given), with what it is (task, heads, backbone, image size, epochs, folds) and how it scores
(OOF macro F1 of the round `submit` uses, per head and final; with an answer key, the held-out
macro F1 of its submission), sorted by score."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from multitask.config import TableTaskCfg, load_config
from multitask.context import task_of
from multitask.metrics import macro_f1
from multitask.run import RunDir, read_json


def find_runs(roots: list[Path]) -> list[RunDir]:
    """Every run directory at or below the given folders (a folder with config.yaml and a finished round)."""
    found = []
    for root in roots:
        candidates = [root] if (root / "config.yaml").exists() else sorted(p.parent for p in root.rglob("config.yaml"))
        found += [RunDir(c) for c in candidates if RunDir(c).rounds()]
    return sorted(set(found), key=lambda run: str(run.root))


def held_out(run: RunDir, answers: Path) -> float | None:
    """The macro F1 of the run's submission against an answer key: ImageID,ans (the competition) or
    path plus one column per factor (a table task), as score.py and scripts/score_table.py count it."""
    if not run.submission.exists():
        return None
    sub, truth = pd.read_csv(run.submission), pd.read_csv(answers)
    if {"ImageID", "ans"} <= set(sub.columns) and {"ImageID", "ans"} <= set(truth.columns):
        merged = truth.merge(sub, on="ImageID", suffixes=("_true", "_pred"), how="left")
        if merged["ans_pred"].isna().any():
            return None
        y, p = merged["ans_true"].to_numpy(np.int64), merged["ans_pred"].to_numpy(np.int64)
        return macro_f1(y, p, int(max(y.max(), p.max())) + 1)
    if "path" in sub.columns and "class" in sub.columns and "path" in truth.columns:
        task = task_of(load_config(run.config))
        merged = truth.merge(sub, on="path", suffixes=("_true", "_pred"), how="inner")
        if len(merged) != len(truth):
            return None
        codes = lambda side: np.stack([merged[f"{f.name}_{side}"].astype(str).map(  # noqa: E731
            {c: i for i, c in enumerate(f.classes)}).to_numpy() for f in task.factors], 1)
        y, p = task.encode(codes("true")), task.encode(codes("pred"))
        return macro_f1(y, p, task.n_classes)
    return None


def run_row(run: RunDir, answers: Path | None = None) -> dict:
    cfg = load_config(run.config)
    r, _ = run.shown_round(cfg.train.folds)  # a partial round's "folds" column says so
    summary = read_json(run.round_dir(r) / "summary.json")
    task = cfg.task.table if isinstance(cfg.task, TableTaskCfg) else cfg.task
    name = f"{Path(task).parent.name}/{Path(task).stem}" if isinstance(cfg.task, TableTaskCfg) else task
    row = {"run": str(run.root), "task": name,
           "heads": cfg.heads or ",".join(f.name for f in task_of(cfg).factors),
           "backbone": "ensemble" if cfg.ensemble else cfg.model.backbone + ("" if cfg.model.sharing == "shared" else " x heads"),
           "img": "x".join(map(str, cfg.data.img_size)), "epochs": cfg.train.epochs,
           "folds": f"{len(summary['folds_done'])}/{cfg.train.folds}", "round": r,
           "oof_f1": summary["oof"]["f1"]}
    row |= {k.replace("f1_", "oof_"): v for k, v in summary["oof"].items() if k.startswith("f1_") and not k.endswith("_combined")}
    if answers is not None:
        row["held_out_f1"] = held_out(run, answers)
    row["wall_s"] = summary.get("wall_s")
    return row


def runs_table(roots: list[Path], answers: Path | None = None) -> pd.DataFrame:
    """The leaderboard: one row per finished run, best first (held-out score when an answer key is
    given, else the final OOF macro F1)."""
    rows = []
    for run in find_runs(roots):
        try:
            rows.append(run_row(run, answers))
        except (ValueError, KeyError, OSError) as e:  # one unreadable run does not hide the others
            rows.append({"run": str(run.root), "note": f"unreadable: {str(e).splitlines()[-1].strip()}"})
    if not rows:
        raise FileNotFoundError(f"no finished run under {', '.join(map(str, roots))}")
    table = pd.DataFrame(rows)
    key = "held_out_f1" if answers is not None and table["held_out_f1"].notna().any() else "oof_f1"
    return table.sort_values(key, ascending=False, na_position="last").reset_index(drop=True)
