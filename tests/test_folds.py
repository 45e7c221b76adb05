"""Folds are grouped by person (never a leak) and stratified on the person-level factors."""
import numpy as np
import pandas as pd
import pytest

from multitask.data.folds import (FoldLeakError, assign_folds, check_labels, check_no_leak, group_level_factors,
                                  make_folds)
from multitask.labels import Factor, Task, mask_task


def fake_table(n_persons=200, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_persons):
        g, a = rng.integers(2), rng.choice(3, p=[0.5, 0.35, 0.15])
        for m in [0, 0, 0, 0, 0, 1, 2]:
            rows.append((f"p{p:04d}", m, g, a, 20.0 + 30 * a))
    return pd.DataFrame(rows, columns=["group", "mask", "gender", "age", "age_value"])


def test_group_level_factors_are_derived_from_data():
    assert group_level_factors(fake_table(), mask_task()) == ["gender", "age"]


def test_no_person_in_two_folds_and_every_person_placed():
    df = fake_table()
    folds = make_folds(df, mask_task(), 5, seed=0)
    assert folds["group"].is_unique and set(folds["group"]) == set(df["group"])
    assert folds["fold"].value_counts().between(30, 50).all()  # 200 persons, about 40 a fold
    fold = assign_folds(df, folds)
    assert sorted(np.unique(fold)) == [0, 1, 2, 3, 4]
    per_image = pd.DataFrame({"group": df["group"], "fold": fold})
    check_no_leak(per_image)
    # the check is not vacuous: the same rows split without regard to persons leak, and so does one
    # picture moved to another fold
    with pytest.raises(FoldLeakError, match="more than one fold"):
        check_no_leak(per_image.assign(fold=np.arange(len(df)) % 5))
    moved = per_image.copy()
    moved.loc[3, "fold"] = (moved.loc[3, "fold"] + 1) % 5
    with pytest.raises(FoldLeakError, match="1 group"):
        check_no_leak(moved)


def test_folds_are_stratified_on_gender_and_age():
    df = fake_table(400)
    fold = assign_folds(df, make_folds(df, mask_task(), 5, seed=0))
    strata = df["gender"] * 3 + df["age"]
    overall = strata.value_counts(normalize=True).sort_index()
    for k in range(5):
        share = strata[fold == k].value_counts(normalize=True).sort_index()
        assert np.abs(share - overall).max() < 0.03, (k, share, overall)


def test_folds_are_deterministic_per_seed():
    df = fake_table()
    a = make_folds(df, mask_task(), 5, seed=3)
    b = make_folds(df, mask_task(), 5, seed=3)
    c = make_folds(df, mask_task(), 5, seed=4)
    assert a.equals(b) and not a.equals(c)


def test_leak_check_catches_a_split_person():
    leaked = pd.DataFrame({"group": ["a", "a", "b"], "fold": [0, 1, 1]})
    with pytest.raises(FoldLeakError, match="more than one fold"):
        check_no_leak(leaked)


def test_a_damaged_folds_csv_is_named_as_such(tmp_path):
    # a hand edit or a bad merge: one line that names the file, not the split's own assertion
    from multitask.data.folds import read_folds

    for rows, problem in (("a,0\na,1\nb,1\n", "1 group\(s\) in more than one fold"),
                          ("a,0\nb,-1\n", "some groups were given no fold"),
                          ("a,0\nb,one\n", "folds that are not whole numbers, e.g. 'one'")):
        path = tmp_path / "folds.csv"
        path.write_text("group,fold\n" + rows)
        with pytest.raises(ValueError, match=f"{path}: damaged, {problem}.*`mt train --force` makes again") as e:
            read_folds(path)
        assert not isinstance(e.value, AssertionError)


def test_too_few_persons_is_an_error():
    with pytest.raises(ValueError, match=r"train.folds 5: the training data holds 3 groups \(persons\), too few"):
        make_folds(fake_table(3), mask_task(), 5, seed=0)


def test_classes_too_fine_for_the_folds_are_stratified_on_fewer_factors():
    # 60 rows, each its own group, 8 x 4 joint classes of under 5 rows each: the joint cannot be
    # stratified over 5 folds, the first factor alone (7 or 8 rows a class) can
    task = Task("table", (Factor("colour", tuple("abcdefgh")), Factor("kind", tuple("wxyz"))))
    n = np.arange(60)
    df = pd.DataFrame({"group": [f"{i}.jpg" for i in n], "colour": n % 8, "kind": (n // 8) % 4})
    fold = assign_folds(df, make_folds(df, task, 5, seed=0))
    assert sorted(np.unique(fold)) == [0, 1, 2, 3, 4]
    per_fold = pd.crosstab(fold, df["colour"])
    assert per_fold.to_numpy().min() >= 1 and per_fold.to_numpy().max() <= 2  # each colour spread over the folds


def test_strata_are_sized_in_groups_not_pictures():
    """Seven pictures of one person are one group to place: 40 persons in 8 x 4 joint classes hold
    at most 2 persons a class, too few for 5 folds, although each class has 7 or more pictures."""
    from multitask.data.folds import split_strata

    task = Task("table", (Factor("colour", tuple("abcdefgh")), Factor("kind", tuple("wxyz"))))
    persons = np.arange(40)
    df = pd.DataFrame({"group": np.repeat([f"p{i}" for i in persons], 7),
                       "colour": np.repeat(persons % 8, 7), "kind": np.repeat((persons // 8) % 4, 7)})
    strata = split_strata(df, task, ["colour", "kind"], 5)
    assert len(np.unique(strata)) == 8  # colour alone, 5 persons a class; the joint has up to 2


def test_folds_keep_each_groups_labels_and_find_them_edited():
    df = fake_table(20)
    folds = make_folds(df, mask_task(), 5, seed=0)
    assert folds["labels"].str.fullmatch("[0-9a-f]{12}").all() and folds["labels"].nunique() > 1
    check_labels(folds, df.sample(frac=1, random_state=0), mask_task(), "folds.csv")  # rows in another order
    check_labels(folds, df[df["group"] != "p0000"], mask_task(), "folds.csv")  # a person left out
    check_labels(folds.drop(columns="labels"), df.assign(gender=0), mask_task(), "folds.csv")  # an old folds.csv
    edits = {"a class": df.assign(mask=np.where(df.index == 3, 1, df["mask"])),
             "a number": df.assign(age_value=np.where(df.index == 3, 21.0, df["age_value"])),
             "a number now unknown": df.assign(age_value=np.where(df.index == 3, np.nan, df["age_value"])),
             "a picture more": pd.concat([df.iloc[:1], df])}
    for edited in edits.values():
        with pytest.raises(ValueError, match=r"folds.csv: the labels of 1 group\(s\) differ .* e\.g\. 'p0000'"):
            check_labels(folds, edited, mask_task(), "folds.csv")
