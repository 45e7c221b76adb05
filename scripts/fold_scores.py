#!/usr/bin/env python3
"""Each fold model of a finished competition run scored alone, on its own validation persons (its
OOF rows) and on the held-out images of an answer key, beside the soft vote of the folds on those
images: where OOF and held-out figures part (docs/RESULTS.md, thirteenth session).

  python scripts/fold_scores.py RUN [RUN ...] [--answers DATA/answers.csv]

Prints one JSON line per run: the 18-class macro F1 of the heads' argmax (no decision fitted on
OOF, so that both sides are read alike), per fold and the mean of the folds, on OOF and held out,
and of the folds' vote held out. The round is the one `mt submit` takes. The answer key defaults to
answers.csv beside the run's data root, where build_maskset.py and `mt demo` write it.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from multitask.context import build_task, load_run_config
from multitask.decide import predict_classes
from multitask.metrics import macro_f1
from multitask.inference import vote
from multitask.run import RunDir, head_probs, load_npz, read_json


def fold_scores(run_dir: Path, answers: Path | None = None) -> dict:
    run = RunDir(run_dir)
    cfg = load_run_config(run)
    if cfg.task != "mask":
        raise SystemExit(f"{run_dir}: a table task's run; this script reads the competition's answer key")
    if cfg.ensemble is not None:
        raise SystemExit(f"{run_dir}: an `mt ensemble` run has no fold models of its own; score its members")
    task, heads = build_task(cfg)
    answers = answers or Path(cfg.data_root) / "answers.csv"
    truth = pd.read_csv(answers).set_index("ImageID")["ans"]
    r, _ = run.choose_round(cfg.train.folds)
    oof = load_npz(run.round_dir(r) / "oof.npz")
    y, folds = task.encode(oof["factors"]), oof["fold"]
    oof_classes = predict_classes(task, heads, head_probs(oof), cfg, None)[1]

    def held_out(ids: np.ndarray, classes: np.ndarray) -> float:
        missing = set(ids) - set(truth.index)
        if missing:
            raise SystemExit(f"{answers}: no answer for {len(missing)} test image(s), e.g. {sorted(missing)[0]!r}")
        return macro_f1(truth.loc[ids].to_numpy(), classes, task.n_classes)

    own, held, tests = [], [], []
    for k in read_json(run.round_dir(r) / "summary.json")["folds_done"]:
        test = load_npz(run.fold_dir(r, k) / "test.npz")
        tests.append(head_probs(test))
        own.append(macro_f1(y[folds == k], oof_classes[folds == k], task.n_classes))
        held.append(held_out(test["image_id"], predict_classes(task, heads, tests[-1], cfg, None)[1]))
    voted = held_out(test["image_id"], predict_classes(task, heads, vote(tests), cfg, None)[1])
    return {"run": str(run_dir), "round": r, "fold_oof": [round(v, 4) for v in own],
            "fold_held_out": [round(v, 4) for v in held], "mean_fold_oof": round(float(np.mean(own)), 4),
            "mean_fold_held_out": round(float(np.mean(held)), 4), "vote_held_out": round(voted, 4)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--answers", type=Path, default=None, help="answer key (ImageID,ans); default: beside the data root")
    args = ap.parse_args(argv)
    for run in args.runs:
        print(json.dumps(fold_scores(run, args.answers)), flush=True)


if __name__ == "__main__":
    main()
