"""Pseudo-labelling rounds: confident test images, with the label the soft vote gives them, join
the training folds of a new round (never a validation fold, so OOF scores stay honest)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from multitask.kfold import load_round_test_probs, reopen_context, train_round
from multitask.run import atomic_write_text


def select_pseudo(combined: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows whose best final-class probability is at least `threshold`: (rows, classes, confidence)."""
    best = combined.max(1)
    rows = np.flatnonzero(best >= threshold)
    return rows, combined[rows].argmax(1), best[rows]


def pseudo_label(run_dir: str | Path, threshold: float | None = None, rounds: int | None = None,
                 overrides: list[str] = (), progress=None) -> list[dict]:
    """Run `rounds` new rounds after the latest one; return each round's report."""
    extra = list(overrides)
    if threshold is not None:
        extra.append(f"pseudo.threshold={threshold}")
    if rounds is not None:
        extra.append(f"pseudo.rounds={rounds}")
    ctx = reopen_context(run_dir, extra, progress)
    if ctx.test_images is None:
        raise FileNotFoundError("the task has no test images (no eval/ in the competition root, or no "
                                "task.test in a table task): nothing to pseudo-label")
    reports = []
    for _ in range(ctx.cfg.pseudo.rounds):
        prev = ctx.run.latest_round()
        image_ids, probs = load_round_test_probs(ctx, prev)
        rows, classes, conf = select_pseudo(ctx.task.combine(ctx.heads, probs), ctx.cfg.pseudo.threshold)
        r = prev + 1
        atomic_write_text(ctx.run.round_dir(r) / "pseudo.csv", pd.DataFrame(
            {"ImageID": image_ids[rows], "class": classes, "confidence": conf}).to_csv(index=False))
        summary = train_round(ctx, r, progress)  # reads the round's pseudo.csv
        reports.append({"round": r, "from_round": prev, "threshold": ctx.cfg.pseudo.threshold,
                        "added": int(len(rows)), "of": int(len(image_ids)), "oof_f1": summary["oof"]["f1"],
                        "oof": summary["oof"]})
    return reports
