"""Read and validate a mask-competition root into image tables.

DATA/train/train.csv (id,gender,race,age,path) + DATA/train/images/<path>/{mask1..5,incorrect_mask,normal}.*
DATA/eval/info.csv (ImageID,ans) + DATA/eval/images/<ImageID>

It returns the same image table as a table task (`table.py`): a row per image with its person as the
group, the path, one integer column per factor and the age in years behind the age factor; the test
table has `image_id` and `path`. This module is one of the few that know the words mask, gender and age.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from multitask.data.cache import IMAGE_SUFFIXES
from multitask.data.folds import SPLIT_GROUP
from multitask.data.table import (SKIPPED_COLUMNS, DataError, ImageTable, image_path, listed_before, problems_error,
                                  read_csv_cells, row_names, value_column)
from multitask.labels import mask_task

MASK_STEMS = {"mask1": 0, "mask2": 0, "mask3": 0, "mask4": 0, "mask5": 0, "incorrect_mask": 1, "normal": 2}
GENDERS = {"male": 0, "female": 1}
TRAIN_COLUMNS = ["id", "gender", "race", "age", "path"]


class LayoutError(DataError):
    pass


def read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise LayoutError(f"{path}: file not found")
    try:
        df = read_csv_cells(path)
    except Exception as e:  # pandas raises many kinds for a broken CSV
        raise LayoutError(f"{path}: cannot be read as CSV ({e})") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise LayoutError(f"{path}: missing column(s) {missing}; expected {columns}, found {list(df.columns)}")
    return df


def is_image_file(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES


def person_images(folder: Path, problems: list[str], root: Path | None = None) -> dict[str, Path]:
    """The person's pictures by stem; hidden files (`._mask1.jpg`) and non-images are not pictures.
    Each must be a file under `root` (train/images): a picture linked to a test image would be both."""
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not is_image_file(p):
            continue
        why = image_path(root, p.relative_to(root).as_posix())[1] if root is not None else None
        if why:
            problems.append(f"{p}: {why}")
        elif p.stem not in MASK_STEMS:
            problems.append(f"{p}: unexpected picture name {p.stem!r}; expected one of {sorted(MASK_STEMS)}")
        elif p.stem in found:
            problems.append(f"{p}: two pictures named {p.stem!r} in {folder} ({found[p.stem].name}, {p.name})")
        else:
            found[p.stem] = p
    return found


def read_train(root: Path, age_bins: list[int], skipped: list[tuple[str, str, str]] | None = None) -> pd.DataFrame:
    """Every person of train.csv with their pictures; every problem is collected, then all are
    reported at once, each with its file and line. Given a `skipped` list, a person with a problem is
    left out instead, with all their pictures, and listed there as (where, path, reason).

    A person's group is their folder; `split_group` names the first folder listed with the same id, gender
    and age, which the split keeps in one fold with it (one person in two folders would otherwise train
    in one fold and be validated in another). An id shared by persons of other labels is a typo's,
    not one person."""
    csv_path = root / "train" / "train.csv"
    people = read_csv(csv_path, TRAIN_COLUMNS)
    if people.empty:
        raise LayoutError(f"{csv_path}: no persons")
    images_dir = root / "train" / "images"
    problems, rows, seen, persons = [], [], {}, {}
    for line, rec in zip(row_names(csv_path, "line", len(people)), people.itertuples(index=False)):
        where = f"{csv_path} {line}"
        before = len(problems)
        gender = GENDERS.get(rec.gender.strip().lower())
        if gender is None:
            problems.append(f"{where}: gender {rec.gender!r} is not one of {list(GENDERS)}")
        try:
            age = int(rec.age)
            if age < 0:
                problems.append(f"{where}: negative age {age}")
        except ValueError:
            problems.append(f"{where}: age {rec.age!r} is not an integer")
        folder, why = image_path(images_dir, rec.path, folder=True)
        if why:
            problems.append(f"{where}: {why}")
        elif first := listed_before(seen, folder, rec.path, line):
            problems.append(f"{where}: person folder {rec.path!r} is listed twice ({first})")
            folder = None
        pics = person_images(folder, problems, images_dir) if folder is not None else {}
        if folder is not None and not pics:
            problems.append(f"{where}: {folder} has no pictures (expected {sorted(MASK_STEMS)})")
        if len(problems) > before:
            if skipped is not None:  # the person is left out with every picture, and said why
                skipped.append((where, str(images_dir / rec.path),
                                "; ".join(p.split(": ", 1)[-1] for p in problems[before:])))
                del problems[before:]
            continue
        pid = rec.id.strip()  # a blank id names nobody: such persons are not joined
        person = persons.setdefault((pid, gender, age), rec.path) if pid else rec.path
        for stem, p in pics.items():
            rows.append((rec.path, person, str(p), f"{where} ({p.name})", stem, MASK_STEMS[stem], gender, age))
    if problems and skipped is None:
        raise problems_error(csv_path, problems, LayoutError)
    df = pd.DataFrame(rows, columns=["group", SPLIT_GROUP, "path", "where", "stem", "mask", "gender", value_column("age")])
    df["age"] = mask_task(age_bins).factors[2].bin(df[value_column("age")].to_numpy())
    return df


def read_test(root: Path) -> pd.DataFrame | None:
    """eval/info.csv's images; an ImageID must name a file under eval/images (no absolute path, no
    '..' and no link leading out: a training image must not become a test image)."""
    eval_dir = root / "eval"
    if not eval_dir.exists():
        return None
    info_path = eval_dir / "info.csv"
    info = read_csv(info_path, ["ImageID", "ans"])
    if info.empty:  # an empty submission, and pseudo labels that "reach no precision", would follow
        raise LayoutError(f"{info_path}: lists no test image; without test images leave eval/ out")
    problems, paths, seen = [], [], {}
    for line, image_id in zip(row_names(info_path, "line", len(info)), info["ImageID"]):
        path, why = image_path(eval_dir / "images", image_id)
        if why:
            problems.append(f"{line}: {why}")
        elif first := listed_before(seen, path, image_id, line):
            problems.append(f"{line}: duplicate ImageID {image_id!r} ({first})")
        paths.append(str(path))
    if problems:
        raise problems_error(info_path, problems, LayoutError)
    return pd.DataFrame({"image_id": info["ImageID"].to_numpy(), "path": paths})


def read_layout(root: str | Path, age_bins: list[int], skip_bad: bool = False) -> ImageTable:
    """The competition root as an image table. With `skip_bad`, persons with a problem are left out
    (and listed in the table's `skipped`); a test image never is: the submission needs every one."""
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"{root}: data root not found")
    try:  # the test side's problems are listed with the training side's, not found on the next try
        test, test_error = read_test(root), None
    except LayoutError as e:
        test, test_error = None, e
    skipped: list[tuple[str, str, str]] | None = [] if skip_bad else None
    try:
        train = read_train(root, age_bins, skipped)
    except LayoutError as e:
        raise (LayoutError(f"{e}\n{test_error}") if test_error else e) from None
    if test_error:
        raise test_error
    table = ImageTable(train, test, root / "eval" / "info.csv" if test is not None else None)
    if skipped:
        table.skipped = pd.DataFrame(skipped, columns=SKIPPED_COLUMNS)
    if table.train.empty:
        raise LayoutError(f"{root / 'train' / 'train.csv'}: no person is left to train on; "
                          + "; ".join(f"{w}: {r}" for w, _, r in (skipped or [])[:10]))
    return table
