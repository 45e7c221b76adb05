"""Reading the competition layout: extensions, hidden files, and clear errors naming the file."""
import shutil

import pytest
from PIL import Image

from multitask.data.layout import LayoutError, read_layout

STEMS = ["mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal"]


def write_person(images_dir, folder, ext=".jpg"):
    d = images_dir / folder
    d.mkdir(parents=True)
    for stem in STEMS:
        Image.new("RGB", (24, 32), (100, 120, 140)).save(d / f"{stem}{ext}")
    return d


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "data"
    images = r / "train" / "images"
    write_person(images, "000001_female_Asian_45", ".jpg")
    write_person(images, "000002_male_White_61", ".jpeg")
    write_person(images, "000003_male_Black_22", ".png")
    write_person(images, "000004_female_Asian_33", ".webp")  # what `mt predict` reads, the layout reads too
    (r / "train" / "train.csv").write_text(
        "id,gender,race,age,path\n"
        "000001,female,Asian,45,000001_female_Asian_45\n"
        "000002,male,White,61,000002_male_White_61\n"
        "000003,male,Black,22,000003_male_Black_22\n"
        "000004,female,Asian,33,000004_female_Asian_33\n")
    (r / "eval" / "images").mkdir(parents=True)
    for name in ["b.jpg", "a.jpg"]:
        Image.new("RGB", (24, 32)).save(r / "eval" / "images" / name)
    (r / "eval" / "info.csv").write_text("ImageID,ans\nb.jpg,0\na.jpg,0\n")
    return r


def test_reads_every_extension_and_labels(root):
    layout = read_layout(root, [30, 60])
    train = layout.train
    assert len(train) == 28
    assert {p.rsplit(".", 1)[1] for p in train["path"]} == {"jpg", "jpeg", "png", "webp"}
    p1 = train[train["group"] == "000001_female_Asian_45"].set_index("stem")
    assert p1.loc["mask3", "mask"] == 0 and p1.loc["incorrect_mask", "mask"] == 1 and p1.loc["normal", "mask"] == 2
    assert (p1["gender"] == 1).all() and (p1["age"] == 1).all()
    p2 = train[train["group"] == "000002_male_White_61"]
    assert (p2["gender"] == 0).all() and (p2["age"] == 2).all()
    assert (train[train["group"] == "000003_male_Black_22"]["age"] == 0).all()
    assert layout.test["image_id"].tolist() == ["b.jpg", "a.jpg"]  # info.csv order kept


def test_hidden_and_non_image_files_are_not_pictures(root):
    d = root / "train" / "images" / "000001_female_Asian_45"
    (d / "._mask1.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")
    (d / ".DS_Store").write_bytes(b"junk")
    (d / "notes.txt").write_text("not a picture")
    train = read_layout(root, [30, 60]).train
    assert len(train) == 28
    assert not any("/." in p for p in train["path"])


def test_age_bins_come_from_config(root):
    train = read_layout(root, [25, 50]).train
    assert (train[train["group"] == "000001_female_Asian_45"]["age"] == 1).all()
    assert (train[train["group"] == "000002_male_White_61"]["age"] == 2).all()


@pytest.mark.parametrize("mutate, message", [
    (lambda r: (r / "train" / "train.csv").write_text("id,gender,age,path\n1,male,3,x\n"), "missing column"),
    (lambda r: (r / "train" / "train.csv").write_text(
        "id,gender,race,age,path\n000001,woman,Asian,45,000001_female_Asian_45\n"), "line 2: gender 'woman'"),
    # a blank line, which pandas skips, and a quoted line break do not shift the lines named after them
    (lambda r: (r / "train" / "train.csv").write_text(
        'id,gender,race,age,path\n\n000001,female,"Asi\nan",45,000001_female_Asian_45\n000002,woman,Asian,45,x\n'),
     "line 5: gender 'woman'"),
    (lambda r: (r / "eval" / "info.csv").write_text("ImageID,ans\na.jpg,0\n\nnothing.jpg,0\n"), "line 4: image .*nothing.jpg"),
    (lambda r: (r / "train" / "train.csv").write_text(
        "id,gender,race,age,path\n000001,female,Asian,45,000001_female_Asian_45,x\n"),
     r"train.csv: cannot be read as CSV \(line 2 has 6 fields, the header 5\)"),
    (lambda r: (r / "train" / "train.csv").write_text(
        "id,gender,race,age,path\n000001,female,Asian,old,000001_female_Asian_45\n"), "age 'old'"),
    (lambda r: (r / "train" / "train.csv").write_text(
        "id,gender,race,age,path\n000009,female,Asian,45,nobody\n"), "image folder .*nobody not found"),
    (lambda r: Image.new("RGB", (8, 8)).save(r / "train" / "images" / "000003_male_Black_22" / "mask9.png"),
     "mask9.png: unexpected picture name"),
    (lambda r: Image.new("RGB", (8, 8)).save(r / "train" / "images" / "000003_male_Black_22" / "normal.jpg"),
     "two pictures named 'normal'"),
    (lambda r: (r / "eval" / "images" / "a.jpg").unlink(), "(?s)info.csv: 1 problem.*line 3: image .*a.jpg not found"),
    (lambda r: (r / "eval" / "info.csv").write_text("ImageID,ans\na.jpg,0\na.jpg,0\n"), "duplicate ImageID"),
    # a name longer than the filesystem takes raised OSError, a traceback without the file's line
    (lambda r: (r / "eval" / "info.csv").write_text(f"ImageID,ans\n{'x' * 300}.jpg,0\n"),
     "(?s)info.csv: 1 problem.*line 2: path 'x+.jpg' cannot be read: File name too long"),
    (lambda r: (r / "eval" / "info.csv").write_text("ImageID,ans\n"), "info.csv: lists no test image; without test images"),
    # a test image must not be a training image, or any file outside eval/images
    (lambda r: (r / "eval" / "info.csv").write_text("ImageID,ans\n../../train/images/000003_male_Black_22/normal.jpg,0\n"),
     "line 2: path '../../train/images/000003_male_Black_22/normal.jpg' leads out of"),
    (lambda r: (r / "eval" / "info.csv").write_text(f"ImageID,ans\n{r / 'train' / 'images' / '000003_male_Black_22' / 'normal.jpg'},0\n"),
     "is absolute"),
    (lambda r: (r / "eval" / "images" / "link.jpg").symlink_to(r / "train" / "images" / "000003_male_Black_22" / "normal.jpg")
     or (r / "eval" / "info.csv").write_text("ImageID,ans\nlink.jpg,0\n"), "'link.jpg' leads out of"),
    (lambda r: (r / "train" / "train.csv").write_text(
        "id,gender,race,age,path\n000009,female,Asian,45,../../eval\n"), "'../../eval' leads out of"),
    # nor may a training picture be a link to a test image
    (lambda r: (r / "train" / "images" / "000003_male_Black_22" / "normal.png").unlink()
     or (r / "train" / "images" / "000003_male_Black_22" / "normal.jpg").symlink_to(r / "eval" / "images" / "a.jpg"),
     "normal.jpg: path '000003_male_Black_22/normal.jpg' leads out of .* through the link"),
])
def test_bad_input_is_a_clear_error_naming_the_file(root, mutate, message):
    mutate(root)
    with pytest.raises(LayoutError, match=message):
        read_layout(root, [30, 60])


def test_a_person_folder_named_two_ways_is_listed_twice(root):
    # one person as two groups would put their pictures in two folds
    (root / "train" / "train.csv").write_text(
        "id,gender,race,age,path\n"
        "000001,female,Asian,45,000001_female_Asian_45\n"
        "000002,male,White,61,000002_male_White_61\n"
        "000001,female,Asian,45,000001_female_Asian_45/\n"
        "000002,male,White,61,./000002_male_White_61\n")
    with pytest.raises(LayoutError) as info:
        read_layout(root, [30, 60])
    message = str(info.value)
    assert "2 problem(s)" in message
    assert ("line 4: person folder '000001_female_Asian_45/' is listed twice (first at line 2, as "
            "'000001_female_Asian_45')") in message
    assert "line 5: person folder './000002_male_White_61' is listed twice (first at line 3" in message
    layout = read_layout(root, [30, 60], skip_bad=True)  # the first stays, the second is left out
    assert sorted(layout.train["group"].unique()) == ["000001_female_Asian_45", "000002_male_White_61"]
    assert len(layout.skipped) == 2


def test_one_person_in_two_folders_is_split_as_one(root):
    """Two folders with one id and the same labels are one person: the split must keep them in one
    fold (each stays a group of its own, as in the folds.csv of runs made before). One id on other
    labels (a typo) stays two persons; a blank id joins nobody."""
    from multitask.data.folds import make_folds
    from multitask.labels import mask_task

    images = root / "train" / "images"
    for folder in ["000001_female_Asian_45_again", "000001_male_Asian_20", "blank_a", "blank_b"]:
        write_person(images, folder)
    with open(root / "train" / "train.csv", "a") as fh:
        fh.write("000001,female,Asian,45,000001_female_Asian_45_again\n000001,male,Asian,20,000001_male_Asian_20\n"
                 ",male,Asian,20,blank_a\n,male,Asian,20,blank_b\n")
    train = read_layout(root, [30, 60]).train
    person = train.groupby("group")["split_group"].first()
    assert person["000001_female_Asian_45_again"] == "000001_female_Asian_45"
    assert (person.drop("000001_female_Asian_45_again") == person.drop("000001_female_Asian_45_again").index).all()
    for seed in range(5):
        fold = make_folds(train, mask_task(), 4, seed).set_index("group")["fold"]
        assert len(fold) == 8 and fold["000001_female_Asian_45_again"] == fold["000001_female_Asian_45"]


def test_one_test_image_named_two_ways_is_a_duplicate(root):
    (root / "eval" / "info.csv").write_text("ImageID,ans\nb.jpg,0\na.jpg,0\n./b.jpg,0\n")
    with pytest.raises(LayoutError, match=r"line 4: duplicate ImageID './b.jpg' \(first at line 2, as 'b.jpg'\)"):
        read_layout(root, [30, 60])


def test_missing_root_and_missing_eval(root, tmp_path):
    with pytest.raises(LayoutError, match="data root not found"):
        read_layout(tmp_path / "nope", [30, 60])
    shutil.rmtree(root / "eval")
    assert read_layout(root, [30, 60]).test is None


def test_every_problem_of_the_layout_is_reported_at_once(root):
    (root / "train" / "train.csv").write_text(
        "id,gender,race,age,path\n"
        "000001,woman,Asian,45,000001_female_Asian_45\n"
        "000002,male,White,old,000002_male_White_61\n"
        "000009,female,Asian,45,nobody\n"
        "000003,male,Black,22,000003_male_Black_22\n")
    Image.new("RGB", (8, 8)).save(root / "train" / "images" / "000003_male_Black_22" / "mask9.png")
    with pytest.raises(LayoutError) as info:
        read_layout(root, [30, 60])
    message = str(info.value)
    assert "4 problem(s)" in message
    for part in ("line 2: gender 'woman'", "line 3: age 'old'", "line 4: image folder", "mask9.png: unexpected picture"):
        assert part in message
    # and with the test side's: its problem used to stop the reading before train.csv was looked at
    (root / "eval" / "images" / "a.jpg").unlink()
    with pytest.raises(LayoutError) as info:
        read_layout(root, [30, 60])
    assert "line 2: gender 'woman'" in str(info.value) and "a.jpg not found" in str(info.value)
