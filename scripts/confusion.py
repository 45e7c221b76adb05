#!/usr/bin/env python3
"""Per-factor confusion matrices of a run's OOF predictions (the final class read back into its
factors, under the run's decision), as one PNG and as text.

  python scripts/confusion.py --run RUN --out confusion.png [--round 0]

Rows are the true class, columns the predicted one; each row is normalised to the share of its true
class, with the counts printed in the cells.
"""
import argparse
import io
from pathlib import Path

import numpy as np

from multitask.context import build_task, load_run_config
from multitask.decide import load_decision, predict_classes
from multitask.metrics import confusion
from multitask.run import RunDir, atomic_write_bytes, head_probs, load_npz
from multitask.subjects import stored_pictures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--round", type=int, default=0)
    a = ap.parse_args()
    run = RunDir(a.run)
    cfg = load_run_config(run)
    task, heads = build_task(cfg)
    oof = load_npz(run.round_dir(a.round) / "oof.npz")
    probs = head_probs(oof)
    _, classes = predict_classes(task, heads, probs, cfg, load_decision(run.round_dir(a.round)), stored_pictures(oof))
    pred, truth = task.decode(classes), oof["factors"]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(task.factors), figsize=(3.6 * len(task.factors), 3.4))
    for ax, (i, f) in zip(np.atleast_1d(axes), enumerate(task.factors)):
        cm = confusion(truth[:, i], pred[:, i], f.n)
        share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for r in range(f.n):
            for c in range(f.n):
                ax.text(c, r, f"{cm[r, c]}", ha="center", va="center", fontsize=8,
                        color="white" if share[r, c] > 0.6 else "black")
        ax.set(title=f.name, xlabel="predicted", ylabel="true", xticks=range(f.n), yticks=range(f.n))
        ax.set_xticklabels(f.classes, rotation=30, fontsize=7)
        ax.set_yticklabels(f.classes, fontsize=7)
        print(f"{f.name}: rows true {list(f.classes)}, columns predicted")
        print(cm)
    fig.suptitle(f"{a.run.name}: OOF per factor (round {a.round})", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    atomic_write_bytes(a.out, buf.getvalue())


if __name__ == "__main__":
    main()
