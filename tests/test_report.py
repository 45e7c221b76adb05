"""`mt report`: one self-contained HTML page of a run, rendered by a real headless browser: every
picture loads and every section is there. And the accuracy study's scripts that read runs and builds
(fold_scores.py, faces_outside.py)."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import tiny_config
from multitask.cli import app
from multitask.kfold import train_run
from multitask.pseudo import pseudo_label

runner = CliRunner()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def render(page, *extra) -> str:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                           *extra, page.as_uri()], capture_output=True, text=True, timeout=120).stdout


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (.ci/run installs Debian's chromium package)")
def test_report_is_one_page_whose_pictures_load_in_a_browser(demo_root, tmp_path):
    out = tmp_path / "run"
    train_run(tiny_config(demo_root, "train.epochs=2", f"data.cache_dir={tmp_path / 'cache'}"), out)
    pseudo_label(out, precision=0.5)
    result = runner.invoke(app, ["report", "--run", str(out)])
    assert result.exit_code == 0, result.output
    page = out / "report.html"
    text = page.read_text()
    for section in ("scores", "curves", "confusion", "per-class", "mistakes", "pseudo", "config"):
        assert f'id="{section}"' in text, section
    assert "http://" not in text and "https://" not in text  # nothing fetched
    # a mistake's caption names the person's folder too: mask4.jpg alone is in every folder
    captions = re.findall(r"<small>([^<]*)</small></figcaption>", text)
    assert captions and all(re.fullmatch(r"\d{6}_\w+/(mask\d|incorrect_mask|normal)\.\w+", c) for c in captions), captions
    assert "precision on OOF at that threshold" in text and "round 1" in text
    assert re.search(r"<td>[01]\.\d{3} \(\d+ persons\)</td>", text)  # how many persons a promise rests on
    # the figures under the decision say which F1 they add up to: the decision's, not the argmax's
    from multitask.run import read_json

    for q in (0, 1):
        decided = read_json(out / f"round{q}" / "summary.json")["decision"]
        assert f"<td>{q}</td><td>{decided['in_sample']['f1']:.4f}</td><td>{decided['honest']['f1']:.4f}</td>" in text
        fitted = read_json(out / f"round{q}" / "decision.json")["decision"]
        assert f"subjects {fitted['subjects']:.2f}" in text  # what the decision fitted, beside its figures
        fold = read_json(out / f"round{q}" / "summary.json")["folds"]["1"]  # and each fold's own figures
        assert (f"<tr><td>{q}</td><td>1</td><td>{fold['best_epoch']}</td><td>{fold['val_f1_no_tta']:.4f}</td>"
                f"<td>{fold['oof_f1_tta']:.4f}</td>") in text
    dom = render(page, "--dump-dom")
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, dom[-2000:]
    ok, total = map(int, loaded.groups())
    assert total >= 4 + 1 and ok == total  # two rounds' curves, the confusion, the gallery: none broken
    shot = tmp_path / "report.png"
    render(page, f"--screenshot={shot}", "--window-size=1400,3000")
    assert shot.stat().st_size > 20_000


def test_readers_wait_for_a_round_whose_results_are_being_written(demo_root, tmp_path, monkeypatch, capsys):
    """Read while another process aggregated the round, the report mixed the old summary (2 of 3
    folds) with the new OOF of every fold, and `mt submit` called the fold just finished "not
    started": the round's readers (report, submit, predict, export, a pseudo-label round) wait."""
    import json
    import socket
    import sys

    import multitask.report as report
    import multitask.run as run_module
    from multitask.run import RunDir, RunError
    from multitask.submit import make_submission

    out = tmp_path / "run"
    train_run(tiny_config(demo_root, f"data.cache_dir={tmp_path / 'cache'}"), out)
    lock = RunDir(out).round_dir(0) / "lock.json"
    monkeypatch.setattr(run_module, "RESULTS_WAIT_S", 1.0)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid, "since": "x"}))
        for read, made in ((report.write_report, RunDir(out).report), (make_submission, RunDir(out).submission)):
            with pytest.raises(RunError, match=rf"round0: its results are being written by {socket.gethostname()} "
                                               rf"pid {sleeper.pid} .* for more than 1 s; run the command again"):
                read(out)
            assert not made.exists()
        assert "waiting for them (up to 1 s)" in capsys.readouterr().err
    finally:
        sleeper.kill()
        sleeper.wait()
    assert report.write_report(out).exists()  # its holder gone: the lock is stale, the page is written
    assert make_submission(out).exists()
    # another machine's lock, which a killed writer there leaves for good: a shorter wait, and what to do
    monkeypatch.setattr(run_module, "RESULTS_WAIT_S", 60.0)
    monkeypatch.setattr(run_module, "OTHER_HOST_WAIT_S", 1.0)
    lock.write_text(json.dumps({"host": "kaggle-abc123", "pid": 4242, "since": "x"}))
    with pytest.raises(RunError, match=rf"being written by kaggle-abc123 pid 4242 since x \(remove {lock} if that "
                                       rf"machine is gone\) for more than 1 s"):
        make_submission(out)


# ---- mt runs: held-out scores of table tasks, and runs that cannot be read ----

def table_run(tmp_path, factors):
    """A run directory as far as `mt runs --answers` reads it (config and submission) on the
    synthetic table set, whose answer key holds the sizes as numbers."""
    import yaml

    from multitask.config import dump_config
    from multitask.data.synthetic import make_table_dataset

    data = make_table_dataset(tmp_path / "table", n_train_groups=6, n_test_groups=4, per_group=3,
                              image_size=(24, 24), seed=0)
    task = {"table": str(data["table"]), "group_col": "group", "test": "test.csv", "factors": factors}
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(tiny_config(None, f"task={yaml.safe_dump(task, default_flow_style=True)}")))
    return run, data["answers"]


def test_a_perfect_table_submission_scores_one_held_out(tmp_path):
    import numpy as np
    import pandas as pd

    from multitask.labels import bin_names
    from multitask.run import RunDir
    from multitask.runs import AnswerKeyError, held_out

    # the size factor named apart from its column: the key is read by column, the predictions by name
    run, answers = table_run(tmp_path, [{"name": "shape", "classes": ["circle", "square"]},
                                        {"name": "colour", "classes": ["red", "green", "blue", "yellow"]},
                                        {"name": "bigness", "column": "size", "bins": [20, 30]}])
    key = pd.read_csv(answers)
    assert key["size"].dtype.kind in "if" and key["size"].nunique() > 2  # numbers, not bin names
    names = bin_names([20, 30])
    perfect = pd.DataFrame({"path": key["path"], "shape": key["shape"], "colour": key["colour"],
                            "bigness": [names[i] for i in np.searchsorted([20, 30], key["size"], side="right")]})
    perfect.to_csv(run / "submission.csv", index=False)
    assert held_out(RunDir(run), answers) == 1.0
    wrong = perfect.assign(shape=perfect["shape"].map({"circle": "square", "square": "circle"}))
    wrong.to_csv(run / "submission.csv", index=False)
    assert held_out(RunDir(run), answers) < 1.0
    perfect.iloc[1:].to_csv(run / "submission.csv", index=False)
    with pytest.raises(AnswerKeyError, match=r"submission.csv: no prediction for 1 of the \d+ path"):
        held_out(RunDir(run), answers)
    key.assign(size="big").to_csv(tmp_path / "bad.csv", index=False)
    perfect.to_csv(run / "submission.csv", index=False)
    with pytest.raises(AnswerKeyError, match="bad.csv: column 'size' of .* is 'big', not a number or a bin name"):
        held_out(RunDir(run), tmp_path / "bad.csv")


def test_score_table_script_reads_the_key_as_mt_runs_does(tmp_path, capsys, script_module):
    import json

    import numpy as np
    import pandas as pd

    from multitask.labels import bin_names

    run, answers = table_run(tmp_path, [{"name": "colour", "classes": ["red", "green", "blue", "yellow"]},
                                        {"name": "size", "bins": [20, 30]}])
    key = pd.read_csv(answers)
    names = bin_names([20, 30])
    pd.DataFrame({"path": key["path"], "colour": key["colour"],
                  "size": [names[i] for i in np.searchsorted([20, 30], key["size"], side="right")]}
                 ).to_csv(run / "submission.csv", index=False)
    script_module("score_table").main(["--run", str(run), "--answers", str(answers)])
    assert json.loads(capsys.readouterr().out) | {"n": 0} == {"n": 0, "f1": 1.0, "acc": 1.0, "f1_colour": 1.0, "f1_size": 1.0}


def test_mt_runs_ranks_runs_without_a_held_out_score_by_their_oof(monkeypatch, tmp_path):
    """With an answer key, runs not yet submitted followed the scored ones in the order found."""
    from pathlib import Path
    from types import SimpleNamespace

    import multitask.runs as runs

    scores = {"a": (None, 0.2), "b": (0.5, 0.1), "c": (None, 0.4), "d": (0.6, 0.05)}  # held-out, OOF
    monkeypatch.setattr(runs, "find_runs", lambda roots: [SimpleNamespace(root=Path(n)) for n in scores])
    monkeypatch.setattr(runs, "run_row", lambda run, answers: {
        "run": str(run.root), "held_out_f1": scores[str(run.root)][0], "oof_f1": scores[str(run.root)][1]})
    answers = tmp_path / "answers.csv"
    answers.write_text("ImageID,ans\n")
    assert runs.runs_table([tmp_path], answers)["run"].tolist() == ["d", "b", "c", "a"]
    assert runs.runs_table([tmp_path])["run"].tolist() == ["c", "a", "b", "d"]


def test_mt_runs_lists_runs_it_cannot_read_with_their_reasons(tmp_path):
    from multitask.config import dump_config
    from multitask.runs import runs_table

    for name in ("a", "b"):
        run = tmp_path / "runs" / name
        (run / "round0").mkdir(parents=True)
        (run / "config.yaml").write_text(dump_config(tiny_config(tmp_path)))
        (run / "round0" / "summary.json").write_text("{")  # a finished round whose summary cannot be read
    for answers in (None, tmp_path / "answers.csv"):
        if answers:
            answers.write_text("ImageID,ans\nx,0\n")
        table = runs_table([tmp_path / "runs"], answers)
        assert len(table) == 2 and table["note"].str.startswith("unreadable").all()
    result = runner.invoke(app, ["runs", str(tmp_path / "runs")], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "unreadable" in result.output


def test_pseudo_label_counts_per_fold_count_the_folds_that_selected_nothing(demo_root, tmp_path):
    """Per fold means over every fold: a fold whose model cleared no threshold selected 0."""
    import shutil

    import pandas as pd

    from multitask.context import task_of
    from multitask.report import write_report

    out = tmp_path / "run"
    cfg = tiny_config(demo_root, f"data.cache_dir={tmp_path / 'cache'}")
    train_run(cfg, out)
    shutil.copytree(out / "round0", out / "round1")  # a second round, as pseudo-labelling would add
    mask = task_of(cfg).factors[0]
    pd.DataFrame({"ImageID": [f"i{k}" for k in range(5)], "fold": 0, "mask": [0, 0, 0, 0, 2], "conf_mask": 0.99,
                  "gender": -1, "conf_gender": 0.0, "age": -1, "conf_age": 0.0}).to_csv(out / "round1" / "pseudo.csv", index=False)
    text = write_report(out).read_text()
    # 4 selected by fold 0, none by fold 1: 2 per fold; a rare class's single label is not rounded to 0
    assert f"<td>{mask.classes[0]} 2.0, {mask.classes[2]} 0.5</td>" in text


def test_fold_scores_script_scores_each_fold_alone_and_their_vote(demo_root, tmp_path, capsys, script_module):
    import json

    import numpy as np
    import pandas as pd

    from multitask.context import build_task, load_run_config
    from multitask.run import RunDir, load_npz, save_npz

    run = tmp_path / "run"
    train_run(tiny_config(demo_root, f"data.cache_dir={tmp_path / 'cache'}"), run)
    main = script_module("fold_scores").main

    def scores():
        main([str(run)])
        return json.loads(capsys.readouterr().out)
    before = scores()

    # fold 1's test predictions made the answers themselves, and fold 0's OOF rows too: each of those
    # scores 1.0 where it is read, and nothing else moves but the vote
    task, _ = build_task(load_run_config(RunDir(run)))
    fold1 = RunDir(run).fold_dir(0, 1) / "test.npz"
    test = load_npz(fold1)
    truth = pd.read_csv(demo_root / "answers.csv").set_index("ImageID").loc[test["image_id"], "ans"].to_numpy()
    oof_path = RunDir(run).round_dir(0) / "oof.npz"
    oof = load_npz(oof_path)
    held = oof["fold"] == 0
    for i, f in enumerate(task.factors):
        test[f"p_{f.name}"] = np.eye(f.n)[task.decode(truth)[:, i]].astype(np.float32)
        oof[f"p_{f.name}"][held] = np.eye(f.n)[oof["factors"][held, i]]
    save_npz(fold1, **test)
    save_npz(oof_path, **oof)
    after = scores()
    assert after["fold_held_out"] == [before["fold_held_out"][0], 1.0]
    assert after["fold_oof"] == [1.0, before["fold_oof"][1]]
    assert after["mean_fold_held_out"] == round((before["fold_held_out"][0] + 1) / 2, 4)
    assert before["vote_held_out"] < 1.0 and after["vote_held_out"] > before["vote_held_out"]


BUILDER = Path(__file__).resolve().parents[2] / "shared" / "tools" / "build_maskset.py"


@pytest.mark.skipif(not BUILDER.exists(), reason="../shared/tools/build_maskset.py not beside the checkout")
def test_faces_outside_a_build_are_the_ones_it_did_not_use(tmp_path):
    """scripts/faces_outside.py repeats build_maskset.py's shuffle: checked on a real build of
    generated faces, each with its own age, so that the build's train.csv says which it used."""
    import json
    import sys

    import numpy as np
    import pandas as pd
    from PIL import Image

    faces = tmp_path / "faces"
    faces.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(
            faces / f"{18 + i}_{i % 2}_{i % 5}_2017{i:04d}.jpg.chip.jpg")
    build = tmp_path / "build"
    subprocess.run([sys.executable, str(BUILDER), "--faces", str(faces), "--out", str(build), "--limit", "10",
                    "--eval-frac", "0.2", "--seed", "3", "--workers", "1"], check=True, capture_output=True, timeout=120)
    script = Path(__file__).resolve().parents[1] / "scripts" / "faces_outside.py"
    args = [sys.executable, str(script), "--faces", str(faces), "--build", str(build), "--limit", "10"]
    out = subprocess.run(args + ["--seed", "3", "--out", str(tmp_path / "other")], capture_output=True, text=True,
                         timeout=120, check=True)
    assert json.loads(out.stdout) == {"build_faces": 10, "outside": 6, "left_out_alike": 0, "out": str(tmp_path / "other")}
    trained = set(pd.read_csv(build / "train" / "train.csv")["age"])
    outside = {int(p.name.split("_")[0]) for p in (tmp_path / "other").iterdir()}
    assert len(trained) == 8 and len(outside) == 6 and not trained & outside  # the 2 eval persons are the rest
    assert all((tmp_path / "other" / p.name).resolve() == faces / p.name for p in (tmp_path / "other").iterdir())

    wrong = subprocess.run(args + ["--seed", "4", "--out", str(tmp_path / "wrong")], capture_output=True, text=True,
                           timeout=120)
    assert wrong.returncode != 0 and "train.csv: person" in wrong.stderr and "with this --seed" in wrong.stderr
    # a smaller --limit would have counted the build's last persons as outside it
    short = [a if a != "10" else "8" for a in args]
    wrong = subprocess.run(short + ["--seed", "3", "--out", str(tmp_path / "short")], capture_output=True, text=True,
                           timeout=120)
    assert wrong.returncode != 0 and "built with --limit 10, not 8" in wrong.stderr

    sys.path.insert(0, str(script.parent))
    from faces_outside import alike

    pictures = sorted(faces.iterdir())
    copy = tmp_path / "copy.jpg"
    Image.open(pictures[0]).save(copy)  # a near-copy under another name: JPEG again, not the same bytes
    assert alike(pictures[:2], [copy, pictures[2]], 0.9).tolist() == [True, False]


def test_the_reports_classes_carry_the_number_a_submission_holds():
    """The competition's `ans` is the class number; the report named classes only by their factors."""
    from multitask.labels import mask_task

    task = mask_task([30, 60])
    names = task.class_titles()
    assert len(names) == 18 and all(n.startswith(f"{c}: ") for c, n in enumerate(names))
    assert names[3] == "3: worn / female / <30"  # mask·6 + gender·3 + age


def test_pseudo_precision_script_sets_the_promise_beside_what_the_labels_delivered(demo_root, tmp_path, capsys,
                                                                                    script_module):
    """docs/RESULTS.md: age's promise of 0.95 rested on 36 persons and delivered 0.81 on the test
    persons. The script's figures are the round's own files read again."""
    import json

    import numpy as np
    import pandas as pd

    from multitask.labels import mask_task

    run = tmp_path / "run"
    train_run(tiny_config(demo_root, f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=2"), run)
    pseudo_label(run, precision=0.5)
    capsys.readouterr()
    script_module("pseudo_precision").main([str(run), "--answers", str(demo_root / "answers.csv")])
    got = json.loads(capsys.readouterr().out)
    assert got["bound"] == 0.0
    made = json.loads((run / "round1" / "pseudo.json").read_text())["factors"]
    chosen = pd.read_csv(run / "round1" / "pseudo.csv")
    truth = mask_task([30, 60]).decode(pd.read_csv(demo_root / "answers.csv").set_index("ImageID")
                                       .loc[chosen["ImageID"], "ans"].to_numpy())
    for i, name in enumerate(("mask", "gender", "age")):
        row = got["factors"][name]
        assert row["promised"] == made[name]["precision"] and row["threshold"] == made[name]["threshold"]
        selected = chosen[name].to_numpy() >= 0
        if selected.any():
            assert row["test_precision"] == round(float((chosen[name].to_numpy() == truth[:, i])[selected].mean()), 4)
        assert row["lower_bound"] is None  # pseudo.bound 0: the threshold was set by the precision alone
        if row["threshold"] is not None:
            assert 0 < row["oof_persons"] <= row["oof_pictures"] and 0 <= row["oof_precision_by_person"] <= 1
            assert row["oof_persons"] == made[name]["persons"]
    assert np.isclose(got["factors"]["mask"]["labels_per_fold"], (chosen["mask"] >= 0).sum() / 2, atol=0.05)  # 2 folds
    # the other calibrations' script: its pooled rule is the one the round was made by, read again
    script_module("pseudo_calibration").main([str(run), "--answers", str(demo_root / "answers.csv"), "--precision", "0.5"])
    rules = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["rule"] for r in rules] == ["pooled", "pooled_plain", "per_fold"]
    folds = pd.read_csv(run / "folds.csv")
    persons_in = folds.groupby("fold")["group"].nunique().tolist()
    assert persons_in == [6, 6]
    for name in ("mask", "gender", "age"):
        pooled, per_fold = rules[0]["factors"][name], rules[2]["factors"][name]
        assert pooled["labels_per_fold"] == got["factors"][name]["labels_per_fold"]
        assert pooled["test_precision"] == got["factors"][name].get("test_precision")
        assert pooled["oof_persons"] == (made[name]["persons"] if made[name]["threshold"] is not None else 0)
        # each fold's promise rests on its own OOF persons alone
        assert [n <= persons_in[k] for k, n in enumerate(per_fold["oof_persons"])] == [True, True]
    # a fold that selected nothing has no rows in pseudo.csv: labels are still per fold of the teacher
    chosen[chosen["fold"] == 0].to_csv(run / "round1" / "pseudo.csv", index=False)
    script_module("pseudo_precision").main([str(run)])
    alone = json.loads(capsys.readouterr().out)
    assert np.isclose(alone["factors"]["mask"]["labels_per_fold"], (chosen[chosen["fold"] == 0]["mask"] >= 0).sum() / 2,
                      atol=0.05)
