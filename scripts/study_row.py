#!/usr/bin/env python3
"""One row of the accuracy study (docs/RESULTS.md): train a run on a competition-layout build, submit,
and score the submission with the competition's own metric against the build's answer key.

  python scripts/study_row.py --data /tmp/mask600 --out /tmp/study/base [--config demo] [--set k=v ...]

Prints one JSON line, every figure of the round `mt submit` takes (the best by OOF; round 0 of a run
this script trains): the OOF macro F1 (final class and per factor) as argmax, and where the run fits
a decision (decide: / numeric aux), in-sample and fold-honest; the held-out macro F1 from
../shared/tools/score.py of the submission (with the run's decision) and of the plain argmax of the
same voted probabilities, and of a hard vote of the folds (same models, same TTA); wall time of
`mt train` and the hardware, and the epochs the run trained (fewer than configured under a time
limit; mt train's output is kept in OUT/train.log). `--score-only` re-scores a finished run without
training it.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
SCORE = ROOT.parent / "shared" / "tools" / "score.py"


def score(answers: Path, submission: Path, metric: Path = SCORE) -> dict:
    out = subprocess.run([sys.executable, str(metric), str(answers), str(submission)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def score_classes(data: Path, ids, classes, metric: Path = SCORE) -> dict:
    """The held-out score of final classes for the test images `ids`, written in info.csv's order."""
    info = pd.read_csv(data / "eval" / "info.csv")
    frame = pd.DataFrame({"ImageID": ids, "ans": classes}).set_index("ImageID").loc[info["ImageID"]].reset_index()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sub.csv"
        frame.to_csv(path, index=False)
        return score(data / "answers.csv", path, metric)


def train_logged(command: list[str]) -> tuple[int, str]:
    """Run `command`, passing its output on to stderr as it comes (a run killed by a timeout still
    leaves what it said); return its exit status and all it said."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ | {"COLUMNS": "200"})  # rich wraps at 80 columns otherwise
    said = []
    for line in proc.stdout:
        sys.stderr.write(line)
        said.append(line)
    return proc.wait(), "".join(said)


def hardware() -> str:
    import torch

    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", CPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores{gpu}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, help="a build_maskset.py build (train/, eval/, answers.csv)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--config", default="demo")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--heads", default=None)
    ap.add_argument("--score-only", action="store_true", help="score the finished run in --out; train nothing")
    ap.add_argument("--score", type=Path, default=SCORE, help=f"the competition metric [{SCORE}]")
    a = ap.parse_args()
    # `python -m multitask.cli`, not the `mt` script: a device with the package on PYTHONPATH has no script
    mt = [sys.executable, "-m", "multitask.cli"]
    cmd = ["train", "--data", str(a.data), "--out", str(a.out), "--config", a.config]
    cmd += ["--heads", a.heads] if a.heads else []
    for o in a.overrides:
        cmd += ["--set", o]
    train_s = None
    if not a.score_only:
        t0 = time.perf_counter()
        status, said = train_logged(mt + cmd)
        train_s = round(time.perf_counter() - t0, 1)
        # what mt train said (the time limit's reckoning among it) stays with the run
        if a.out.is_dir():
            from multitask.run import atomic_write_text

            atomic_write_text(a.out / "train.log", said)
        if status:
            sys.exit(f"mt train failed ({status}); its output is above")

    from multitask.context import reopen_context
    from multitask.submit import load_round_test_probs
    from multitask.inference import vote
    from multitask.run import head_probs, load_npz, read_json

    # every figure of the row from the round `mt submit` takes (the best by OOF: round 0 of a run
    # this script trained, a pseudo-label round perhaps of one it only scores)
    ctx = reopen_context(a.out, with_images=False)
    r, _ = ctx.run.choose_round(ctx.cfg.train.folds)
    summary = read_json(ctx.run.round_dir(r) / "summary.json")
    ids, probs, _ = load_round_test_probs(ctx, r)
    folds = [head_probs(load_npz(ctx.run.fold_dir(r, k) / "test.npz")) for k in summary["folds_done"]]

    def held_out(p) -> dict:
        return score_classes(a.data, ids, ctx.task.combine(ctx.heads, p).argmax(1), a.score)

    with tempfile.TemporaryDirectory() as tmp:  # --score-only writes nothing into the run
        submission = Path(tmp) / "submission.csv" if a.score_only else a.out / "submission.csv"
        subprocess.run(mt + ["submit", "--run", str(a.out), "--round", str(r), "--out", str(submission)],
                       check=True, stdout=subprocess.DEVNULL)
        submitted = score(a.data / "answers.csv", submission, a.score)
    row = {
        # --score-only trained nothing: the run's own config.yaml says how it was trained
        "name": a.out.name, "command": None if a.score_only else "mt " + " ".join(cmd), "round": r,
        "epochs": ctx.cfg.train.epochs,
        "oof": {k: round(v, 4) for k, v in summary["oof"].items() if k.startswith("f1")},
        "held_out": submitted,
        "held_out_argmax": held_out(probs),
        "held_out_hard_vote": held_out(vote(folds, "hard")),
        "train_s": train_s, "hardware": hardware(),
    }
    if "decision" in summary:
        row["oof_decision"] = {k: {m: round(v, 4) for m, v in s.items()} for k, s in summary["decision"].items()}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
