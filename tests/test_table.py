"""Table tasks: any product label from a CSV (or parquet) table, read, checked, trained, pseudo-labelled,
submitted and predicted, with shapes other than the mask competition's three factors."""
import hashlib

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from conftest import tiny_config
from multitask.cli import app
from multitask.config import ConfigError, load_config
from multitask.context import build_task, task_of
from multitask.data.cache import ImageDecodeError
from multitask.data.synthetic import make_table_dataset
from multitask.data.table import DataError, read_table
from multitask.kfold import train_run
from multitask.predict import predict_images
from multitask.pseudo import pseudo_label
from multitask.run import RunDir, RunError, load_npz, read_json
from multitask.submit import make_submission

SHAPE = {"name": "shape", "classes": ["circle", "square"], "per_group": True}
COLOUR = {"name": "colour", "classes": ["red", "green", "blue", "yellow"]}
SIZE = {"name": "size", "bins": [20, 30]}


def table_task(root, *factors, test=True, **extra) -> dict:
    task = {"table": str(root / "train.csv"), "group_col": "group", "factors": list(factors), **extra}
    if test:
        task["test"] = "test.csv"
    return task


def table_config(root, *factors, overrides=(), **extra):
    return tiny_config(None, f"task={yaml.safe_dump(table_task(root, *factors, **extra), default_flow_style=True)}",
                       *overrides)


@pytest.fixture(scope="module")
def table_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("table")
    make_table_dataset(root, n_train_groups=12, n_test_groups=3, per_group=3, image_size=(32, 32), seed=0)
    return root


def test_rows_are_named_by_their_line_or_by_their_number_where_lines_cannot_be_read(tmp_path):
    """A blank line (pandas skips it) and a quoted line break move the lines of the rows after them;
    a compressed CSV, which pandas reads and the csv module cannot, names its rows by number."""
    import gzip

    from multitask.data.table import read_csv_cells, row_names

    plain = tmp_path / "t.csv"
    plain.write_text('a,b\n1,2\n\n"x\ny",3\n4,5\n')
    assert row_names(plain, "line", len(read_csv_cells(plain))) == ["line 2", "line 4", "line 6"]
    packed = tmp_path / "t.csv.gz"
    with gzip.open(packed, "wt") as fh:
        fh.write("a,b\n1,2\n3,4\n")
    assert row_names(packed, "line", len(read_csv_cells(packed))) == ["row 1", "row 2"]


def test_read_table_gives_the_common_image_table(table_root):
    cfg = table_config(table_root, SIZE, SHAPE, COLOUR)
    task = task_of(cfg)
    assert task.factor_names == ["size", "shape", "colour"] and task.sizes == (3, 2, 4)
    assert task.factors[0].classes == ("<20", "[20,30)", ">=30")  # a table's numbers may be fractions
    table = read_table(cfg.task, task)
    raw = pd.read_csv(table_root / "train.csv")
    assert len(table.train) == 36 and table.train["group"].tolist() == raw["group"].tolist()
    assert table.train["colour"].tolist() == [COLOUR["classes"].index(c) for c in raw["colour"]]
    np.testing.assert_allclose(table.train["size_value"], raw["size"])  # the numbers are kept beside the bins
    assert table.train["size"].tolist() == np.searchsorted([20, 30], raw["size"], side="right").tolist()
    assert table.train["where"].iloc[0].endswith("train.csv line 2")
    assert len(table.test) == 9 and table.test["image_id"].tolist() == pd.read_csv(table_root / "test.csv")["path"].tolist()
    assert table.info_csv is None


def test_without_a_group_column_every_row_is_its_own_group(table_root):
    cfg = tiny_config(None, f"task={yaml.safe_dump(table_task(table_root, COLOUR, group_col=None), default_flow_style=True)}")
    table = read_table(cfg.task, task_of(cfg))
    assert table.train["group"].is_unique


def test_relative_paths_follow_the_config_file_and_the_table(table_root, tmp_path):
    conf = tmp_path / "task.yaml"
    conf.write_text(yaml.safe_dump({"task": {"table": str(table_root / "train.csv"), "factors": [COLOUR],
                                             "test": "test.csv"}}))
    cfg = load_config(conf)
    assert cfg.task.images == str(table_root) and cfg.task.test == str(table_root / "test.csv")
    # a table named relative to the config file's folder
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "t.csv").write_text("path,colour\n")
    conf.write_text(yaml.safe_dump({"task": {"table": "sub/t.csv", "factors": [COLOUR]}}))
    assert load_config(conf).task.table == str(tmp_path / "sub" / "t.csv")
    # --data names the table and wins over the file's
    assert load_config(conf, data=table_root / "train.csv").task.table == str(table_root / "train.csv")


def write_bad_table(root):
    rows = pd.read_csv(root / "train.csv", dtype=str)
    rows.loc[0, "colour"] = "purple"                    # line 2: not a class
    rows.loc[1, "size"] = "big"                         # line 3: not a number
    rows.loc[2, "size"] = ""                            # line 4: missing number
    rows.loc[3, "path"] = "images/nobody/0.jpg"         # line 5: no such image
    rows.loc[4, "path"] = rows.loc[5, "path"]           # line 6 or 7: duplicate path
    rows.loc[6, "path"] = "../outside.jpg"              # line 8: leads out of the root
    rows.loc[9, "shape"] = "circle" if rows.loc[10, "shape"] == "square" else "square"  # a group that disagrees
    path = root / "bad.csv"
    rows.to_csv(path, index=False)
    return path


def test_a_bad_table_lists_every_problem_at_once(table_root):
    bad = write_bad_table(table_root)
    cfg = table_config(table_root, SIZE, SHAPE, COLOUR)
    cfg.task.table = str(bad)
    with pytest.raises(DataError) as e:
        read_table(cfg.task, task_of(cfg))
    msg = str(e.value)
    assert "bad.csv: 7 problem(s)" in msg, msg
    for expected in ("line 2: colour 'purple' is not one of", "line 3: size 'big' is not a number",
                     "line 4: size '' is not a number", "line 5: image", "nobody/0.jpg not found",
                     "duplicate path", "line 8: path '../outside.jpg' leads out of",
                     "rows disagree on shape", "which is set per group"):
        assert expected in msg, expected
    import re

    lines = [int(re.search(r"line (\d+)", row).group(1)) for row in msg.splitlines()[1:]]
    assert lines == sorted(lines), msg  # by line, as the table reads, not column by column


def test_images_behind_a_link_out_of_the_root_are_refused_with_the_way_round(table_root, tmp_path):
    """A table beside a linked images folder (read-only input data, linked in): each row leads out of
    the table's folder through the link. Refused (a test image linked to a training one would leak),
    with the link named and the way round, which works."""
    import shutil

    folder = tmp_path / "mine"
    folder.mkdir()
    shutil.copy(table_root / "train.csv", folder / "train.csv")
    (folder / "images").symlink_to(table_root / "images")
    cfg = table_config(folder, SIZE, SHAPE, COLOUR, test=False)
    with pytest.raises(DataError) as e:
        read_table(cfg.task, task_of(cfg))
    assert (f"line 2: path {pd.read_csv(folder / 'train.csv')['path'][0]!r} leads out of {folder} through the link "
            f"{folder / 'images'} (to {table_root / 'images'}); make the root the folder the files are in") in str(e.value)
    cfg = table_config(folder, SIZE, SHAPE, COLOUR, test=False, images=str(table_root))
    assert len(read_table(cfg.task, task_of(cfg)).train) == len(pd.read_csv(folder / "train.csv"))


@pytest.mark.parametrize("content, message", [
    ("path,group,shape\n", "missing column(s) ['colour']"),
    ("path,group,colour\n", "the table has no rows"),
    ("path,group,colour\n/etc/passwd,a,red\n", "is absolute"),
    # one field too many on the first row: pandas took the first column for an index and shifted the rest
    ("path,group,colour\nimages/a.jpg,a,red,extra\nimages/b.jpg,b,red\n", "cannot be read as a table (line 2 has 4 fields, the header 3)"),
    ("path,group,colour\nimages/a.jpg,a,red,\nimages/b.jpg,b,red,\n", "(line 2 has 4 fields, the header 3)"),  # a trailing comma
    ("path,group,colour\nimages/a.jpg,a,red\nimages/b.jpg,b,red,x\n", "cannot be read as a table"),  # pandas' own words
])
def test_table_level_errors(table_root, tmp_path, content, message):
    (tmp_path / "t.csv").write_text(content)
    cfg = table_config(table_root, COLOUR)
    cfg.task.table, cfg.task.images = str(tmp_path / "t.csv"), str(table_root)
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        read_table(cfg.task, task_of(cfg))


@pytest.mark.parametrize("factor, message", [
    ({"name": "x"}, "exactly one of classes"),
    ({"name": "x", "classes": ["a"]}, "at least two"),
    ({"name": "x", "bins": [3, 1]}, "increasing"),
    ({"name": "x", "bins": [2.5], "integer": True}, "whole-number edges"),
    ({"name": "x", "classes": ["a", "b"], "integer": True}, "whole-number edges"),
    ({"name": "class", "classes": ["a", "b"]}, "not allowed"),
    # the image table's own columns: a factor `group` would make the folds split by its classes
    ({"name": "group", "classes": ["a", "b"]}, "factor name 'group' is reserved"),
    ({"name": "path", "column": "shape", "classes": ["circle", "square"]}, "factor name 'path' is reserved"),
    ({"name": "where", "bins": [1]}, "factor name 'where' is reserved"),
    ({"name": "image_id", "classes": ["a", "b"]}, "'image_id' is reserved"),
    ({"name": "fold", "classes": ["a", "b"]}, "'fold' is reserved"),
    # a head named aux_... would be read as a numeric factor's auxiliary output (raw numbers)
    ({"name": "aux_shape", "column": "shape", "classes": ["circle", "square"]}, "'aux_shape' is reserved"),
    ({"name": "aux", "column": "shape", "classes": ["circle", "square"]}, "'aux' is reserved"),
])
def test_bad_factor_specs_are_config_errors(table_root, factor, message):
    with pytest.raises(ConfigError, match=message):
        table_config(table_root, factor)


def test_an_integer_factor_refuses_numbers_that_are_not_whole(table_root, tmp_path):
    df = pd.read_csv(table_root / "train.csv", dtype=str)
    df["size"] = df["size"].astype(float).round().astype(int).astype(str)
    df.loc[1, "size"] = "24.5"
    df.to_csv(tmp_path / "whole.csv", index=False)
    cfg = table_config(table_root, {**SIZE, "integer": True}, COLOUR)
    cfg.task.table, cfg.task.images = str(tmp_path / "whole.csv"), str(table_root)
    with pytest.raises(DataError, match=r"whole.csv: 1 problem\(s\)[\s\S]*line 3: size '24.5' is not a whole number"):
        read_table(cfg.task, task_of(cfg))
    assert task_of(cfg).factors[0].classes == ("<20", "20-29", ">=30")


def test_a_factor_cannot_take_another_factors_numbers_column(table_root):
    shadow = {"name": "size_value", "column": "colour", "classes": COLOUR["classes"]}
    with pytest.raises(ConfigError, match="factor name 'size_value' is taken by factor 'size'"):
        table_config(table_root, SIZE, shadow)
    with pytest.raises(ConfigError, match="'conf_colour' is taken by factor 'colour'"):
        table_config(table_root, COLOUR, {**SHAPE, "name": "conf_colour", "column": "shape"})
    # a categorical factor keeps no numbers: `colour_value` beside it is free
    cfg = table_config(table_root, COLOUR, {**SHAPE, "name": "colour_value", "column": "shape"})
    assert task_of(cfg).factor_names == ["colour", "colour_value"]


def test_a_test_image_that_is_also_a_training_image_is_refused(table_root, tmp_path):
    """Through pseudo labels it would teach each fold its own validation pictures."""
    train = pd.read_csv(table_root / "train.csv", dtype=str)
    test = pd.read_csv(table_root / "test.csv", dtype=str)
    cfg = table_config(table_root, COLOUR, test=False)
    cfg.task.test = str(table_root / "leaky_test.csv")
    top, rest = train.loc[3, "path"].split("/", 1)
    (table_root / "alias").symlink_to(table_root / top)  # a link inside the root is allowed: the same files
    # line 3: line 5 of train.csv, named another way
    for other_name in ("./" + train.loc[3, "path"], f"{top}/../{top}/{rest}", f"alias/{rest}"):
        test.loc[1, "path"] = other_name
        test.to_csv(table_root / "leaky_test.csv", index=False)
        with pytest.raises(DataError, match=r"leaky_test.csv: 1 problem\(s\)[\s\S]*line 3: .* is also a training "
                                            r"image \(.*train.csv line 5\)"):
            read_table(cfg.task, task_of(cfg))
    # listed with the training table's own problems, all at once (line 10 of bad.csv is train.csv's)
    cfg.task.table = str(write_bad_table(table_root))
    test.loc[1, "path"] = train.loc[8, "path"]
    test.to_csv(table_root / "leaky_test.csv", index=False)
    with pytest.raises(DataError, match=r"bad.csv: 4 problem\(s\)[\s\S]*leaky_test.csv: 1 problem\(s\)[\s\S]*"
                                        r"line 3: .* is also a training image \(.*bad.csv line 10\)"):
        read_table(cfg.task, task_of(cfg))


def test_one_file_named_two_ways_is_a_duplicate_row(table_root, tmp_path):
    rows = pd.read_csv(table_root / "train.csv", dtype=str)
    rows.loc[4, "path"] = "./" + rows.loc[1, "path"]       # line 6: line 3's file, named another way
    top, group, name = rows.loc[2, "path"].split("/")
    rows.loc[7, "path"] = f"{top}/{group}/../{group}/{name}"  # line 9: line 4's
    rows.to_csv(table_root / "dup.csv", index=False)
    cfg = table_config(table_root, COLOUR, group_col=None)
    cfg.task.table = str(table_root / "dup.csv")
    with pytest.raises(DataError) as e:
        read_table(cfg.task, task_of(cfg))
    msg = str(e.value)
    assert "dup.csv: 2 problem(s)" in msg, msg
    assert f"line 6: duplicate path {rows.loc[4, 'path']!r} (first at line 3, as {rows.loc[1, 'path']!r})" in msg, msg
    assert f"line 9: duplicate path {rows.loc[7, 'path']!r} (first at line 4, as {rows.loc[2, 'path']!r})" in msg, msg


def test_undecodable_images_are_refused_by_table_line_before_the_run_is_written(table_root, tmp_path):
    data = tmp_path / "data"
    make_table_dataset(data, n_train_groups=6, n_test_groups=2, per_group=2, image_size=(32, 32))
    rows = pd.read_csv(data / "train.csv")
    (data / rows.loc[1, "path"]).write_bytes(b"")                      # zero bytes
    (data / rows.loc[4, "path"]).write_text("this png is really text")  # not an image
    cfg = table_config(data, COLOUR, test=False)
    with pytest.raises(ImageDecodeError) as e:
        train_run(cfg, tmp_path / "run")
    msg = str(e.value)
    assert "2 image(s) cannot be decoded" in msg and "train.csv line 3" in msg and "train.csv line 6" in msg
    assert not (tmp_path / "run").exists()
    # a test image that cannot be decoded either: listed with them, not only on the next try
    test = pd.read_csv(data / "test.csv")
    (data / test.loc[2, "path"]).write_bytes(b"")
    with pytest.raises(ImageDecodeError) as e:
        train_run(table_config(data, COLOUR), tmp_path / "run")
    msg = str(e.value)
    assert msg.startswith("training images: 2 image(s) cannot be decoded") and "train.csv line 6" in msg, msg
    assert f"\ntest images: 1 image(s) cannot be decoded:\n  {data / test.loc[2, 'path']}: " in msg, msg
    assert not (tmp_path / "run").exists()


def test_parquet_tables_read_like_csv(table_root, tmp_path):
    pytest.importorskip("pyarrow")
    df = pd.read_csv(table_root / "train.csv")
    df.to_parquet(table_root / "train.parquet")
    cfg = table_config(table_root, SIZE, SHAPE, COLOUR)
    a = read_table(cfg.task, task_of(cfg)).train
    cfg.task.table = str(table_root / "train.parquet")
    b = read_table(cfg.task, task_of(cfg)).train
    pd.testing.assert_frame_equal(a.drop(columns="where"), b.drop(columns="where"))
    assert b["where"].iloc[0].endswith("train.parquet row 1")


def test_parquet_integer_classes_with_a_null_keep_their_names(table_root, tmp_path):
    # pyarrow's int64 with a null reads as float64 without pandas' metadata: 0 -> '0.0' failed every row
    pa = pytest.importorskip("pyarrow")
    df = pd.read_csv(table_root / "train.csv")
    flag = [None] + [i % 2 for i in range(1, len(df))]
    columns = {c: pa.array(df[c].tolist()) for c in df.columns} | {"flag": pa.array(flag, pa.int64())}
    pytest.importorskip("pyarrow.parquet").write_table(pa.table(columns), table_root / "flags.parquet")
    cfg = table_config(table_root, SIZE, {"name": "flag", "classes": ["0", "1"]})
    cfg.task.table = str(table_root / "flags.parquet")
    table = read_table(cfg.task, task_of(cfg), skip_bad=True)
    assert len(table.train) == len(df) - 1 and len(table.skipped) == 1  # the null alone is refused
    assert table.skipped["where"].iloc[0].endswith("flags.parquet row 1")


@pytest.fixture(scope="module")
def table_run(table_root, tmp_path_factory):
    """2 x 4 categorical, shape per group: a third task shape, trained for real."""
    out = tmp_path_factory.mktemp("table_run") / "run"
    cfg = table_config(table_root, SHAPE, COLOUR, overrides=[f"data.cache_dir={out.parent / 'cache'}",
                                                            "train.epochs=3", "train.lr=3e-3"])
    summary = train_run(cfg, out)
    return out, summary


def test_a_table_task_trains_pseudo_labels_and_submits(table_run, table_root):
    out, summary = table_run
    run = RunDir(out)
    assert {"f1", "f1_shape", "f1_colour"} <= set(summary["oof"])
    folds = pd.read_csv(run.folds)
    assert set(folds["group"]) == set(pd.read_csv(table_root / "train.csv")["group"])  # folds by group
    oof = load_npz(run.round_dir(0) / "oof.npz")
    assert sorted(oof["rows"].tolist()) == list(range(36)) and oof["p_colour"].shape == (36, 4)

    reports = pseudo_label(out, precision=0.0, rounds=1)
    assert reports[0]["added"] == 9
    pseudo = pd.read_csv(run.round_dir(1) / "pseudo.csv")
    assert set(pseudo["ImageID"]) == set(pd.read_csv(table_root / "test.csv")["path"])

    sub = pd.read_csv(make_submission(out))
    assert list(sub.columns) == ["path", "shape", "colour", "class", "prob"]
    assert sub["path"].tolist() == pd.read_csv(table_root / "test.csv")["path"].tolist()
    assert set(sub["colour"]) <= set(COLOUR["classes"]) and sub["class"].between(0, 7).all()
    assert (sub["class"] == sub["shape"].map({"circle": 0, "square": 1}) * 4
            + sub["colour"].map({c: i for i, c in enumerate(COLOUR["classes"])})).all()
    assert sub["prob"].between(0, 1).all()


def test_a_table_task_without_test_images_is_told_where_they_were_looked_for(table_run, tmp_path):
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(table_run[0], run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    table = cfg["task"]["table"]
    cfg["task"]["test"] = None
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(FileNotFoundError, match=f"{run}: the task has no test images \\(no task.test in the table "
                                                f"task {table}\\): nothing to pseudo-label"):
        pseudo_label(run, precision=0.0)


def test_a_submission_of_a_test_list_changed_since_training_is_refused(table_run, table_root, tmp_path):
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(table_run[0], run)
    reordered = tmp_path / "test.csv"
    pd.read_csv(table_root / "test.csv").iloc[::-1].to_csv(reordered, index=False)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["task"]["test"] = str(reordered)  # a place, not a setting: the run follows it
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "sub.csv"
    with pytest.raises(RunError, match="test_probs.npz: predicted for other test images, or in another order, than "
                                       f"{reordered} now lists"):
        make_submission(run, out)
    assert not out.exists()


def test_predict_on_a_folder_a_csv_and_one_file_matches_the_submission(table_run, table_root, tmp_path):
    out, _ = table_run
    sub = pd.read_csv(make_submission(out, tmp_path / "sub.csv")).set_index("path")
    # a CSV with a path column: the same images as the task's test set give the same predictions
    by_csv = tmp_path / "by_csv.csv"
    predict_images(out, table_root / "test.csv", by_csv, batch_size=4)
    got = pd.read_csv(by_csv).set_index("path").loc[sub.index]
    assert (got["class"] == sub["class"]).all()
    np.testing.assert_allclose(got["prob"], sub["prob"], rtol=1e-4)
    # a folder: recursive, images only, hidden files skipped, paths relative to the folder
    folder = tmp_path / "imgs"
    (folder / "deep").mkdir(parents=True)
    first = sub.index[0]
    (folder / "deep" / "a.png").write_bytes((table_root / first).read_bytes())
    (folder / "b.jpg").write_bytes((table_root / sub.index[1]).read_bytes())
    (folder / "._b.jpg").write_bytes(b"junk")
    (folder / "notes.txt").write_text("not an image")
    predict_images(out, folder, tmp_path / "by_dir.csv", with_probs=True)
    by_dir = pd.read_csv(tmp_path / "by_dir.csv")
    assert by_dir["path"].tolist() == ["b.jpg", "deep/a.png"]
    assert by_dir.loc[1, "class"] == sub.loc[first, "class"]
    cols = [f"p_colour_{c}" for c in COLOUR["classes"]]
    np.testing.assert_allclose(by_dir[cols].sum(axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(by_dir[["p_shape_circle", "p_shape_square"]].sum(axis=1), 1, rtol=1e-5)
    # one file
    predict_images(out, table_root / first, tmp_path / "one.csv")
    one = pd.read_csv(tmp_path / "one.csv")
    assert len(one) == 1 and one.loc[0, "class"] == sub.loc[first, "class"]


def test_predict_lists_bad_images_or_skips_them(table_run, table_root, tmp_path):
    out, _ = table_run
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "good.jpg").write_bytes((table_root / pd.read_csv(table_root / "test.csv")["path"][0]).read_bytes())
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("hello")
    preds = tmp_path / "preds.csv"
    preds.write_text("old predictions\n")
    with pytest.raises(ImageDecodeError) as e:
        predict_images(out, folder, preds)
    assert "2 image(s) cannot be decoded" in str(e.value) and "empty.jpg" in str(e.value) and "text.png" in str(e.value)
    assert preds.read_text() == "old predictions\n"  # nothing written is lost
    result = predict_images(out, folder, preds, skip_bad=True)
    assert result["predicted"] == 1 and result["skipped"] == 2
    assert pd.read_csv(preds)["path"].tolist() == ["good.jpg"]
    skipped = pd.read_csv(tmp_path / "preds.skipped.csv")
    assert sorted(skipped["path"]) == ["empty.jpg", "text.png"] and skipped["reason"].str.contains("cannot decode").all()
    # a later try that decodes nothing replaces neither the predictions nor the listing beside them
    kept = preds.read_text(), (tmp_path / "preds.skipped.csv").read_text()
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "bad.jpg").write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="none of the 1 image"):
        predict_images(out, tmp_path / "nothing", preds, skip_bad=True)
    assert (preds.read_text(), (tmp_path / "preds.skipped.csv").read_text()) == kept
    # a later clean run of the same file leaves no listing that names images it kept
    (folder / "empty.jpg").unlink()
    (folder / "text.png").unlink()
    assert predict_images(out, folder, preds)["skipped"] == 0
    assert not (tmp_path / "preds.skipped.csv").exists()


def test_what_predict_cannot_write_is_refused_before_any_work(table_run, table_root, tmp_path, monkeypatch):
    import os

    from multitask import inference
    from multitask.outputs import ImageListError
    from multitask.run import StorageError

    out, _ = table_run
    first = pd.read_csv(table_root / "test.csv")["path"][0]
    monkeypatch.setattr(inference, "load_model", lambda *a, **k: pytest.fail("the work began"))
    (tmp_path / "preds").mkdir()
    with pytest.raises(StorageError, match="preds: is a folder; name a file"):
        predict_images(out, table_root / first, tmp_path / "preds")
    # an empty path cell would name the CSV's own folder
    listing = tmp_path / "list.csv"
    pd.DataFrame({"path": [str(table_root / first), "", " "]}).to_csv(listing, index=False)
    with pytest.raises(ImageListError, match="list.csv: an empty path on line\\(s\\) 3, 4"):
        predict_images(out, listing, tmp_path / "p.csv")
    listing.write_text(f"path\n{table_root / first}\n\n \n")  # a blank line, skipped, still counts as a line
    with pytest.raises(ImageListError, match="list.csv: an empty path on line\\(s\\) 4$"):
        predict_images(out, listing, tmp_path / "p.csv")
    # a file name the file system holds in Latin-1: the UTF-8 predictions file cannot name it
    odd = tmp_path / "odd"
    odd.mkdir()
    with open(os.fsencode(odd) + b"/caf\xe9.jpg", "wb") as fh:
        fh.write((table_root / first).read_bytes())
    with pytest.raises(ImageListError, match=r"1 file name\(s\) are not UTF-8.*b'caf\\xe9.jpg'"):
        predict_images(out, odd, tmp_path / "p.csv")
    assert not (tmp_path / "p.csv").exists()


def test_a_numeric_factor_with_a_flat_head_and_joins(table_root, tmp_path):
    """Three factors, one binned: the flat head and a join train and keep the numbers in the OOF."""
    for heads in ("class", "size_shape,colour"):
        cfg = table_config(table_root, SIZE, SHAPE, COLOUR, overrides=[f"heads={heads}", "train.fold=[0]"])
        assert [h.n for h in build_task(cfg)[1]] == ([24] if heads == "class" else [6, 4])
        summary = train_run(cfg, tmp_path / heads)
        assert {"f1_size_combined", "f1_shape_combined", "f1_colour_combined"} <= set(summary["oof"])
        oof = load_npz(RunDir(tmp_path / heads).round_dir(0) / "oof.npz")
        raw = pd.read_csv(table_root / "train.csv")["size"].to_numpy()
        np.testing.assert_allclose(oof["value_size"], raw[oof["rows"]])


runner = CliRunner()


def test_cli_trains_a_table_task_from_its_config_alone_and_predicts(table_root, tmp_path):
    conf = tmp_path / "shapes.yaml"
    conf.write_text(yaml.safe_dump({
        "task": table_task(table_root, SHAPE, COLOUR),
        "model": {"backbone": "test_efficientnet"}, "data": {"img_size": [32, 32]},
        "train": {"folds": 2, "fold": [0], "epochs": 1, "batch_size": 16, "device": "cpu"}}))
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--config", str(conf), "--out", str(out)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["submit", "--run", str(out), "--round", "0"])  # fold 0 alone: asked for
    assert result.exit_code == 0, result.output
    sub = pd.read_csv(out / "submission.csv")
    assert len(sub) == 9
    record = read_json(out / "submission.csv.json")  # a table task's predictions, counted by their class
    assert record["sha256"] == hashlib.sha256((out / "submission.csv").read_bytes()).hexdigest()
    assert sum(c["predicted"] for c in record["classes"].values()) == record["rows"] == 9
    assert {name: c["predicted"] for name, c in record["classes"].items() if c["predicted"]} == {
        f"{k}: " + " / ".join(names): n for (k, *names), n in
        sub.groupby(["class", SHAPE["name"], COLOUR["name"]]).size().items()}
    result = runner.invoke(app, ["predict", "--run", str(out), "--images", str(table_root / "images" / "g0013"),
                                 "--out", str(tmp_path / "p.csv"), "--probs", "--round", "0"])
    assert result.exit_code == 0, result.output
    assert "3 images" in result.output and len(pd.read_csv(tmp_path / "p.csv")) == 3
    # --data names the table; a missing one is a one-line error
    result = runner.invoke(app, ["train", "--config", str(conf), "--data", str(tmp_path / "none.csv"),
                                 "--out", str(tmp_path / "r2")])
    assert result.exit_code == 2 and "none.csv: file not found (task.table in the config, or --data" in result.output
    result = runner.invoke(app, ["train", "--config", str(conf), "--data", str(tmp_path), "--out", str(tmp_path / "r2")])
    assert result.exit_code == 2 and f"{tmp_path}: is a folder; a table task reads a table file" in result.output


def test_a_folder_of_images_is_listed_through_its_links(tmp_path):
    # a linked sub-folder was not descended into and a link whose target is gone was left out:
    # images missing from the predictions, unsaid
    from multitask.outputs import list_images

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "b.png").write_bytes(b"")
    src = tmp_path / "src"
    (src / "real").mkdir(parents=True)
    (src / "real" / "a.png").write_bytes(b"")
    (src / "linked").symlink_to(tmp_path / "other")
    (src / "gone.png").symlink_to(tmp_path / "nowhere.png")  # the decoder names it: file not found
    (src / "real" / "up").symlink_to(src)  # a loop: each folder once
    ids, paths = list_images(src)
    assert ids == ["gone.png", "linked/b.png", "real/a.png"]


def test_predict_works_for_the_mask_preset(demo_root, tmp_path):
    cfg = tiny_config(demo_root)
    train_run(cfg, tmp_path / "run")
    sub = pd.read_csv(make_submission(tmp_path / "run"))
    info = pd.read_csv(demo_root / "eval" / "info.csv")
    predict_images(tmp_path / "run", demo_root / "eval" / "images", tmp_path / "p.csv", with_probs=True)
    preds = pd.read_csv(tmp_path / "p.csv").set_index("path")
    assert len(preds) == len(info)
    assert (preds.loc[sub["ImageID"], "class"].to_numpy() == sub["ans"].to_numpy()).all()
    assert set(preds["mask"]) <= {"worn", "incorrect", "not_worn"} and set(preds["age"]) <= {"<30", "30-59", ">=60"}
    assert {"p_age_<30", "p_gender_female"} <= set(preds.columns)
    single = demo_root / "eval" / "images" / info["ImageID"][0]
    predict_images(tmp_path / "run", single, tmp_path / "one.csv")
    assert pd.read_csv(tmp_path / "one.csv")["class"][0] == sub["ans"][0]
    (tmp_path / "list.csv").write_text("path\n" + "\n".join(str(demo_root / "eval" / "images" / i) for i in info["ImageID"][:3]))
    predict_images(tmp_path / "run", tmp_path / "list.csv", tmp_path / "three.csv")
    assert pd.read_csv(tmp_path / "three.csv")["class"].tolist() == sub["ans"][:3].tolist()
    with pytest.raises(FileNotFoundError, match="no image files"):
        predict_images(tmp_path / "run", tmp_path / "run" / "round0" / "fold0", tmp_path / "x.csv")
