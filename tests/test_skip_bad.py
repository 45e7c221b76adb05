"""`--skip-bad`: training goes on without the items that have a problem, and says which and why
(RUN/skipped.csv); every later command on the run leaves out the same items."""
import shutil

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from conftest import tiny_config
from multitask.cli import app
from multitask.context import reopen_context
from multitask.data.layout import LayoutError
from multitask.data.synthetic import make_table_dataset
from multitask.data.table import DataError
from multitask.distill import distill
from multitask.ensemble import make_ensemble
from multitask.kfold import resume_run, train_run
from multitask.run import RunDir, read_json
from multitask.submit import make_submission

runner = CliRunner()


@pytest.fixture
def broken_root(demo_root, tmp_path):
    """The demo set with three problems: a person with a bad gender, a zero-byte picture and a text
    file posing as a JPEG in two other persons."""
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    csv = root / "train" / "train.csv"
    people = pd.read_csv(csv, dtype=str)
    people.loc[0, "gender"] = "robot"
    people.to_csv(csv, index=False)
    folders = people["path"].tolist()
    (root / "train" / "images" / folders[1] / "normal.jpg").write_bytes(b"")
    (root / "train" / "images" / folders[2] / "mask1.jpg").write_text("not a picture")
    return root, folders


def test_skip_bad_trains_without_the_bad_items_and_lists_them(broken_root, tmp_path):
    root, folders = broken_root
    out, cache = tmp_path / "run", f"data.cache_dir={tmp_path / 'cache'}"
    with pytest.raises(LayoutError, match="gender 'robot'"):
        train_run(tiny_config(root, cache), out)
    assert not out.exists()

    result = runner.invoke(app, ["train", "--data", str(root), "--out", str(out), "--skip-bad", "--folds", "2",
                                 "--epochs", "1", "--set", "model.backbone=test_efficientnet",
                                 "--set", "data.img_size=[32,32]", "--set", "train.device=cpu", "--set", cache])
    assert result.exit_code == 0, result.output
    assert "3 training item(s) left out" in result.output
    skipped = pd.read_csv(RunDir(out).skipped)
    assert len(skipped) == 3 and list(skipped.columns) == ["where", "path", "reason", "id"]
    assert set(skipped["id"]) == {f"train/images/{folders[0]}", f"train/images/{folders[1]}/normal.jpg",
                                  f"train/images/{folders[2]}/mask1.jpg"}  # below the data's root
    assert "gender 'robot'" in skipped["reason"].iloc[0] and skipped["path"].iloc[0].endswith(folders[0])
    reasons = dict(zip(skipped["path"].str.rsplit("/", n=2).str[-2:].str.join("/"), skipped["reason"]))
    assert reasons[f"{folders[1]}/normal.jpg"].startswith("cannot be decoded")
    assert reasons[f"{folders[2]}/mask1.jpg"].startswith("cannot be decoded")
    assert read_json(RunDir(out).summary)["skipped"] == 3

    # the person is gone from the folds; later commands leave out the same items
    assert folders[0] not in set(pd.read_csv(RunDir(out).folds)["group"])
    ctx = reopen_context(out)
    assert len(ctx.table.train) == 12 * 7 - 7 - 2 and len(ctx.train_images) == len(ctx.table.train)
    assert resume_run(out)["folds_done"] == [0, 1]
    assert len(pd.read_csv(make_submission(out))) == 4 * 7
    # a student of the run leaves them out too (its folds once counted the undecodable pictures)
    student = tmp_path / "student"
    assert distill(out, student, epochs=1)["folds_done"] == [0]
    assert pd.read_csv(RunDir(student).skipped).equals(skipped)
    # and so does an ensemble of such runs (its teacher's pictures for a student are these rows)
    other = tmp_path / "other"
    train_run(tiny_config(root, cache, "data.skip_bad=true", "train.seed=1"), other)
    make_ensemble([out, other], tmp_path / "ens")
    assert pd.read_csv(RunDir(tmp_path / "ens").skipped).equals(skipped)
    assert reopen_context(tmp_path / "ens").table.train["path"].equals(ctx.table.train["path"])
    # a listing of an older mt (paths alone) is still read, where the data has not moved
    RunDir(other).skipped.write_text(pd.read_csv(RunDir(other).skipped).drop(columns="id").to_csv(index=False))
    assert len(reopen_context(other).table.train) == 12 * 7 - 7 - 2
    # the data set moved, and config.yaml told where: the same items are found again below its root
    moved = tmp_path / "moved"
    shutil.move(root, moved)
    written = yaml.safe_load(RunDir(out).config.read_text())
    RunDir(out).config.write_text(yaml.safe_dump(written | {"data_root": str(moved)}))
    assert len(reopen_context(out).table.train) == 12 * 7 - 7 - 2


def test_skip_bad_leaves_out_table_rows_and_whole_groups(tmp_path):
    make_table_dataset(tmp_path, n_train_groups=8, n_test_groups=2, per_group=3, image_size=(32, 32), seed=0)
    df = pd.read_csv(tmp_path / "train.csv", dtype=str)
    df.loc[0, "colour"] = "purple"                          # one bad row
    g = df["group"].iloc[3]
    df.loc[df["group"] == g, "shape"] = ["circle", "square", "circle"]  # a group that disagrees
    df.loc[7, "path"] = "no_such_picture.png"               # a row whose image is missing
    df.to_csv(tmp_path / "train.csv", index=False)
    task = {"table": str(tmp_path / "train.csv"), "group_col": "group", "test": "test.csv", "factors": [
        {"name": "shape", "classes": ["circle", "square"], "per_group": True},
        {"name": "colour", "classes": ["red", "green", "blue", "yellow"]}]}
    overrides = [f"task={yaml.safe_dump(task, default_flow_style=True)}", f"data.cache_dir={tmp_path / 'cache'}"]
    with pytest.raises(DataError, match="purple"):
        train_run(tiny_config(None, *overrides), tmp_path / "run")
    summary = train_run(tiny_config(None, *overrides, "data.skip_bad=true"), tmp_path / "run")
    skipped = pd.read_csv(RunDir(tmp_path / "run").skipped, dtype=str, keep_default_na=False)
    assert summary["skipped"] == 5 and len(skipped) == 5  # the two rows, and the group's three rows
    assert skipped["reason"].str.contains("purple").sum() == 1
    assert skipped["reason"].str.contains("disagree on shape").sum() == 3
    missing = skipped[skipped["reason"].str.contains("no_such_picture")]
    assert len(missing) == 1 and missing["id"].iloc[0] == ""  # no path to list below the root
    assert len(reopen_context(tmp_path / "run", with_images=False).table.train) == 8 * 3 - 5


def test_problems_find_their_rows_when_a_group_name_holds_a_colon():
    from multitask.data.table import problems_by_row

    where = ["train.csv line 2", "train.csv line 3", "train.csv line 4"]
    problems = ["group 'a: b': rows disagree on shape (line 2, line 3), which is set per group",
                "train.csv line 4: colour 'purple' is not one of ['red']"]
    reasons, unplaced = problems_by_row(problems, where, ["a: b", "a: b", "c"])
    assert unplaced == []
    assert reasons[0] == reasons[1] == "rows disagree on shape (line 2, line 3), which is set per group"
    assert reasons[2] == "colour 'purple' is not one of ['red']"


def test_without_skip_bad_every_problem_is_in_one_error(broken_root, tmp_path):
    """The reader's problems and the undecodable files of the rows it accepted, in one error, before
    anything is written: one pass finds everything to fix."""
    root, folders = broken_root
    broken_test = sorted((root / "eval" / "images").iterdir())[0]
    broken_test.write_bytes(b"")
    with pytest.raises(LayoutError) as info:
        train_run(tiny_config(root, f"data.cache_dir={tmp_path / 'cache'}"), tmp_path / "run")
    message = str(info.value)
    assert "gender 'robot'" in message
    assert "2 image(s) of the rows it accepted cannot be decoded" in message
    assert f"{folders[1]}/normal.jpg" in message and f"{folders[2]}/mask1.jpg" in message
    assert "\nand 1 image(s) cannot be decoded:\n" in message and broken_test.name in message  # the test image's too
    assert not (tmp_path / "run").exists()
