"""The synthetic mask-competition data set: layout, labels, determinism and that the cues are there."""
from __future__ import annotations

import csv
import re

import numpy as np
import pytest
from PIL import Image

from multitask.data.synthetic import make_demo_dataset

STEMS = {"mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal"}
MASK_OF_STEM = {"mask1": 0, "mask2": 0, "mask3": 0, "mask4": 0, "mask5": 0, "incorrect_mask": 1, "normal": 2}
SIZE = (128, 96)  # height, width


def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def _age_group(age: int) -> int:
    return 0 if age < 30 else 1 if age < 60 else 2


def _person_files(root, folder):
    return {p.stem: p for p in (root / "train" / "images" / folder).iterdir()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    info = make_demo_dataset(out, n_train_persons=36, n_eval_persons=10, image_size=SIZE, seed=3)
    return out, info


def test_return_value(built):
    out, info = built
    assert info["root"] == out
    assert info["answers"] == out / "answers.csv"
    assert info["n_train_images"] == 36 * 7
    assert info["n_eval_images"] == 10 * 7


def test_train_layout(built):
    out, _ = built
    header, rows = _read_csv(out / "train" / "train.csv")
    assert header == ["id", "gender", "race", "age", "path"]
    assert len(rows) == 36
    exts = set()
    for pid, gender, race, age, folder in rows:
        assert re.fullmatch(r"\d{6}", pid)
        assert gender in ("male", "female")
        assert race in ("White", "Black", "Asian", "Indian", "Others")
        assert folder == f"{pid}_{gender}_{race}_{int(age)}"
        files = list((out / "train" / "images" / folder).iterdir())
        assert len(files) == 7
        assert {p.stem for p in files} == STEMS
        person_exts = {p.suffix for p in files}
        assert len(person_exts) == 1  # one extension per person
        exts |= person_exts
    assert exts == {".jpg", ".jpeg", ".png"}
    assert len({r[0] for r in rows}) == 36
    assert sorted(p.name for p in (out / "train" / "images").iterdir()) == sorted(r[4] for r in rows)


def test_eval_layout(built):
    out, _ = built
    info_header, info_rows = _read_csv(out / "eval" / "info.csv")
    ans_header, ans_rows = _read_csv(out / "answers.csv")
    assert info_header == ans_header == ["ImageID", "ans"]
    assert len(info_rows) == 70
    assert [r[0] for r in info_rows] == [r[0] for r in ans_rows]
    assert {r[1] for r in info_rows} == {"0"}
    ids = [r[0] for r in info_rows]
    assert len(set(ids)) == len(ids)
    for image_id in ids:
        assert re.fullmatch(r"[0-9a-f]{40}\.jpg", image_id)
        assert (out / "eval" / "images" / image_id).is_file()
    assert sorted(p.name for p in (out / "eval" / "images").iterdir()) == sorted(ids)
    assert not (out / "eval" / "answers.csv").exists()
    assert not list(out.rglob("*.tmp"))


def test_eval_order_is_shuffled(built):
    out, _ = built
    _, ans_rows = _read_csv(out / "answers.csv")
    # grouped by person, the mask labels would run 0,0,0,0,0,1,2 seven at a time
    masks = [int(r[1]) // 6 for r in ans_rows]
    assert masks != [MASK_OF_STEM[s] for s in ["mask1"] * 5 + ["incorrect_mask", "normal"]] * 10


def test_answer_classes(built):
    out, _ = built
    _, ans_rows = _read_csv(out / "answers.csv")
    classes = np.array([int(r[1]) for r in ans_rows])
    assert classes.min() >= 0 and classes.max() <= 17
    # each eval person gives 5 worn, 1 incorrect, 1 not worn
    masks = classes // 6
    assert np.bincount(masks, minlength=3).tolist() == [50, 10, 10]


def test_train_labels_cover_all_classes(built):
    out, _ = built
    _, rows = _read_csv(out / "train" / "train.csv")
    classes = set()
    for pid, gender, race, age, folder in rows:
        age = int(age)
        assert 18 <= age <= 80
        g = ("male", "female").index(gender)
        for stem in _person_files(out, folder):
            classes.add(MASK_OF_STEM[stem] * 6 + g * 3 + _age_group(age))
    assert classes == set(range(18))


def test_images_decode_to_size(built):
    out, _ = built
    _, rows = _read_csv(out / "train" / "train.csv")
    paths = [p for r in rows[:10] for p in _person_files(out, r[4]).values()]
    paths += sorted((out / "eval" / "images").iterdir())[:10]
    for p in paths:
        with Image.open(p) as im:
            assert im.size == (SIZE[1], SIZE[0])
            assert im.mode == "RGB"
            assert im.format == ("PNG" if p.suffix == ".png" else "JPEG")


def test_other_image_size(tmp_path):
    make_demo_dataset(tmp_path, n_train_persons=2, n_eval_persons=1, image_size=(80, 60), seed=0)
    for p in list((tmp_path / "train" / "images").rglob("*.*")) + list((tmp_path / "eval" / "images").iterdir()):
        with Image.open(p) as im:
            assert im.size == (60, 80)


def test_deterministic(tmp_path):
    a = make_demo_dataset(tmp_path / "a", n_train_persons=8, n_eval_persons=3, seed=11)["root"]
    b = make_demo_dataset(tmp_path / "b", n_train_persons=8, n_eval_persons=3, seed=11)["root"]
    c = make_demo_dataset(tmp_path / "c", n_train_persons=8, n_eval_persons=3, seed=12)["root"]
    for rel in ["train/train.csv", "eval/info.csv", "answers.csv"]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a[::5]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert (a / "answers.csv").read_bytes() != (c / "answers.csv").read_bytes()
    assert (a / "train/train.csv").read_bytes() != (c / "train/train.csv").read_bytes()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        make_demo_dataset(tmp_path, n_train_persons=-1)
    with pytest.raises(ValueError):
        make_demo_dataset(tmp_path, image_size=(8, 8))


def _load(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64)


def _region(arr, rows, cols):
    h, w = arr.shape[:2]
    return arr[int(rows[0] * h):int(rows[1] * h), int(cols[0] * w):int(cols[1] * w)]


def test_mask_cue_in_lower_face(built):
    """Skin (and the mouth) is much redder than blue on average than the mask palette."""
    out, _ = built
    _, rows = _read_csv(out / "train" / "train.csv")
    red_minus_blue = {"worn": [], "normal": []}
    for r in rows:
        files = _person_files(out, r[4])
        for stem, p in files.items():
            if stem == "incorrect_mask":
                continue
            region = _region(_load(p), (0.53, 0.58), (0.42, 0.58))
            red_minus_blue["normal" if stem == "normal" else "worn"].append(
                float(region[..., 0].mean() - region[..., 2].mean()))
    assert np.mean(red_minus_blue["normal"]) > np.mean(red_minus_blue["worn"]) + 40


def test_age_cue_in_hair_brightness(built):
    out, _ = built
    _, rows = _read_csv(out / "train" / "train.csv")
    by_group = {0: [], 1: [], 2: []}
    for r in rows:
        img = _load(_person_files(out, r[4])["normal"])
        by_group[_age_group(int(r[3]))].append(float(np.median(_region(img, (0.15, 0.25), (0.42, 0.58)).mean(-1))))
    young, mid, old = (np.mean(by_group[g]) for g in range(3))
    assert mid > young + 25
    assert old > mid + 25


def test_parallel_drawing_writes_the_same_files(tmp_path):
    one = make_demo_dataset(tmp_path / "one", n_train_persons=6, n_eval_persons=2, seed=5)["root"]
    two = make_demo_dataset(tmp_path / "two", n_train_persons=6, n_eval_persons=2, seed=5, workers=2)["root"]
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    for rel in files:
        assert (one / rel).read_bytes() == (two / rel).read_bytes(), rel
