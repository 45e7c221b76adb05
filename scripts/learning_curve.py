#!/usr/bin/env python3
"""Held-out macro F1 against the number of persons a run trained on: finished runs of one config on
builds of different sizes that share their held-out persons (build_maskset.py with the same --seed
and an --eval-frac that gives the same number of eval persons), each scored with the competition's
metric against the answer key of its own build.

  python scripts/learning_curve.py RUN... --out curve.png [--score ../shared/tools/score.py]

Prints one JSON line per run (persons; the submitted round's OOF macro F1 of the final class; its
held-out F1, final class and per factor) and plots them. The OOF figure is that of the round the
submission holds, read from its record, whichever round `mt submit` would choose now.
"""
import argparse
import io
import json
from pathlib import Path

import pandas as pd

from multitask.context import load_run_config
from multitask.run import RunDir, atomic_write_bytes, read_json
from multitask.runs import submitted_round
from study_row import SCORE, score


def row(path: Path, metric: Path) -> dict:
    run = RunDir(path)
    data = Path(load_run_config(run).data_root)
    r = submitted_round(run)  # the round the file holds, by its record (checked against the file's digest)
    if r is None:
        raise SystemExit(f"{run.submission}: no record of the round it holds that still matches the file; "
                         f"submit it again with `mt submit`")
    held = score(data / "answers.csv", run.submission, metric)
    oof = read_json(run.round_dir(r) / "summary.json")["oof"]
    return {"run": str(path), "round": r, "persons": int(pd.read_csv(path / "folds.csv")["group"].nunique()),
            "answers": str(data / "answers.csv"), "oof_f1": round(oof["f1"], 4), "held_out": held}


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["persons"])
    x = [r["persons"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in [("f1_18", "18 classes"), ("f1_gender", "gender"), ("f1_age", "age")]:
        ax.plot(x, [r["held_out"][key] for r in rows], "o-", label=label)
    ax.set_xscale("log")
    ax.minorticks_off()  # the log axis' own labels would crowd the runs' sizes
    ax.set_xticks(x, [str(v) for v in x])
    ax.set_xlabel("training persons (7 pictures each)")
    ax.set_ylabel("held-out macro F1")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--score", type=Path, default=SCORE, help=f"the competition metric [{SCORE}]")
    a = ap.parse_args()
    rows = [row(p, a.score) for p in a.runs]
    answers = {Path(r["answers"]).read_bytes() for r in rows}
    if len(answers) > 1:
        raise SystemExit("the runs' builds hold different held-out sets (their answers.csv differ): "
                         "a curve needs the same persons held out")
    for r in rows:
        print(json.dumps(r))
    plot(rows, a.out)


if __name__ == "__main__":
    main()
