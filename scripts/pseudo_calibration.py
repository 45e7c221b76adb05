#!/usr/bin/env python3
"""What other calibrations of the pseudo-label thresholds would select from a finished round, and how
often they would be right on the test persons; nothing is trained or written (docs/RESULTS.md,
twentieth session). Three rules, each a threshold per factor at `--precision` (with `--bound`, as a
lower bound over persons):

  pooled          the thresholds from every fold's OOF together, read under the round's decision
                  (what `mt pseudo-label` does)
  pooled_plain    the same without subjects (each picture read on its own)
  per_fold        fold k's threshold from fold k's own OOF rows alone, the persons fold k's model
                  never saw, as its test labels are (fewer persons per promise)

  python scripts/pseudo_calibration.py RUN --answers DATA/answers.csv [--round 0] [--precision 0.95] [--bound 0]

Prints one JSON line per rule: per factor, labels per fold, how often they are right on the test
persons, and the OOF persons each fold's promise rests on.
"""
import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from multitask.context import reopen_context
from multitask.decide import load_decision, predict_classes
from multitask.pseudo import factor_thresholds, oof_groups, oof_precision, own_teacher, select_factors, subject_pictures
from multitask.run import head_probs, load_npz
from multitask.subjects import stored_pictures


def calibrations(run_dir: Path, answers: Path, r: int = 0, precision: float = 0.95, bound: float = 0.0) -> list[dict]:
    ctx = reopen_context(run_dir)
    task = ctx.task
    if task.name != "mask":
        raise SystemExit("--answers: a competition answer key (ImageID,ans) reads only the mask competition's classes")
    teacher = own_teacher(ctx, r)
    oof = load_npz(teacher.round_dir / "oof.npz")
    groups = oof_groups(teacher.round_dir, oof, bound=0.5)  # persons are counted, as a bound counts them
    key = pd.read_csv(answers, dtype={"ImageID": str}).set_index("ImageID")["ans"]
    truth = task.decode(key.reindex(ctx.table.test_ids()).to_numpy())
    decision = load_decision(teacher.round_dir)
    plain = replace(decision, subjects=0.0) if decision is not None else None
    out = []
    for rule, d in (("pooled", decision), ("pooled_plain", plain), ("per_fold", decision)):
        reads = d is not None and d.subjects > 0
        combined_oof = predict_classes(task, teacher.heads, head_probs(oof), teacher.cfg, d,
                                       stored_pictures(oof) if reads else None)[0]
        pictures = subject_pictures(ctx, d)
        per = {f.name: {"labels": 0, "right": 0, "oof_persons": []} for f in task.factors}
        for k, probs in sorted(teacher.test.items()):
            own = oof["fold"] == k if rule == "per_fold" else np.ones(len(combined_oof), bool)
            thresholds = factor_thresholds(task, combined_oof[own], oof["factors"][own], precision, groups[own], bound)
            promise = oof_precision(task, combined_oof[own], oof["factors"][own], thresholds, groups[own], bound)
            labels = select_factors(task, predict_classes(task, teacher.heads, probs, teacher.cfg, d, pictures)[0],
                                    thresholds)[0]
            for i, f in enumerate(task.factors):
                kept = labels[:, i] >= 0
                per[f.name]["labels"] += int(kept.sum())
                per[f.name]["right"] += int((labels[kept, i] == truth[kept, i]).sum())
                per[f.name]["oof_persons"].append(promise[f.name]["persons"] if promise[f.name]["precision"] is not None
                                                  else 0)
        folds = len(teacher.test)
        out.append({"run": str(run_dir), "round": r, "rule": rule, "precision": precision, "bound": bound,
                    "factors": {name: {"labels_per_fold": round(v["labels"] / folds, 1),
                                       "test_precision": round(v["right"] / v["labels"], 4) if v["labels"] else None,
                                       "oof_persons": v["oof_persons"] if rule == "per_fold" else v["oof_persons"][0]}
                                for name, v in per.items()}})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--answers", type=Path, required=True, help="the competition's answer key (ImageID,ans)")
    parser.add_argument("--round", type=int, default=0, help="the round whose models would label (default 0)")
    parser.add_argument("--precision", type=float, default=0.95)
    parser.add_argument("--bound", type=float, default=0.0)
    args = parser.parse_args(argv)
    for row in calibrations(args.run, args.answers, args.round, args.precision, args.bound):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
