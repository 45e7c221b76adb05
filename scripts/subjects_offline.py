#!/usr/bin/env python3
"""`decide.subjects` on a finished run, without training it again (the setting changes only the
decision, not the models): the round's decision refitted with subjects read, its fold-honest OOF
macro F1, and the held-out score of the submission it makes, beside the run's own decision.

  python scripts/subjects_offline.py RUN DATA [--anchor mask=not_worn] [--factors gender,age]

DATA is the build_maskset.py build the run trained on (its answers.csv scores the submission).
Prints one JSON line. The run directory is not written to.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

from multitask.config import SubjectsCfg
from multitask.context import reopen_context
from multitask.decide import decide_round, load_decision, predict_classes
from multitask.ensemble import oof_votes_without
from multitask.kfold import pictures_likeness
from multitask.run import head_probs, load_npz
from multitask.subjects import Pictures, subject_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_row import score_classes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--round", type=int, default=0)
    ap.add_argument("--anchor", default="mask=not_worn")
    ap.add_argument("--factors", default="gender,age")
    ap.add_argument("--offsets", default=None, help="decide.offsets for the refit (none, factor, class) [the run's]")
    a = ap.parse_args()
    ctx = reopen_context(a.run)  # a finished run takes no new decide settings: the copy below does
    subjects = SubjectsCfg(anchor=a.anchor, factors=a.factors.split(","))
    decide = {"subjects": subjects} | ({"offsets": a.offsets} if a.offsets else {})
    cfg = ctx.cfg.model_copy(update={"decide": ctx.cfg.decide.model_copy(update=decide)})
    r, task, heads = a.round, ctx.task, ctx.heads
    subject_spec(task, cfg)
    train_look, test_look = pictures_likeness(ctx)
    oof = load_npz(ctx.run.round_dir(r) / "oof.npz")
    test = load_npz(ctx.run.round_dir(r) / "test_probs.npz")
    values = {k[6:]: v for k, v in oof.items() if k.startswith("value_")}
    with tempfile.TemporaryDirectory() as tmp:  # decide_round writes decision.json: not into the run
        report = decide_round(Path(tmp), task, heads, head_probs(oof), oof["factors"], values, oof["fold"], cfg,
                              train_look[oof["rows"]], oof_votes_without(ctx.cfg))  # an ensemble's weights too
        decision = load_decision(Path(tmp))
    _, with_subjects = predict_classes(task, heads, head_probs(test), cfg, decision, Pictures(test_look))
    # the run's own settings: its subjects too, where it reads them
    _, own = predict_classes(task, heads, head_probs(test), ctx.cfg, load_decision(ctx.run.round_dir(r)),
                             Pictures(test_look))
    rnd = lambda d: {k: round(v, 4) for k, v in d.items()} if d else None  # noqa: E731 (one fold: no honest figure)
    print(json.dumps({
        "run": str(a.run), "subjects_weight": decision.subjects,
        "oof_argmax": rnd(report["argmax"]), "oof_honest": rnd(report["honest"]),
        "held_out_own_decision": score_classes(a.data, test["image_id"], own),
        "held_out_with_subjects": score_classes(a.data, test["image_id"], with_subjects),
    }))


if __name__ == "__main__":
    main()
