"""Group-wise, stratified k-fold splits and the leak check.

A group's rows share something the labels hang on (a person's seven pictures share their face,
gender and age): a group split across folds lets the model recognise the face instead of learning
the labels, and the OOF score lies. Stratification is on the joint of the factors that are constant
within every group (gender × age group for the mask task), derived from the data rather than named.
A table without groups makes every row its own group.
"""
from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pandas as pd

from multitask.data.table import factor_values, numeric_matrix
from multitask.labels import Task, mixed_radix


class FoldLeakError(AssertionError):
    pass


# a column of groups that belong together (a person listed in two folders, data/layout.py): the split
# keeps them in one fold, while each stays a group of its own in folds.csv, as runs made before hold it
SPLIT_GROUP = "split_group"


def group_level_factors(df: pd.DataFrame, task: Task) -> list[str]:
    per_group = df.groupby("group")[task.factor_names].nunique()
    return [f for f in task.factor_names if (per_group[f] == 1).all()]


def split_strata(df: pd.DataFrame, task: Task, columns: list[str], n_folds: int) -> np.ndarray:
    """Each row's stratum: the joint class of `columns`, less the last of them while no stratum holds
    as many groups as the fold count (a split cannot be stratified on classes that small; many fine
    classes over few groups come to that). Groups, not rows: the split places groups, and a person's
    seven pictures are one of them."""
    while columns:
        sizes = tuple(task.factors[task.factor_names.index(f)].n for f in columns)
        strata = mixed_radix(df[columns].to_numpy(), sizes)
        per_group = pd.Series(strata).groupby(df["group"].to_numpy()).first().to_numpy()  # constant within a group
        if np.bincount(per_group).max() >= n_folds:
            return strata
        columns = columns[:-1]
    return np.zeros(len(df), np.int64)


def make_folds(df: pd.DataFrame, task: Task, n_folds: int, seed: int) -> pd.DataFrame:
    """One row per group with its fold and its labels' digest (`with_labels`)."""
    n_groups = df["group"].nunique()
    if n_groups < n_folds:
        raise ValueError(f"train.folds {n_folds}: the training data holds {n_groups} groups (persons), too few "
                         f"to fill {n_folds} folds")
    # imported here: scikit-learn (with scipy) takes most of a second to import, and every command
    # reads the folds while training alone makes them
    from sklearn.model_selection import StratifiedGroupKFold

    strata = split_strata(df, task, group_level_factors(df, task), n_folds)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = np.full(len(df), -1, dtype=np.int64)
    with warnings.catch_warnings():
        # small demo sets have strata rarer than the fold count; the split is still grouped
        warnings.filterwarnings("ignore", message="The least populated class")
        together = df[SPLIT_GROUP] if SPLIT_GROUP in df.columns else df["group"]
        for k, (_, val_idx) in enumerate(splitter.split(np.zeros(len(df)), strata, groups=together)):
            fold[val_idx] = k
    per_image = pd.DataFrame({"group": df["group"].to_numpy(), "fold": fold})
    check_no_leak(per_image)
    return with_labels(per_image.drop_duplicates("group").sort_values("group").reset_index(drop=True), df, task)


def group_labels(df: pd.DataFrame, task: Task) -> pd.Series:
    """A short digest of each group's labels (every factor's class and number), by group: of the
    group's rows as a set, so that rows listed in another order (which the fold outputs' image ids
    catch, with their own message) still digest alike."""
    labels = np.column_stack([factor_values(df, task).astype(np.float64), numeric_matrix(df, task)])
    labels[np.isnan(labels)] = np.nan  # one NaN bit pattern: an unknown number digests alike every time
    if df.empty:
        return pd.Series(dtype=object)
    codes, names = pd.factorize(df["group"])
    order = np.lexsort([*labels.T[::-1], codes])  # by group, then by label within it
    groups, labels = names.to_numpy()[codes[order]], labels[order]
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    ends = np.r_[starts[1:], len(groups)]
    return pd.Series({groups[a]: hashlib.sha1(labels[a:b].tobytes()).hexdigest()[:12] for a, b in zip(starts, ends)},
                     dtype=object)


def with_labels(folds: pd.DataFrame, df: pd.DataFrame, task: Task) -> pd.DataFrame:
    """The per-group folds with their labels' digest, which folds.csv keeps: models trained on labels
    since edited (a fixed typo, a relabelled person) would otherwise be read, resumed and scored
    against the new ones without a word."""
    return folds.assign(labels=folds["group"].map(group_labels(df, task)))


def check_labels(folds: pd.DataFrame, df: pd.DataFrame, task: Task, where: str) -> None:
    """The training data's labels are still those its folds were made with (folds.csv from before
    digests were kept has none to check)."""
    if "labels" not in folds.columns:
        return
    now = group_labels(df, task)
    kept = folds.set_index("group")["labels"]
    changed = [g for g in now.index if g in kept.index and kept[g] != now[g]]
    if changed:
        raise ValueError(f"{where}: the labels of {len(changed)} group(s) differ from those the run was trained on, "
                         f"e.g. {changed[0]!r}; was the training table edited? Train into a new --out (or "
                         f"`mt train --force` to start this run over)")


def read_folds(path) -> pd.DataFrame:
    folds = pd.read_csv(path, dtype={"group": str, "person": str, "labels": str}, keep_default_na=False)
    folds = folds.rename(columns={"person": "group"})  # runs made before table tasks named it person
    missing = [c for c in ("group", "fold") if c not in folds.columns]
    if missing:
        raise ValueError(f"{path}: damaged, no column {missing[0]!r} (columns: {list(folds.columns)}); it is the "
                         f"run's split, which `mt train --force` makes again")
    try:
        if not pd.api.types.is_integer_dtype(folds["fold"]):
            bad = folds["fold"][~folds["fold"].astype(str).str.fullmatch(r"-?\d+")]
            raise FoldLeakError(f"folds that are not whole numbers, e.g. {bad.iloc[0]!r}")
        check_no_leak(folds)
    except FoldLeakError as e:  # a hand edit or a bad merge: a damaged file, not a bug of the split
        raise ValueError(f"{path}: damaged, {e}; it is the run's split, which `mt train --force` makes again") from None
    return folds


def check_no_leak(folds: pd.DataFrame) -> None:
    """Raise if any group's images sit in more than one fold (or in none)."""
    per_group = folds.groupby("group")["fold"].nunique()
    leaked = per_group[per_group > 1]
    if len(leaked):
        raise FoldLeakError(f"{len(leaked)} group(s) in more than one fold, e.g. {leaked.index[0]!r}")
    if (folds["fold"] < 0).any():
        raise FoldLeakError("some groups were given no fold")


def assign_folds(df: pd.DataFrame, folds: pd.DataFrame, where: str = "folds.csv", data: str = "") -> np.ndarray:
    """Fold of each image row, from the per-group table (`where` and `data` name the files in an error)."""
    fold_of = dict(zip(folds["group"], folds["fold"]))
    missing = set(df["group"]) - set(fold_of)
    if missing:
        raise ValueError(f"{where}: {len(missing)} group(s) of the training data{' in ' + data if data else ''} have no "
                         f"fold, e.g. {sorted(missing)[0]!r}; is it the data the run was trained on?")
    return df["group"].map(fold_of).to_numpy(dtype=np.int64)
