"""Plots of a round: each fold's validation F1 and training loss by epoch."""
from __future__ import annotations

import io

import pandas as pd

from multitask.run import RunDir, atomic_write_bytes


def plot_round(run: RunDir, r: int) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    fig, (ax_f1, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for fold_dir in sorted(run.round_dir(r).glob("fold*")):
        path = fold_dir / "metrics.csv"
        if not path.exists():
            continue
        m = pd.read_csv(path)
        ax_f1.plot(m["epoch"] + 1, m["val_f1"], marker="o", label=fold_dir.name)
        ax_loss.plot(m["epoch"] + 1, m["train_loss"], marker="o", label=fold_dir.name)
    ax_f1.set(title=f"round {r}: validation macro F1 (all classes)", xlabel="epoch", ylabel="macro F1")
    ax_loss.set(title="training loss (weighted sum over heads)", xlabel="epoch", ylabel="loss")
    for ax in (ax_f1, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(run.round_dir(r) / "curves.png", buf.getvalue())
