"""A round's training curves (curves.png): each fold's validation macro F1 with its best epoch (the one
it keeps, unless `train.avg_top_k` averages the top ones), each
head's, and the losses, drawn when the round ends from the folds' metrics.csv. `mt report` shows
the picture; training draws it, so it lives apart from the report.
"""
from __future__ import annotations

import io

import pandas as pd

from multitask.run import RunDir, atomic_write_bytes


def plot_round(run: RunDir, r: int) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    found = [d for d in run.round_dir(r).glob("fold*") if d.name[4:].isdigit() and (d / "metrics.csv").exists()]
    folds = {d.name: pd.read_csv(d / "metrics.csv") for d in sorted(found, key=lambda d: int(d.name[4:]))}  # fold10 after fold9
    fig, (ax_f1, ax_heads, ax_loss) = plt.subplots(1, 3, figsize=(15, 4))
    for i, (name, m) in enumerate(folds.items()):
        colour = f"C{i}"
        ax_f1.plot(m["epoch"], m["val_f1"], marker="o", ms=3, color=colour, label=name)
        best = m.loc[m["val_f1"].idxmax()]
        ax_f1.plot(best["epoch"], best["val_f1"], marker="*", ms=14, color=colour, mec="black")
        ax_loss.plot(m["epoch"], m["train_loss"], color=colour, label=f"{name} train")
        if "val_nll_total" in m:
            ax_loss.plot(m["epoch"], m["val_nll_total"], color=colour, ls="--", label=f"{name} validation")
    if folds:
        every = pd.concat(folds.values())
        heads = [c[len("val_f1_"):] for c in every.columns if c.startswith("val_f1_") and not c.endswith("_combined")]
        mean = every.groupby("epoch").mean(numeric_only=True)
        for head in heads:
            ax_heads.plot(mean.index, mean[f"val_f1_{head}"], marker="o", ms=3, label=head)
    ax_f1.set(title=f"round {r}: validation macro F1 per fold (★ best epoch)", xlabel="epoch", ylabel="macro F1")
    ax_heads.set(title="each head's validation macro F1 (mean over folds)", xlabel="epoch", ylabel="macro F1")
    ax_loss.set(title="training loss (—) and validation NLL (--)", xlabel="epoch", ylabel="loss")
    for ax in (ax_f1, ax_heads, ax_loss):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(run.round_dir(r) / "curves.png", buf.getvalue())
