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

from multitask.data.table import DataError, ImageTable, value_column
from multitask.labels import mask_task

IMAGE_EXTS = {".jpg", ".jpeg", ".png"}
MASK_STEMS = {"mask1": 0, "mask2": 0, "mask3": 0, "mask4": 0, "mask5": 0, "incorrect_mask": 1, "normal": 2}
GENDERS = {"male": 0, "female": 1}
TRAIN_COLUMNS = ["id", "gender", "race", "age", "path"]


class LayoutError(DataError):
    pass


def read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise LayoutError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # pandas raises many kinds for a broken CSV
        raise LayoutError(f"{path}: cannot be read as CSV ({e})") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise LayoutError(f"{path}: missing column(s) {missing}; expected {columns}, found {list(df.columns)}")
    return df


def is_image_file(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS


def person_images(folder: Path) -> dict[str, Path]:
    """The person's pictures by stem; hidden files (`._mask1.jpg`) and non-images are not pictures."""
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not is_image_file(p):
            continue
        if p.stem not in MASK_STEMS:
            raise LayoutError(f"{p}: unexpected picture name {p.stem!r}; expected one of {sorted(MASK_STEMS)}")
        if p.stem in found:
            raise LayoutError(f"{p}: two pictures named {p.stem!r} in {folder} ({found[p.stem].name}, {p.name})")
        found[p.stem] = p
    return found


def read_train(root: Path, age_bins: list[int]) -> pd.DataFrame:
    csv_path = root / "train" / "train.csv"
    people = read_csv(csv_path, TRAIN_COLUMNS)
    if people.empty:
        raise LayoutError(f"{csv_path}: no persons")
    twice = people["path"][people["path"].duplicated()]
    if len(twice):
        raise LayoutError(f"{csv_path}: person folder {twice.iloc[0]!r} is listed twice")
    images_dir = root / "train" / "images"
    rows = []
    for line, rec in enumerate(people.itertuples(index=False), start=2):
        where = f"{csv_path} line {line}"
        gender = GENDERS.get(rec.gender.strip().lower())
        if gender is None:
            raise LayoutError(f"{where}: gender {rec.gender!r} is not one of {list(GENDERS)}")
        try:
            age = int(rec.age)
        except ValueError:
            raise LayoutError(f"{where}: age {rec.age!r} is not an integer") from None
        if age < 0:
            raise LayoutError(f"{where}: negative age {age}")
        folder = images_dir / rec.path
        if not rec.path or not folder.is_dir():
            raise LayoutError(f"{where}: image folder {folder} not found")
        pics = person_images(folder)
        if not pics:
            raise LayoutError(f"{folder}: no pictures (expected {sorted(MASK_STEMS)})")
        for stem, p in pics.items():
            rows.append((rec.path, str(p), f"{where} ({p.name})", stem, MASK_STEMS[stem], gender, age))
    df = pd.DataFrame(rows, columns=["group", "path", "where", "stem", "mask", "gender", value_column("age")])
    df["age"] = mask_task(age_bins).factors[2].bin(df[value_column("age")].to_numpy())
    return df


def read_test(root: Path) -> pd.DataFrame | None:
    eval_dir = root / "eval"
    if not eval_dir.exists():
        return None
    info_path = eval_dir / "info.csv"
    info = read_csv(info_path, ["ImageID", "ans"])
    dupes = info["ImageID"][info["ImageID"].duplicated()]
    if len(dupes):
        raise LayoutError(f"{info_path}: duplicate ImageID {dupes.iloc[0]!r}")
    paths = [eval_dir / "images" / i for i in info["ImageID"]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise LayoutError(f"{info_path}: {len(missing)} image(s) not found, e.g. {missing[0]}")
    return pd.DataFrame({"image_id": info["ImageID"].to_numpy(), "path": [str(p) for p in paths]})


def read_layout(root: str | Path, age_bins: list[int]) -> ImageTable:
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"{root}: data root not found")
    test = read_test(root)
    return ImageTable(read_train(root, age_bins), test, root / "eval" / "info.csv" if test is not None else None)
