"""Person-grouped, stratified k-fold splits and the leak check.

A person's seven pictures share their face, gender and age: a person split across folds lets the
model recognise the face instead of learning the labels, and the OOF score lies. Stratification is
on the joint of the factors that are constant within a person (gender × age group for the mask task),
derived from the data rather than named.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from multitask.labels import Task, mixed_radix


class FoldLeakError(AssertionError):
    pass


def person_level_factors(df: pd.DataFrame, task: Task) -> list[str]:
    per_person = df.groupby("person")[task.factor_names].nunique()
    return [f for f in task.factor_names if (per_person[f] == 1).all()]


def make_folds(df: pd.DataFrame, task: Task, n_folds: int, seed: int) -> pd.DataFrame:
    """One row per person with its fold."""
    n_persons = df["person"].nunique()
    if n_persons < n_folds:
        raise ValueError(f"{n_persons} persons cannot fill {n_folds} folds")
    strat_cols = person_level_factors(df, task)
    sizes = tuple(task.factors[task.factor_names.index(f)].n for f in strat_cols)
    strata = mixed_radix(df[strat_cols].to_numpy(), sizes) if strat_cols else np.zeros(len(df), np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = np.full(len(df), -1, dtype=np.int64)
    with warnings.catch_warnings():
        # small demo sets have strata rarer than the fold count; the split is still grouped
        warnings.filterwarnings("ignore", message="The least populated class")
        for k, (_, val_idx) in enumerate(splitter.split(np.zeros(len(df)), strata, groups=df["person"])):
            fold[val_idx] = k
    per_image = pd.DataFrame({"person": df["person"].to_numpy(), "fold": fold})
    check_no_leak(per_image)
    return per_image.drop_duplicates("person").sort_values("person").reset_index(drop=True)


def check_no_leak(folds: pd.DataFrame) -> None:
    """Raise if any person's images sit in more than one fold (or in none)."""
    per_person = folds.groupby("person")["fold"].nunique()
    leaked = per_person[per_person > 1]
    if len(leaked):
        raise FoldLeakError(f"{len(leaked)} person(s) in more than one fold, e.g. {leaked.index[0]!r}")
    if (folds["fold"] < 0).any():
        raise FoldLeakError("some persons were given no fold")


def assign_folds(df: pd.DataFrame, folds: pd.DataFrame) -> np.ndarray:
    """Fold of each image row, from the per-person table."""
    fold_of = dict(zip(folds["person"], folds["fold"]))
    missing = set(df["person"]) - set(fold_of)
    if missing:
        raise ValueError(f"{len(missing)} person(s) have no fold in folds.csv, e.g. {sorted(missing)[0]!r}")
    return df["person"].map(fold_of).to_numpy(dtype=np.int64)
