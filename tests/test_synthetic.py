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


def test_a_set_made_again_without_test_persons_keeps_no_earlier_test_images(tmp_path):
    from multitask.data.layout import read_layout
    make_demo_dataset(tmp_path, n_train_persons=6, n_eval_persons=1, seed=0)
    make_demo_dataset(tmp_path, n_train_persons=6, n_eval_persons=0, seed=0)
    assert not (tmp_path / "eval").exists()  # its info.csv was read as this set's 7 test images
    assert read_layout(tmp_path, [30, 60]).test is None


def test_the_demo_refuses_age_groups_its_faces_do_not_show(tmp_path):
    from multitask.config import ConfigError
    from multitask.demo import run_demo
    # it trained on them, then scored against answers drawn at 30 and 60
    with pytest.raises(ConfigError, match=r"data.age_bins must stay \[30, 60\]"):
        run_demo(tmp_path / "demo", 6, 1, ["data.age_bins=[25, 50]"], log=lambda *a: None)
    assert not (tmp_path / "demo").exists()


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


# --- table-task mode: make_table_dataset ------------------------------------------------------------

TABLE_SIZE = (32, 32)
TABLE_RGB = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}


def _size_bin(size: float) -> int:
    return 0 if size < 20 else 1 if size < 30 else 2


def _sha1_tree(root) -> dict:
    import hashlib
    return {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def table_built(tmp_path_factory):
    from multitask.data.synthetic import make_table_dataset
    out = tmp_path_factory.mktemp("table")
    info = make_table_dataset(out, n_train_groups=6, n_test_groups=2, per_group=3, image_size=TABLE_SIZE, seed=4)
    return out, info


def test_table_return_value_and_columns(table_built):
    out, info = table_built
    assert info == {"root": out, "table": out / "train.csv", "test": out / "test.csv",
                    "answers": out / "answers.csv", "n_train_images": 18, "n_test_images": 6}
    header, rows = _read_csv(out / "train.csv")
    assert header == ["path", "group", "shape", "colour", "size"] and len(rows) == 18
    header, rows = _read_csv(out / "test.csv")
    assert header == ["path"] and len(rows) == 6
    header, rows = _read_csv(out / "answers.csv")
    assert header == ["path", "shape", "colour", "size"] and len(rows) == 6
    assert not list(out.rglob("*.tmp"))


def test_table_train_labels(table_built):
    out, _ = table_built
    _, rows = _read_csv(out / "train.csv")
    by_group: dict[str, list] = {}
    for path, group, shape, colour, size in rows:
        assert re.fullmatch(r"g\d{4}", group)
        assert re.fullmatch(rf"images/{group}/\d+\.(jpg|png)", path)
        assert (out / path).is_file()
        assert shape in ("circle", "square") and colour in TABLE_RGB
        assert re.fullmatch(r"\d+\.\d", size) and 10 <= float(size) < 40
        by_group.setdefault(group, []).append((shape, colour, size))
    assert len(by_group) == 6 and all(len(v) == 3 for v in by_group.values())
    for pics in by_group.values():
        assert len({p[0] for p in pics}) == 1 and len({p[2] for p in pics}) == 1
    assert any(len({p[1] for p in pics}) > 1 for pics in by_group.values())
    assert {r[2] for r in rows} == {"circle", "square"}
    assert {r[3] for r in rows} == set(TABLE_RGB)
    assert {_size_bin(float(r[4])) for r in rows} == {0, 1, 2}
    assert {p.suffix for p in (out / "images").rglob("*.*")} == {".jpg", ".png"}


def test_table_test_split(table_built):
    out, _ = table_built
    _, train_rows = _read_csv(out / "train.csv")
    _, test_rows = _read_csv(out / "test.csv")
    _, ans_rows = _read_csv(out / "answers.csv")
    test_paths = [r[0] for r in test_rows]
    assert [r[0] for r in ans_rows] == test_paths
    assert len(set(test_paths)) == 6 and all((out / p).is_file() for p in test_paths)
    assert not set(test_paths) & {r[0] for r in train_rows}
    train_groups = {r[1] for r in train_rows}
    test_groups = {p.split("/")[1] for p in test_paths}
    assert len(test_groups) == 2 and not test_groups & train_groups
    assert test_groups == {"g0007", "g0008"}  # numbering continues after the train groups
    for path, shape, colour, size in ans_rows:
        assert shape in ("circle", "square") and colour in TABLE_RGB and 10 <= float(size) < 40
    # every picture on disk is listed exactly once, in train.csv or test.csv
    on_disk = {p.relative_to(out).as_posix() for p in (out / "images").rglob("*.*")}
    assert on_disk == set(test_paths) | {r[0] for r in train_rows}


def test_table_images_and_colour_cue(table_built):
    """The middle of each picture is inside the shape, so its mean colour is nearest the labelled one."""
    out, _ = table_built
    _, train_rows = _read_csv(out / "train.csv")
    _, ans_rows = _read_csv(out / "answers.csv")
    labelled = [(r[0], r[3]) for r in train_rows] + [(r[0], r[2]) for r in ans_rows]
    for path, colour in labelled:
        with Image.open(out / path) as im:
            assert im.size == (TABLE_SIZE[1], TABLE_SIZE[0]) and im.mode == "RGB"
            assert im.format == ("PNG" if path.endswith(".png") else "JPEG")
        centre = _region(_load(out / path), (0.45, 0.55), (0.45, 0.55)).reshape(-1, 3).mean(0)
        nearest = min(TABLE_RGB, key=lambda c: float(np.sum((centre - np.array(TABLE_RGB[c])) ** 2)))
        assert nearest == colour, (path, centre)


def test_table_deterministic(tmp_path):
    from multitask.data.synthetic import make_table_dataset
    kw = dict(n_train_groups=6, n_test_groups=2, per_group=3, image_size=TABLE_SIZE)
    a = _sha1_tree(make_table_dataset(tmp_path / "a", seed=9, **kw)["root"])
    b = _sha1_tree(make_table_dataset(tmp_path / "b", seed=9, **kw)["root"])
    c = _sha1_tree(make_table_dataset(tmp_path / "c", seed=10, **kw)["root"])
    assert a == b
    assert a != c
    assert a["train.csv"] != c["train.csv"]


def test_table_bad_arguments(tmp_path):
    from multitask.data.synthetic import make_table_dataset
    for kw in (dict(n_train_groups=-1), dict(n_test_groups=-1), dict(per_group=0), dict(image_size=(16, 16)),
               dict(image_size=(48, 20))):
        with pytest.raises(ValueError):
            make_table_dataset(tmp_path, **kw)
