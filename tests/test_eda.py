"""`mt eda`: counts, histograms, samples and anomalies with their file names, for the mask preset and
a table task alike."""
import json
import shutil

import pandas as pd
import yaml
from typer.testing import CliRunner

from conftest import tiny_config
from multitask.cli import app
from multitask.data.synthetic import make_table_dataset
from multitask.eda import run_eda

runner = CliRunner()


def test_eda_of_the_mask_layout_finds_the_anomalies(demo_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    people = pd.read_csv(root / "train" / "train.csv", dtype=str)
    folders = [root / "train" / "images" / p for p in people["path"]]
    pic = lambda folder, stem: next(folder.glob(f"{stem}.*"))  # noqa: E731 - the generator mixes extensions
    duplicate = [pic(folders[0], "mask1"), pic(folders[1], "mask2")]
    shutil.copy(*duplicate)                                  # the same picture twice
    pic(folders[2], "mask3").unlink()                        # a person with six pictures
    broken = pic(folders[3], "mask4")
    broken.write_text("not a picture")                       # a file that cannot be decoded
    people.loc[4, "gender"] = "robot"                        # a label the reader refuses
    people.to_csv(root / "train" / "train.csv", index=False)

    result = runner.invoke(app, ["eda", "--data", str(root), "--out", str(tmp_path / "eda")], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "duplicate images: 1" in result.output and "unreadable: 1" in result.output
    assert "pictures per group: 6 (1 groups), 7 (" in result.output  # not a raw dict
    eda = json.loads((tmp_path / "eda" / "eda.json").read_text())
    found = eda["anomalies"]
    assert set(map(str, duplicate)) == set(found["duplicate_images"][0]["paths"])
    assert found["groups_with_fewer_pictures"] == [{"group": people["path"][2], "pictures": 6, "usual": 7}]
    assert found["unreadable"][0]["path"] == str(broken)
    assert "gender 'robot'" in found["reader_problems"][0]["reason"]
    c = eda["counts"]
    assert c["images"] == 11 * 7 - 1 and c["groups"] == 11 and c["test_images"] == 28
    assert sum(c["per_factor"]["mask"].values()) == c["images"] and len(c["per_class"]) == 18
    assert eda["numeric"]["age"]["bins"] == [30, 60]
    for plot in eda["plots"]:
        assert (tmp_path / "eda" / plot).stat().st_size > 2000, plot
    assert set(eda["plots"]) == {"counts.png", "samples.png", "numeric_age.png"}


def test_eda_into_a_file_is_a_clear_error(demo_root, tmp_path):
    (tmp_path / "eda").write_text("notes")
    result = runner.invoke(app, ["eda", "--data", str(demo_root), "--out", str(tmp_path / "eda")])
    assert result.exit_code == 2 and "cannot be made a folder" in result.output, result.output
    assert "Traceback" not in result.output and (tmp_path / "eda").read_text() == "notes"


def test_eda_of_a_table_task_flags_groups_that_disagree(tmp_path):
    make_table_dataset(tmp_path, n_train_groups=6, n_test_groups=1, per_group=3, image_size=(32, 32), seed=0)
    df = pd.read_csv(tmp_path / "train.csv", dtype=str)
    g = df["group"].iloc[0]
    df.loc[df["group"] == g, "shape"] = ["circle", "square", "circle"]
    df.to_csv(tmp_path / "train.csv", index=False)
    task = {"table": str(tmp_path / "train.csv"), "group_col": "group", "factors": [
        {"name": "shape", "classes": ["circle", "square"], "per_group": True},
        {"name": "size", "bins": [20, 30]}]}
    eda = run_eda(tiny_config(None, f"task={yaml.safe_dump(task, default_flow_style=True)}"), tmp_path / "eda")
    # the reader refuses the group (per_group), and the finding names it
    assert any("disagree on shape" in p["reason"] for p in eda["anomalies"]["reader_problems"])
    assert "labels_disagree_within_group" not in eda["anomalies"]  # the reader left the group out: nothing to find
    assert eda["counts"]["images"] == 5 * 3 and eda["numeric"]["size"]["bins"] == [20, 30]
    assert (tmp_path / "eda" / "numeric_size.png").exists()


def test_groups_as_common_as_the_full_ones_are_still_short():
    import pandas as pd

    from multitask.eda import anomalies

    counts = {"a": 7, "b": 7, "c": 5, "d": 5, "e": 6}  # two sizes equally common: 7 is the full one
    train = pd.DataFrame({"group": [g for g, n in counts.items() for _ in range(n)]})
    facts = pd.DataFrame({"sha1": [str(i) for i in range(len(train))], "format": "JPEG", "path": "x"})
    short = anomalies(train, facts, [], pd.DataFrame())["groups_with_fewer_pictures"]
    assert [(s["group"], s["pictures"], s["usual"]) for s in short] == [("c", 5, 7), ("d", 5, 7), ("e", 6, 7)]


def test_image_sizes_are_those_of_the_upright_picture(tmp_path):
    import numpy as np
    from PIL import Image

    from multitask.data.cache import ORIENTATION
    from multitask.eda import image_facts

    exif = Image.Exif()
    exif[ORIENTATION] = 6  # stored sideways, shown turned a quarter
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "phone.jpg", exif=exif)
    facts, _ = image_facts([str(tmp_path / "phone.jpg")])
    assert (facts["width"].iloc[0], facts["height"].iloc[0]) == (30, 40)


def test_a_whole_number_histogram_has_a_bar_per_number_and_its_edges_at_the_cuts():
    """With 60 even bars 1.35 years wide, one bar held ages 29 and 30, drawn across the cut at 29.5."""
    import numpy as np

    from multitask.eda import histogram_edges
    from multitask.labels import Factor

    age = Factor.binned("age", [30, 60], integer=True)
    edges = histogram_edges(np.array([18.0, 29, 30, 59, 60, 75, np.nan]), age)
    np.testing.assert_array_equal(edges, np.arange(17.5, 76.0))
    assert set(age.cuts) <= set(edges)  # every bar lies on one side of each cut
    assert histogram_edges(np.linspace(0, 1, 500), Factor.binned("share", [0.5])) == 60


def test_pictures_training_refuses_are_unreadable_to_eda_too(tmp_path):
    """EDA decoded with convert("RGB"), which reads a floating-point TIFF; training refuses it (no
    range to read it by), so the first `mt train` stopped on a picture EDA had passed."""
    import numpy as np
    from PIL import Image

    from multitask.eda import image_facts

    Image.fromarray(np.full((8, 8), 0.5, np.float32), "F").save(tmp_path / "float.tif")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "fine.png")
    facts, unreadable = image_facts([str(tmp_path / "float.tif"), str(tmp_path / "fine.png"), str(tmp_path / "gone.png")])
    assert [u["path"] for u in unreadable] == [str(tmp_path / "float.tif"), str(tmp_path / "gone.png")]
    assert "floating-point" in unreadable[0]["reason"] and "FileNotFoundError" in unreadable[1]["reason"]
    assert facts["format"].isna().tolist() == [True, False, True]
