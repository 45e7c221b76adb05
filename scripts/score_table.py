#!/usr/bin/env python3
"""Score a table task's predictions against an answer key, as scikit-learn's macro F1 counts it
(over the labels present in the answers or the predictions, like ../shared/tools/score.py).

  python scripts/score_table.py --run RUN --answers /tmp/utktable/answers.csv [--preds RUN/submission.csv]

The answer key holds the raw columns the run's task reads (numbers for a binned factor, class names
for a categorical one); it is binned with the run's own factor definitions. Prints one JSON line:
final-class macro F1 and accuracy, and each factor's macro F1.
"""
import argparse
import json
from pathlib import Path

from sklearn.metrics import f1_score

from multitask.context import load_run_config, task_of
from multitask.run import RunDir
from multitask.runs import table_codes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--answers", required=True)
    ap.add_argument("--preds", default=None, help="predictions CSV [RUN/submission.csv]")
    a = ap.parse_args(argv)
    cfg = load_run_config(RunDir(a.run))
    task = task_of(cfg)
    try:  # the same reading as `mt runs --answers` (multitask/runs.py)
        truth, guess = table_codes(cfg, Path(a.answers), Path(a.preds or Path(a.run) / "submission.csv"))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    y, p = task.encode(truth), task.encode(guess)
    out = {"n": len(y), "f1": round(f1_score(y, p, average="macro"), 4), "acc": round(float((y == p).mean()), 4)}
    for i, f in enumerate(task.factors):
        out[f"f1_{f.name}"] = round(f1_score(truth[:, i], guess[:, i], average="macro"), 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
