#!/usr/bin/env python3
"""A pseudo-label round's promise against what it delivered: for each factor, the threshold
calibrated on the teacher round's OOF, the precision it promised there, how many OOF pictures and
persons that promise rests on (subjects read one number for all of a person's pictures, so persons
are the independent readings), and, with a competition answer key, the precision of the selected
labels on the test persons (docs/RESULTS.md, eighteenth session).

  python scripts/pseudo_precision.py RUN [--round 1] [--answers DATA/answers.csv]

Prints one JSON line.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from multitask.context import reopen_context
from multitask.decide import load_decision, predict_classes
from multitask.pseudo import oof_groups
from multitask.run import head_probs, load_npz, read_json
from multitask.subjects import stored_pictures


def pseudo_precision(run_dir: Path, r: int = 1, answers: Path | None = None) -> dict:
    ctx = reopen_context(run_dir, with_images=False)
    labels_dir = ctx.run.round_dir(r)
    made = read_json(labels_dir / "pseudo.json")
    teacher = ctx.run.round_dir(made["from_round"])
    if "labels_from" in made or made.get("soft"):
        raise SystemExit(f"{labels_dir}: labels from another run or soft labels; this reads a run's own hard labels")
    oof = load_npz(teacher / "oof.npz")
    combined = predict_classes(ctx.task, ctx.heads, head_probs(oof), ctx.cfg, load_decision(teacher),
                               stored_pictures(oof))[0]
    chosen = pd.read_csv(labels_dir / "pseudo.csv", dtype={"ImageID": str})
    truth = None
    if answers is not None:
        if ctx.task.name != "mask":
            raise SystemExit("--answers: a competition answer key (ImageID,ans) reads only the mask competition's classes")
        ans = pd.read_csv(answers, dtype={"ImageID": str}).set_index("ImageID")["ans"]
        truth = ctx.task.decode(ans.reindex(chosen["ImageID"]).to_numpy())
    teacher_folds = len(read_json(teacher / "summary.json")["folds_done"])
    groups = oof_groups(teacher, oof, bound=0.5)  # persons are counted here, as a bound counts them
    out = {"run": str(run_dir), "round": r, "from_round": made["from_round"], "bound": made.get("bound", 0.0),
           "factors": {}}
    for i, f in enumerate(ctx.task.factors):
        promise = made["factors"].get(f.name, {})
        row = {"threshold": promise.get("threshold"), "promised": promise.get("precision"),
               "lower_bound": promise.get("lower_bound")}  # with pseudo.bound, what the threshold was set by
        if promise.get("threshold") is not None:
            p = ctx.task.marginal(combined, i)
            above = p.max(1) >= promise["threshold"]
            right = p.argmax(1) == oof["factors"][:, i]
            persons = np.unique(groups[above])
            row |= {"oof_pictures": int(above.sum()), "oof_persons": int(len(persons)),
                    "oof_precision_by_person": round(float(np.mean([right[above & (groups == g)].mean()
                                                                    for g in persons])), 4) if len(persons) else None}
        selected = chosen[f.name].to_numpy() >= 0
        # per teacher fold, one that selected nothing too (pseudo.csv has no rows of it), as pseudo_calibration.py counts
        row["labels_per_fold"] = round(float(selected.sum() / teacher_folds), 1)
        if truth is not None and selected.any():
            row["test_precision"] = round(float((chosen[f.name].to_numpy() == truth[:, i])[selected].mean()), 4)
        out["factors"][f.name] = row
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--round", type=int, default=1, help="the pseudo-label round (default 1)")
    parser.add_argument("--answers", type=Path, default=None, help="the competition's answer key (ImageID,ans)")
    args = parser.parse_args(argv)
    print(json.dumps(pseudo_precision(args.run, args.round, args.answers)))


if __name__ == "__main__":
    main()
