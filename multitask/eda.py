"""`mt eda`: look at the data before training. Counts per factor, per final class and per group; each
numeric factor's histogram with its bin edges; image sizes and file types; a grid of sample pictures
per final class; and the anomalies a competitor hunts for by hand, each with its file names:
problems the reader found (bad labels, missing or misnamed pictures, a group whose rows disagree on
a factor set per group), groups with fewer pictures than most, duplicate images by content hash,
files that cannot be decoded.

Writes eda.json (every figure), counts.png, numeric_<factor>.png, samples.png; returns the same
dict, which the command summarises in the terminal.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from multitask.config import Config
from multitask.context import read_data, task_of
from multitask.data.cache import DECODE_ERRORS, ORIENTATION, TURNED, upright_rgb
from multitask.data.table import factor_values, value_column
from multitask.labels import Factor, Task
from multitask.run import atomic_write_bytes, atomic_write_text, check_writable

SAMPLES_PER_CLASS = 6
THUMB = 64
MAX_LISTED = 50


def image_facts(paths: list[str]) -> tuple[pd.DataFrame, list[dict]]:
    """Size, type and content hash of every image (header and bytes only), and those that cannot be
    decoded (a full decode, as training would)."""
    rows, unreadable = [], []
    for p in paths:
        try:
            data = Path(p).read_bytes()
        except OSError as e:  # gone or unreadable since the table was read
            unreadable.append({"path": p, "reason": f"{type(e).__name__}: {e}"})
            rows.append((p, None, 0, 0, None))
            continue
        digest = hashlib.sha1(data).hexdigest()
        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt, (w, h) = im.format, im.size
                if im.getexif().get(ORIENTATION, 1) in TURNED:  # as the cache turns it upright
                    w, h = h, w
                upright_rgb(im).load()  # what training refuses (a float or 32-bit picture) is unreadable here too
            rows.append((p, fmt, w, h, digest))
        except DECODE_ERRORS as e:
            unreadable.append({"path": p, "reason": f"{type(e).__name__}: {e}"})
            rows.append((p, None, 0, 0, digest))
    return pd.DataFrame(rows, columns=["path", "format", "width", "height", "sha1"]), unreadable


def anomalies(train: pd.DataFrame, facts: pd.DataFrame, unreadable: list[dict], skipped: pd.DataFrame) -> dict:
    out: dict[str, list] = {"reader_problems": skipped.to_dict("records")[:MAX_LISTED], "unreadable": unreadable[:MAX_LISTED]}
    sizes = train.groupby("group").size()
    usual = int(sizes.mode().max()) if len(sizes) else 0  # of two sizes as common, the larger: the smaller is short
    short = sizes[sizes < usual]
    out["groups_with_fewer_pictures"] = [{"group": str(g), "pictures": int(n), "usual": usual} for g, n in short.items()][:MAX_LISTED]
    dupes = facts[facts["sha1"].duplicated(keep=False) & facts["format"].notna()].groupby("sha1")["path"].apply(list)
    out["duplicate_images"] = [{"sha1": h, "paths": ps} for h, ps in dupes.items()][:MAX_LISTED]
    # a group that disagrees on a per-group factor is among reader_problems: the reader leaves it out
    return out


def plot_counts(counts: dict, task: Task, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f.name, counts["per_factor"][f.name]) for f in task.factors] + [("final class", counts["per_class"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels) + 4, 3.6),
                             gridspec_kw={"width_ratios": [1] * (len(panels) - 1) + [3]})
    for ax, (title, c) in zip(np.atleast_1d(axes), panels):
        ax.bar(range(len(c)), list(c.values()), color="C0")
        ax.set_xticks(range(len(c)), list(c.keys()), rotation=60 if len(c) > 6 else 0, ha="right" if len(c) > 6 else "center",
                      fontsize=7)
        ax.set(title=title, ylabel="images")
    fig.tight_layout()
    _save(fig, path)


def histogram_edges(values: np.ndarray, factor: Factor) -> np.ndarray | int:
    """One bar per whole number for a whole-number factor (each bar then lies on one side of a cut),
    else up to 60 even bars."""
    known = values[np.isfinite(values)]
    if factor.integer and len(known) and known.max() - known.min() <= 200:
        return np.arange(known.min() - 0.5, known.max() + 1.5)
    return min(60, max(10, len(np.unique(known))))


def plot_numeric(values: np.ndarray, factor: Factor, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.hist(values[np.isfinite(values)], bins=histogram_edges(values, factor), color="C0")
    for edge, cut in zip(factor.bins, factor.cuts):  # drawn where the bins part: 29.5 for whole years at 30
        ax.axvline(cut, color="C3", ls="--")
        ax.text(cut, ax.get_ylim()[1] * 0.95, f" {edge:g}", color="C3", va="top")
    ax.set(title=f"{factor.name}: the numbers, with the bin edges (dashed)", xlabel=factor.name, ylabel="images")
    fig.tight_layout()
    _save(fig, path)


def plot_samples(train: pd.DataFrame, task: Task, classes: np.ndarray, path: Path, seed: int = 0) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    present = np.unique(classes)
    fig, axes = plt.subplots(len(present), SAMPLES_PER_CLASS, figsize=(SAMPLES_PER_CLASS * 1.1, len(present) * 1.2),
                             squeeze=False)
    names = task.class_names(present)
    for row, (c, label) in enumerate(zip(present, names)):
        rows = np.flatnonzero(classes == c)
        picked = rng.choice(rows, size=min(SAMPLES_PER_CLASS, len(rows)), replace=False)
        for col in range(SAMPLES_PER_CLASS):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(picked):
                try:
                    with Image.open(train["path"].iloc[picked[col]]) as im:
                        ax.imshow(upright_rgb(im).resize((THUMB, THUMB)))
                except DECODE_ERRORS:
                    ax.text(0.5, 0.5, "unreadable", ha="center", fontsize=6)
        axes[row, 0].set_title(f"{c}: {' / '.join(map(str, label))} ({len(rows)})", fontsize=7, loc="left")
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def run_eda(cfg: Config, out: str | Path) -> dict:
    """Look at the training data of `cfg`'s task; write the figures and eda.json into `out`."""
    out = Path(out)
    check_writable(out)
    out.mkdir(parents=True, exist_ok=True)
    task = task_of(cfg)
    # read as --skip-bad would, so that problems become findings instead of stopping the look
    table = read_data(cfg.model_copy(update={"data": cfg.data.model_copy(update={"skip_bad": True})}), task)
    train = table.train
    factors = factor_values(train, task)
    classes = task.encode(factors)
    facts, unreadable = image_facts(train["path"].tolist())
    counts = {
        "images": len(train), "groups": int(train["group"].nunique()),
        "test_images": 0 if table.test is None else len(table.test),
        "per_factor": {f.name: {name: int((factors[:, i] == j).sum()) for j, name in enumerate(f.classes)}
                       for i, f in enumerate(task.factors)},
        "per_class": {" / ".join(map(str, task.class_names(np.array([c]))[0])): int((classes == c).sum())
                      for c in range(task.n_classes)},
        "pictures_per_group": {str(k): int(v) for k, v in train.groupby("group").size().value_counts().sort_index().items()},
    }
    ok = facts[facts["format"].notna()]
    images = {"formats": {str(k): int(v) for k, v in ok["format"].value_counts().items()},
              "sizes": {f"{w}x{h}": int(n) for (w, h), n in ok.groupby(["width", "height"]).size().sort_values(ascending=False).head(20).items()},
              "width": _spread(ok["width"]), "height": _spread(ok["height"])}
    numeric = {}
    for f in task.factors:
        if f.numeric:
            values = train[value_column(f.name)].to_numpy(dtype=float)
            plot_numeric(values, f, out / f"numeric_{f.name}.png")
            numeric[f.name] = {"bins": list(f.bins), **_spread(pd.Series(values)), "plot": f"numeric_{f.name}.png"}
    plot_counts(counts, task, out / "counts.png")
    plot_samples(train, task, classes, out / "samples.png", cfg.train.seed)
    result = {"task": task.name, "counts": counts, "images": images, "numeric": numeric,
              "anomalies": anomalies(train, facts, unreadable, table.skipped),
              "plots": ["counts.png", "samples.png", *[v["plot"] for v in numeric.values()]]}
    atomic_write_text(out / "eda.json", json.dumps(result, indent=2) + "\n")
    return result


def _spread(s: pd.Series) -> dict:
    return {"min": float(s.min()), "median": float(s.median()), "max": float(s.max())} if len(s) else {}
