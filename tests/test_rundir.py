"""The run directory's rules: one run per directory (`--force` starts over), a finished round to read
from (which one, and why), and no round trained for nothing."""
import hashlib
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import multitask.pseudo as pseudo
from conftest import tiny_config
from multitask.cli import app
from multitask.config import ConfigError
from multitask.kfold import train_run
from multitask.pseudo import pseudo_label
from multitask.run import RunDir, read_json, write_json
from multitask.submit import make_submission

runner = CliRunner()


@pytest.fixture
def run(demo_root, tmp_path):
    out = tmp_path / "run"
    train_run(tiny_config(demo_root, f"data.cache_dir={tmp_path / 'cache'}"), out)
    return out


def test_train_into_a_run_is_refused_and_force_starts_over(run, demo_root, tmp_path):
    cfg = tiny_config(demo_root, f"data.cache_dir={tmp_path / 'cache'}")
    pseudo_label(run, precision=0.0)
    make_submission(run)
    assert (run / "submission.csv.json").exists()
    with pytest.raises(ConfigError, match=r"round 0 fold\(s\) \[0, 1\] already trained.*round\(s\) \[1\].*mt resume"):
        train_run(cfg, run)
    assert RunDir(run).rounds() == [0, 1]  # nothing was touched

    summary = train_run(cfg, run, force=True)
    assert summary["folds_done"] == [0, 1]
    assert RunDir(run).rounds() == [0] and not RunDir(run).submission.exists()
    assert not (run / "submission.csv.json").exists()  # nor its record, which would vouch for another run
    assert read_json(RunDir(run).summary)["latest_round"] == 0

    # other settings are refused before anything else, and --force is the way out
    result = runner.invoke(app, ["train", "--data", str(demo_root), "--out", str(run), "--folds", "2",
                                 "--epochs", "2", "--set", "model.backbone=test_efficientnet",
                                 "--set", "data.img_size=[32,32]", "--set", "train.device=cpu",
                                 "--set", "train.batch_size=16", "--set", "train.eval_batch_size=64",
                                 "--set", f"data.cache_dir={tmp_path / 'cache'}"])
    assert result.exit_code == 2 and "other settings (train.epochs)" in result.output and "--force" in result.output


def test_force_leaves_the_run_as_it_was_when_the_new_settings_cannot_train(run, demo_root, tmp_path, monkeypatch):
    """--force clears the run only once everything checkable is checked: a missing package found at
    the first epoch used to leave a finished run emptied."""
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as where it is not installed
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    cfg = tiny_config(demo_root, f"data.cache_dir={tmp_path / 'cache'}", "train.tensorboard=true")
    with pytest.raises(ConfigError, match="train.tensorboard needs the tensorboard package"):
        train_run(cfg, run, force=True)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_force_is_refused_while_a_live_process_holds_a_lock_in_the_run(run, demo_root, tmp_path):
    """--force used to remove the folds another process was training, which then wrote on into the
    new run (its files beside the new run's, under the new config)."""
    import json
    import socket
    import subprocess
    import sys

    cfg = tiny_config(demo_root, f"data.cache_dir={tmp_path / 'cache'}")
    lock = RunDir(run).fold_dir(0, 1) / "lock.json"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid, "since": "x"}))
        before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
        with pytest.raises(ConfigError, match=rf"fold1 is being trained by {socket.gethostname()} pid {sleeper.pid}"
                                              r".*--force would remove what it is writing"):
            train_run(cfg, run, force=True)
        assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    finally:
        sleeper.kill()
        sleeper.wait()
    # a round's lock is its results being written; another machine's names the file to remove if it is gone
    round_lock = RunDir(run).round_dir(0) / "lock.json"
    round_lock.write_text(json.dumps({"host": "other-machine", "pid": 7, "since": "x"}))
    with pytest.raises(ConfigError, match=rf"round0 is being written by other-machine pid 7 since x \(remove "
                                          rf"{round_lock} if that machine is gone\)"):
        train_run(cfg, run, force=True)
    round_lock.unlink()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "since": "x"}))
    assert train_run(cfg, run, force=True)["complete"]  # a dead process's lock does not stand in the way


def test_a_checkpoint_or_process_setting_that_cannot_train_is_refused_before_force_clears(run, demo_root, tmp_path,
                                                                                          monkeypatch):
    """A checkpoint of another architecture is loaded once before anything is written (it used to be
    found at the first fold, after --force had emptied the finished run), and so are the settings
    torchrun's processes cannot share."""
    import torch

    from multitask import dist
    from multitask.config import ModelCfg
    from multitask.labels import mask_task
    from multitask.model import CheckpointError, build_model

    other = tmp_path / "resnet.pt"
    torch.save({"model": build_model(ModelCfg(backbone="resnet10t"), mask_task().heads("class")).state_dict()}, other)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    with pytest.raises(CheckpointError, match="resnet.pt: its backbone does not fit test_efficientnet"):
        train_run(tiny_config(demo_root, cache, f"model.checkpoint={other}"), run, force=True)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before

    monkeypatch.setattr(dist, "world", lambda: 2)  # as under torchrun with two processes
    with pytest.raises(ConfigError, match="train.batch_size 15 does not split evenly over 2 processes"):
        train_run(tiny_config(demo_root, cache, "train.batch_size=15"), run, force=True)
    with pytest.raises(ConfigError, match="train.jobs > 1 and torchrun do not mix"):
        train_run(tiny_config(demo_root, cache, "train.jobs=2"), tmp_path / "new")
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before and not (tmp_path / "new").exists()


def test_a_round_begun_with_some_folds_points_the_next_round_to_resume(run):
    from multitask.kfold import resume_run

    pseudo_label(run, precision=0.0, overrides=["train.fold=[0]"])
    with pytest.raises(ConfigError, match=r"round1: no test predictions of fold\(s\) \[1\], which this round "
                                          r"trains; `mt resume --run .*` trains them"):
        pseudo_label(run, precision=0.0)
    assert RunDir(run).rounds() == [0, 1]
    resume_run(run)
    assert pseudo_label(run, precision=0.0)[0]["round"] == 2


def test_a_staging_folder_left_by_a_killed_command_is_cleared_by_the_next_try(tmp_path):
    import socket

    from multitask.run import staged_dir

    out = tmp_path / "ens"
    dead = tmp_path / f".ens~{socket.gethostname()}~{_dead_pid()}~a1b2.tmp"
    (dead / "round0").mkdir(parents=True)
    with staged_dir(out) as staging:
        (staging / "config.yaml").write_text("x")
    assert not dead.exists() and (out / "config.yaml").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["ens"]


def test_a_rounds_results_written_again_while_read_are_read_again(tmp_path):
    """`mt submit` read the vote and then the decision while `mt train --fold K` in another shell
    rewrote them: one fold set's vote under another's decision. A read that saw the results change
    (or their writer at work) is done again; one that never settles is refused."""
    from multitask.run import RunDir, RunError, write_json

    run = RunDir(tmp_path / "run")
    write_json(run.round_dir(0) / "summary.json", {"folds_done": [0]})
    write_json(run.round_dir(0) / "decision.json", {"v": 1})
    reads = []

    def read():
        reads.append(len(reads))
        if len(reads) == 1:  # the other shell's fold finishes now
            write_json(run.round_dir(0) / "decision.json", {"v": 2})
            write_json(run.round_dir(0) / "summary.json", {"folds_done": [0, 1]})
        return len(reads)

    assert run.read_settled(0, read) == 2 and reads == [0, 1]

    def never_settles():
        write_json(run.round_dir(0) / "summary.json", {"folds_done": [0, 1]})
    with pytest.raises(RunError, match=r"round0: its results were written again while they were read, 3 times"):
        run.read_settled(0, never_settles)


def test_two_commands_making_one_out_at_once_give_the_second_a_clear_error(tmp_path, monkeypatch):
    """Both saw no `out`; the first moved its folder there, the second's rename then failed with
    ENOTEMPTY, a traceback. The first's run stands, and nothing of the second is left."""
    import os

    from multitask.run import StorageError, staged_dir

    out = tmp_path / "ens"
    real = os.replace

    def first_gets_there_first(src, dst):
        if os.path.basename(src).startswith(".ens~") and not os.path.exists(dst):
            monkeypatch.setattr(os, "replace", real)
            with staged_dir(out) as first:  # the other command, between this one's look and its rename
                (first / "config.yaml").write_text("first")
        real(src, dst)
    monkeypatch.setattr(os, "replace", first_gets_there_first)
    with pytest.raises(StorageError, match=r"ens: made by another command meanwhile .*choose another --out"):
        with staged_dir(out) as staging:
            (staging / "config.yaml").write_text("second")
    assert (out / "config.yaml").read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["ens"]


def test_a_merge_into_a_folder_killed_halfway_is_finished_by_the_next_try(tmp_path, monkeypatch):
    """`out` holding other files: the staged entries join it one by one, config.yaml last. A kill
    between two moves leaves round0/ there and no config.yaml; the next try replaces it (a folder
    cannot be renamed over a full one) and keeps the other files."""
    import os

    from multitask import run as run_module
    from multitask.run import staged_dir

    out = tmp_path / "ens"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    real = os.replace

    def killed_before_the_last(src, dst):
        if os.path.basename(dst) == "config.yaml":
            raise KeyboardInterrupt
        real(src, dst)
    monkeypatch.setattr(run_module.os, "replace", killed_before_the_last)
    with pytest.raises(KeyboardInterrupt):
        with staged_dir(out) as staging:
            (staging / "round0").mkdir()
            (staging / "round0" / "old.npz").write_text("1")
            (staging / "folds.csv").write_text("a")
            (staging / "config.yaml").write_text("x")
    assert (out / "round0").is_dir() and not (out / "config.yaml").exists()  # half merged
    monkeypatch.setattr(run_module.os, "replace", real)
    with staged_dir(out) as staging:
        (staging / "round0").mkdir()
        (staging / "round0" / "new.npz").write_text("2")
        (staging / "folds.csv").write_text("b")
        (staging / "config.yaml").write_text("y")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "folds.csv", "notes.txt", "round0"]
    assert [p.name for p in (out / "round0").iterdir()] == ["new.npz"] and (out / "folds.csv").read_text() == "b"
    assert (out / "notes.txt").read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["ens"]


def test_a_merge_never_replaces_a_users_own_folder_of_a_runs_name(tmp_path):
    from multitask.run import StorageError, staged_dir

    out = tmp_path / "work"
    (out / "round0").mkdir(parents=True)
    (out / "round0" / "mine.txt").write_text("mine")
    with pytest.raises(StorageError, match=r"work: already holds round0, which this command would replace"):
        with staged_dir(out) as staging:
            (staging / "round0").mkdir()
            (staging / "config.yaml").write_text("x")
    assert sorted(p.name for p in out.rglob("*")) == ["mine.txt", "round0"]
    assert [p.name for p in tmp_path.iterdir()] == ["work"]


def test_folds_never_started_may_be_added(demo_root, tmp_path):
    out, cache = tmp_path / "run", f"data.cache_dir={tmp_path / 'cache'}"
    train_run(tiny_config(demo_root, cache, "train.fold=[0]"), out)
    assert train_run(tiny_config(demo_root, cache, "train.fold=[1]"), out)["folds_done"] == [0, 1]
    with pytest.raises(ConfigError, match=r"fold\(s\) \[1\] already trained"):
        train_run(tiny_config(demo_root, cache, "train.fold=[1]"), out)


def test_a_round_that_is_not_finished_is_named_with_its_folds(run, tmp_path):
    # as after a SIGKILL in round 0's last fold: fold 0 finished, fold 1 has no outputs, no aggregate
    r = RunDir(run)
    for name in ("oof.npz", "summary.json", "test_probs.npz"):
        (r.round_dir(0) / name).unlink()
    (r.fold_dir(0, 1) / "oof.npz").unlink()
    result = runner.invoke(app, ["submit", "--run", str(run)])
    assert result.exit_code == 2
    assert "round 0 is not finished" in result.output and "folds done: [0]" in result.output
    assert "not done: [1]" in result.output and "mt resume" in result.output


def test_submit_uses_the_best_round_by_oof_and_says_so(run, demo_root, tmp_path):
    pseudo_label(run, precision=0.0)
    r = RunDir(run)

    def set_f1(q, f1):
        s = read_json(r.round_dir(q) / "summary.json")
        s["oof"]["f1"] = f1
        write_json(r.round_dir(q) / "summary.json", s)

    set_f1(0, 0.6)
    set_f1(1, 0.5)
    result = runner.invoke(app, ["submit", "--run", str(run), "--out", str(tmp_path / "a.csv")])
    assert result.exit_code == 0, result.output
    assert "round 0: the best OOF macro F1" in result.output and "round 1 0.5000" in result.output
    result = runner.invoke(app, ["submit", "--run", str(run), "--round", "1", "--out", str(tmp_path / "b.csv")])
    assert "round 1 (asked for)" in result.output
    assert r.choose_round(2) == (0, r.choose_round(2)[1])
    set_f1(1, 0.7)
    assert r.choose_round(2)[0] == 1
    # predict uses the same round as submit
    result = runner.invoke(app, ["predict", "--run", str(run), "--images", str(demo_root / "eval" / "images"),
                                 "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    assert "round 1" in result.output
    # an unfinished later round is not chosen, and the line says how to finish it
    (r.round_dir(2) / "fold0").mkdir(parents=True)
    q, why = r.choose_round(2)
    assert q == 1 and "round 2 is not finished" in why and "mt resume" in why
    with pytest.raises(FileNotFoundError, match="round 2 is not a finished round"):
        r.choose_round(2, 2)


def test_a_pseudo_round_with_nothing_to_add_is_not_trained(run, monkeypatch):
    monkeypatch.setattr(pseudo, "factor_thresholds", lambda task, *a: {f.name: float("inf") for f in task.factors})
    reports = pseudo_label(run, rounds=2)
    assert len(reports) == 1 and reports[0]["round"] == 1 and not reports[0]["trained"] and reports[0]["added"] == 0
    assert RunDir(run).started_rounds() == [0]
    sub = pd.read_csv(make_submission(run))
    assert len(sub) == 4 * 7


@pytest.mark.parametrize("setting, message", [
    ("model.backbone=resnet9000", "model.backbone 'resnet9000' is not a timm model; close: resnet200"),
    ("aug.train=[{name: Flipz}]", "'Flipz' is not an albumentations transform"),
    ("aug.train=[{name: HorizontalFlip, q: 2}]", "HorizontalFlip"),
    ("aug.train=[{name: Normalize}]", "Normalize turns the uint8 picture into float32"),
    ("aug.train=[{name: CenterCrop, height: 24, width: 24}]", "CenterCrop turns a 32x32 picture into 24x24"),
    ("train.lrr=0.1", "train.lrr: Extra inputs are not permitted (did you mean train.lr?)  [from --set train.lrr=0.1]"),
    ("losses.agee.name=ce", "losses given for ['agee']"),
    ("model.checkpoint=/nonexistent/w.pth", "/nonexistent/w.pth: checkpoint file not found"),
    ("train.device=gpu", "train.device 'gpu' is not a device: use auto, cpu, cuda or cuda:N"),
    ("train.device=cuda:99", "train.device 'cuda:99':"),
    ("train.device=mps", "train.device 'mps': mt runs on the CPU or CUDA GPUs only"),
    # found once the data is read: the folds are made before config.yaml is written
    ("train.folds=500", "train.folds 500: the training data holds"),
])
def test_a_failed_start_writes_nothing_and_says_why_in_one_block(demo_root, tmp_path, setting, message):
    out = tmp_path / "r"
    result = runner.invoke(app, ["train", "--data", str(demo_root), "--out", str(out), "--folds", "2", "--epochs", "1",
                                 "--set", "model.backbone=test_efficientnet", "--set", "data.img_size=[32,32]",
                                 "--set", setting])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()).replace("( ", "(") or message in result.output, result.output
    assert "Traceback" not in result.output
    assert not out.exists()  # the corrected command starts cleanly


def test_a_fold_retrained_since_is_not_done_until_its_predictions_are_new(run, monkeypatch):
    """The review's case: a finished fold retrained into the same folder and killed leaves new
    metrics and checkpoints beside old predictions. The fold is not done, the round's results are
    refused as stale, and `mt resume` makes them whole again."""
    import torch

    import multitask.engine as engine
    from multitask.kfold import fold_finished, reopen_context, resume_run, train_round_fold

    ctx = reopen_context(run)
    old_id = read_json(RunDir(run).round_dir(0) / "summary.json")["train_ids"]["1"]
    assert old_id and fold_finished(ctx, 0, 1)
    calls = {"n": 0}

    def dying_epoch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_epoch(*a, **k)

    import multitask.kfold as kfold

    real_epoch = engine.train_one_epoch
    ctx2 = reopen_context(run, ["train.fold=[1]"])
    ctx2.cfg.train.epochs = 2  # the retraining runs two epochs and dies in the second
    # under the run's own settings, as a retraining is (its last.pt records them for `mt resume`)
    settings = kfold.run_settings_hashes(ctx.run, ctx.cfg)
    monkeypatch.setattr(kfold, "run_settings_hashes", lambda *_: settings)
    monkeypatch.setattr(engine, "train_one_epoch", dying_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_round_fold(ctx2, 0, 1, torch.device("cpu"))
    monkeypatch.setattr(engine, "train_one_epoch", real_epoch)
    monkeypatch.undo()
    fold = RunDir(run).fold_dir(0, 1)
    new_id = pd.read_csv(fold / "metrics.csv", dtype={"train_id": str})["train_id"].iloc[-1]
    assert new_id != old_id and (fold / "oof.npz").exists()  # new metrics beside old predictions
    assert not fold_finished(ctx, 0, 1)
    with pytest.raises(ValueError, match=r"fold\(s\) 1 than the run holds now.*mt resume"):
        make_submission(run)
    summary = resume_run(run)  # fold 1 carries on from its last.pt: the new training, finished
    assert summary["folds_done"] == [0, 1] and summary["train_ids"]["1"] == new_id
    assert fold_finished(ctx, 0, 1)
    make_submission(run)


def test_folds_trained_under_other_settings_than_config_yaml_are_refused(run, tmp_path):
    """Every fold's outputs carry a hash of the settings they were trained under (per-invocation
    ones left out): a config.yaml edited by hand no longer describes them, and readers say so."""
    from multitask.export import export_run
    from multitask.predict import predict_images
    from multitask.run import npz_item

    r = RunDir(run)
    hashes = {str(npz_item(r.fold_dir(0, k) / name, "settings")) for k in (0, 1) for name in ("oof.npz", "test.npz")}
    assert len(hashes) == 1 and len(hashes.pop()) == 16
    make_submission(run, tmp_path / "ok.csv")  # as trained: fine, and per-invocation overrides do not count
    text = r.config.read_text()
    r.config.write_text(text.replace("lr: 0.001", "lr: 0.002"))
    for read in (lambda: make_submission(run, tmp_path / "sub.csv"), lambda: pseudo_label(run),
                 lambda: predict_images(run, tmp_path, tmp_path / "p.csv"), lambda: export_run(run, tmp_path / "m.onnx")):
        with pytest.raises(ValueError, match=r"fold\(s\) 0, 1 were trained under other settings than .*config.yaml"):
            read()
    from multitask.kfold import resume_run

    mtime = (r.round_dir(0) / "summary.json").stat().st_mtime_ns
    with pytest.raises(ValueError, match=r"fold\(s\) 0, 1 were trained under other settings than .*config.yaml holds now"):
        resume_run(run)  # it would rebuild the round's results as if the edit were what trained it
    assert not (tmp_path / "sub.csv").exists() and (r.round_dir(0) / "summary.json").stat().st_mtime_ns == mtime
    r.config.write_text(text)
    make_submission(run, tmp_path / "sub.csv")
    resume_run(run)


def test_a_setting_added_to_mt_after_a_run_was_made_does_not_orphan_its_folds(demo_root):
    """A run's config.yaml names every setting mt had when it was written; the hash its folds carry
    covers those. A newer mt's settings (at their defaults there) are left out of the hash, so the
    run stays readable; every setting the run names still counts."""
    import yaml

    from multitask.config import dump_config
    from multitask.context import settings_hash

    cfg = tiny_config(demo_root)
    written = yaml.safe_load(dump_config(cfg))
    assert settings_hash(cfg, written) == settings_hash(cfg)
    del written["train"]["fold_seed"], written["numeric"]  # as an mt without those settings wrote it
    older = settings_hash(cfg, written)
    assert older != settings_hash(cfg)
    train = lambda **kw: cfg.model_copy(update={"train": cfg.train.model_copy(update=kw)})  # noqa: E731
    assert settings_hash(train(fold_seed=3), written) == older
    assert settings_hash(train(lr=0.5), written) != older


def test_a_round_killed_before_its_summary_is_unfinished_and_resume_finishes_it(run):
    from multitask.kfold import resume_run

    (RunDir(run).round_dir(0) / "summary.json").unlink()  # killed after the round's oof.npz
    with pytest.raises(FileNotFoundError, match=r"round 0 is not finished.*mt resume --run") as e:
        make_submission(run)
    assert "not done: []" not in str(e.value)  # said of every fold, where the number of folds was not known
    with pytest.raises(FileNotFoundError) as e:
        RunDir(run).latest_round()
    assert "not done: []" not in str(e.value)
    resume_run(run)
    assert make_submission(run).exists()


def test_an_edited_train_table_or_reordered_test_list_is_an_error(run, demo_root, tmp_path):
    import shutil

    from multitask.kfold import aggregate_round, reopen_context

    data = tmp_path / "data_copy"
    shutil.copytree(demo_root, data)
    cfg_text = (RunDir(run).config).read_text().replace(str(demo_root), str(data))
    (RunDir(run).config).write_text(cfg_text)
    aggregate_round(reopen_context(run, with_images=False), 0)  # the same data elsewhere: fine

    info = data / "eval" / "info.csv"
    lines = info.read_text().splitlines()
    info.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    with pytest.raises(ValueError, match="test.npz: predicted for other test images, or in another order"):
        aggregate_round(reopen_context(run, with_images=False), 0)
    with pytest.raises(ValueError, match="test.npz: predicted for other test images"):
        pseudo_label(run, precision=0.0)
    info.write_text("\n".join(lines) + "\n")

    csv = data / "train" / "train.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    with pytest.raises(ValueError, match="oof.npz: predicted for other training images"):
        aggregate_round(reopen_context(run, with_images=False), 0)

    # a shorter table: the last person's rows are past its end (an IndexError once)
    from multitask.kfold import check_identities, resume_run
    from multitask.run import RunError, load_npz

    csv.write_text("\n".join(lines[:-1]) + "\n")
    ctx = reopen_context(run, with_images=False)
    oofs = {k: load_npz(RunDir(run).fold_dir(0, k) / "oof.npz") for k in (0, 1)}
    last = max(oofs, key=lambda k: oofs[k]["rows"].max())
    with pytest.raises(RunError, match="oof.npz: predicted for other training images"):
        check_identities(ctx, 0, last, oofs[last], None)
    # and `mt resume` says so before it trains an unfinished fold on the edited table
    csv.write_text("\n".join([lines[0], *lines[2:]]) + "\n")  # the first person left out
    (RunDir(run).fold_dir(0, 1) / "oof.npz").unlink()
    with pytest.raises(RunError, match="fold0/oof.npz: predicted for other training images"):
        resume_run(run)
    assert not (RunDir(run).fold_dir(0, 1) / "oof.npz").exists()  # fold 1 was left alone

    # another data set altogether in the run's data root (a build made again with another --limit):
    # the persons the run never split are named, with the files to look at
    import re

    from multitask.demo import make_demo_dataset

    shutil.rmtree(data)
    make_demo_dataset(data, n_train_persons=14, n_eval_persons=4, image_size=(64, 48), seed=1)
    said = (rf"{re.escape(str(RunDir(run).folds))}: \d+ group\(s\) of the training data in {re.escape(str(data))} "
            r"have no fold, e\.g\. .*is it the data the run was trained on\?")
    with pytest.raises(ValueError, match=said):
        make_submission(run)
    assert not RunDir(run).submission.exists()


def test_data_moved_since_training_is_followed_by_its_new_place_in_config_yaml(run, demo_root, tmp_path):
    """The data's place is a location: where it moved, the error says to write the new place in
    config.yaml (the refusal of --set data_root sent the user to train again), and the run follows."""
    import shutil

    import yaml

    data = tmp_path / "data_copy"
    shutil.copytree(demo_root, data)
    RunDir(run).config.write_text(RunDir(run).config.read_text().replace(str(demo_root), str(data)))
    before = pd.read_csv(make_submission(run, tmp_path / "before.csv"))
    data.rename(tmp_path / "data_moved")
    with pytest.raises(ValueError, match=rf"{data}: not found \(data_root in {RunDir(run).config}\); if the data moved, "
                                         r"write its new place there"):
        make_submission(run, tmp_path / "after.csv")
    cfg = yaml.safe_load(RunDir(run).config.read_text())
    cfg["data_root"] = str(tmp_path / "data_moved")
    RunDir(run).config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert pd.read_csv(make_submission(run, tmp_path / "after.csv")).equals(before)


def test_labels_edited_since_training_are_an_error(run, demo_root, tmp_path):
    """The same images with one person's labels changed (a fixed typo): the folds' models learnt the
    old labels, and resuming, submitting or pseudo-labelling against the new ones went on silently."""
    import shutil

    from multitask.kfold import resume_run

    data = tmp_path / "data_copy"
    shutil.copytree(demo_root, data)
    RunDir(run).config.write_text(RunDir(run).config.read_text().replace(str(demo_root), str(data)))
    csv = data / "train" / "train.csv"
    frame = pd.read_csv(csv, dtype=str)
    frame.loc[0, "age"] = str(int(frame.loc[0, "age"]) + 1)  # a year more: the same bin, another number
    frame.to_csv(csv, index=False)
    said = (rf"folds.csv: the labels of 1 group\(s\) differ from those the run was trained on, "
            rf"e\.g\. '[^']*{frame.loc[0, 'id']}[^']*'; was the training table edited\?")
    for command in (lambda: make_submission(run), lambda: resume_run(run), lambda: pseudo_label(run, precision=0.0)):
        with pytest.raises(ValueError, match=said):
            command()
    assert not RunDir(run).submission.exists() and RunDir(run).started_rounds() == [0]

    # a folds.csv written before the digests were kept has nothing to check against
    pd.read_csv(RunDir(run).folds, dtype=str).drop(columns="labels").to_csv(RunDir(run).folds, index=False)
    assert make_submission(run).exists()


def test_a_file_of_the_run_damaged_outside_mt_is_named(run):
    """Atomic writes leave no half-written file, but a disk, a copy or a hand can: each damaged file
    is named, where numpy, torch and json spoke of buffers and central directories (or gave a
    traceback)."""
    from multitask.kfold import resume_run
    from multitask.run import RunError

    fold1 = RunDir(run).fold_dir(0, 1)
    kept = {p: p.read_bytes() for p in (fold1 / "last.pt", fold1 / "oof.npz", RunDir(run).round_dir(0) / "summary.json",
                                        RunDir(run).folds)}
    (fold1 / "oof.npz").unlink()  # fold 1 unfinished: resume carries on from its last.pt
    (fold1 / "last.pt").write_bytes(kept[fold1 / "last.pt"][:1000])
    with pytest.raises(RunError, match=r"fold1/last.pt: damaged, cannot be read as a checkpoint \(.+\); delete it, "
                                       r"and `mt resume` trains the fold from its start"):
        resume_run(run)
    for path, content in kept.items():
        path.write_bytes(content)
    (fold1 / "oof.npz").write_bytes(b"garbage")
    with pytest.raises(RunError, match=r"fold1/oof.npz: damaged, cannot be read as an npz file \(.+\)"):
        make_submission(run)
    (fold1 / "oof.npz").write_bytes(kept[fold1 / "oof.npz"])
    (RunDir(run).round_dir(0) / "summary.json").write_text("{")
    with pytest.raises(RunError, match=r"round0/summary.json: damaged, cannot be read as JSON \(Expecting"):
        make_submission(run)
    (RunDir(run).round_dir(0) / "summary.json").write_bytes(b"\xff\xfe{}")  # not even UTF-8
    with pytest.raises(RunError, match=r"round0/summary.json: damaged, cannot be read as JSON \('utf-8' codec"):
        make_submission(run)
    (RunDir(run).round_dir(0) / "summary.json").write_bytes(kept[RunDir(run).round_dir(0) / "summary.json"])
    RunDir(run).folds.write_text("person_id,fold\n1,0\n")
    with pytest.raises(ValueError, match=r"folds.csv: damaged, no column 'group' \(columns: \['person_id', 'fold'\]\)"):
        make_submission(run)
    RunDir(run).folds.write_bytes(kept[RunDir(run).folds])
    assert make_submission(run).exists()


def test_no_room_or_no_permission_fails_before_any_work(demo_root, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    import multitask.run as run_mod
    from multitask.run import StorageError

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    with pytest.raises(StorageError, match="a_file is a file"):
        train_run(tiny_config(demo_root, cache), blocker / "run")
    assert not (tmp_path / "cache").exists()  # refused before the cache was built

    monkeypatch.setattr(run_mod.os, "access", lambda *a: False)  # as a non-root user on a read-only folder
    with pytest.raises(StorageError, match="permission denied"):
        train_run(tiny_config(demo_root, cache), tmp_path / "run")
    monkeypatch.undo()

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    result = runner.invoke(app, ["train", "--data", str(demo_root), "--out", str(tmp_path / "run"), "--folds", "2",
                                 "--set", "model.backbone=test_efficientnet", "--set", cache])
    assert result.exit_code == 2 and "the decoded cache of 84 images at 64x64 needs" in result.output
    assert "MiB free" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists() and not list((tmp_path / "cache").glob("*.npy*"))


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_folds_are_claimed_by_lock_and_the_vote_waits_for_every_fold(demo_root, tmp_path):
    """Folds trained by several processes or machines into one run: a fold held by another is
    skipped and named, the round says what it lacks, submit waits (or takes --round), and a lock
    left by a dead process on this host is taken over."""
    import json
    import socket
    import subprocess
    import sys

    from multitask.kfold import resume_run

    out, cache = tmp_path / "run", f"data.cache_dir={tmp_path / 'cache'}"
    summary = train_run(tiny_config(demo_root, cache, "train.fold=[0]"), out)
    assert summary["folds_missing"] == {"1": "not started"} and not summary["complete"]
    fold0_only = (RunDir(out).round_dir(0) / "summary.json").read_text()
    with pytest.raises(FileNotFoundError, match=r"no round has every fold done; round 0 lacks fold 1 \(not started\)"):
        make_submission(out)
    said = []
    assert len(pd.read_csv(make_submission(out, round=0, log=said.append))) == 4 * 7
    assert "round 0 (asked for); only folds [0] (missing 1)" in said[0]

    lock = RunDir(out).fold_dir(0, 1) / "lock.json"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.parent.mkdir(parents=True)
        lock.write_text(json.dumps({"host": "elsewhere", "pid": sleeper.pid, "since": "2026-11-26 00:00:00"}))
        # the round's summary still says "not started"; submit tells how things stand now
        with pytest.raises(FileNotFoundError, match=r"round 0 lacks fold 1 \(being trained by elsewhere pid"):
            make_submission(out)
        summary = resume_run(out)
        assert summary["folds_done"] == [0]
        assert summary["folds_missing"]["1"].startswith("being trained by elsewhere pid")
        assert summary["folds_missing"]["1"].endswith(f"(remove {lock} if that machine is gone)")
        assert lock.exists()  # another machine's lock is never taken

        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid, "since": "x"}))
        assert resume_run(out)["folds_done"] == [0]  # alive on this host: held
    finally:
        sleeper.kill()
        sleeper.wait()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "since": "x"}))
    summary = resume_run(out)  # dead on this host: taken over
    assert summary["folds_done"] == [0, 1] and summary["complete"] and not lock.exists()
    assert RunDir(out).choose_round(2)[0] == 0
    (RunDir(out).round_dir(0) / "summary.json").write_text(fold0_only)  # as if killed before it was rewritten
    with pytest.raises(FileNotFoundError, match=r"round 0 lacks fold 1 \(finished since the round's results were "
                                                r"written; `mt resume --run .*` adds it\)"):
        make_submission(out)


def test_two_processes_share_the_folds_of_one_round(demo_root, tmp_path):
    """Two `mt resume` processes started together on one run: every fold is trained exactly once,
    and the round's results (written by the last to finish) hold every fold."""
    import os
    import subprocess
    import sys

    out, cache = tmp_path / "run", f"data.cache_dir={tmp_path / 'cache'}"
    train_run(tiny_config(demo_root, cache, "train.folds=4", "train.fold=[0]"), out)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "multitask.cli", "resume", "--run", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    for k in range(4):
        metrics = pd.read_csv(RunDir(out).fold_dir(0, k) / "metrics.csv")
        assert len(metrics) == 1 and metrics["train_id"].nunique() == 1, k  # one training, never two
    summary = read_json(RunDir(out).round_dir(0) / "summary.json")
    assert summary["folds_done"] == [0, 1, 2, 3] and summary["complete"]
    assert not list(out.rglob("lock.json"))


def test_mt_runs_is_a_leaderboard_of_finished_runs(demo_root, tmp_path):
    from multitask.runs import runs_table

    cache = f"data.cache_dir={tmp_path / 'cache'}"
    train_run(tiny_config(demo_root, cache), tmp_path / "runs" / "three_heads")
    train_run(tiny_config(demo_root, cache, "heads=class", "train.epochs=2"), tmp_path / "runs" / "flat")
    (tmp_path / "runs" / "not_a_run").mkdir()
    for name in ("three_heads", "flat"):
        make_submission(tmp_path / "runs" / name)
    table = runs_table([tmp_path / "runs"])
    assert [p.rsplit("/", 1)[-1] for p in table["run"]] == sorted(["three_heads", "flat"],
                                                                  key=lambda n: -read_json(tmp_path / "runs" / n / "summary.json")["rounds"][0]["oof"]["f1"])
    assert table["oof_f1"].is_monotonic_decreasing
    assert len(runs_table([tmp_path / "runs" / "flat", tmp_path / "runs"])) == 2  # a run given twice, listed once
    result = runner.invoke(app, ["runs", str(tmp_path / "runs")], env={"COLUMNS": "80"})  # a plain terminal
    assert result.exit_code == 0 and all(f"oof_f1={f:.4f}" in result.output for f in table["oof_f1"]), result.output
    at = [result.output.find(run) for run in table["run"]]  # each run's path whole, best first
    assert -1 not in at and at == sorted(at), result.output
    row = table.set_index(table["run"].str.rsplit("/", n=1).str[-1]).loc["three_heads"]
    assert row["heads"] == "mask,gender,age" and row["backbone"] == "test_efficientnet" and row["img"] == "32x32"
    assert row["folds"] == "2/2" and row["epochs"] == 1 and 0 <= row["oof_mask"] <= 1
    decided = read_json(RunDir(tmp_path / "runs" / "three_heads").round_dir(0) / "summary.json")["decision"]
    assert row["decided_f1"] == pytest.approx(decided["honest"]["f1"])
    # the folds' epochs, summed from their metrics.csv: a resumed run's earlier invocations count too
    epochs = [pd.read_csv(RunDir(tmp_path / "runs" / "three_heads").fold_dir(0, k) / "metrics.csv") for k in (0, 1)]
    assert row["train_s"] == pytest.approx(sum(m["train_s"].sum() + m["validate_s"].sum() for m in epochs), abs=0.11)
    # a pseudo-label round's row costs that round and the one it learnt from (it showed the last alone)
    import json
    import shutil

    copied = RunDir(tmp_path / "copied")
    shutil.copytree(tmp_path / "runs" / "three_heads", copied.root)
    shutil.copytree(copied.round_dir(0), copied.round_dir(1))
    later = read_json(copied.round_dir(1) / "summary.json")
    (copied.round_dir(1) / "summary.json").write_text(json.dumps(later | {"round": 1, "oof": later["oof"] | {"f1": 0.99}}))
    both = runs_table([copied.root]).iloc[0]
    assert both["round"] == 1 and both["train_s"] == pytest.approx(2 * later["train_s"], abs=0.11)
    # its submission is round 0's, made before round 1: the held-out score is not put beside round 1's OOF unsaid
    scored = runs_table([copied.root], demo_root / "answers.csv").iloc[0]
    assert scored["held_out_f1"] is not None and scored["note"] == (
        f"held-out score of round 0's, the OOF figures round 1's; `mt submit --run {copied.root}` submits round 1")
    edited = pd.read_csv(copied.submission)
    edited.loc[0, "ans"] = (edited.loc[0, "ans"] + 1) % 18
    edited.to_csv(copied.submission, index=False)  # by hand, since its record
    assert "a submission whose round is unknown (no record, or changed since)" in \
        runs_table([copied.root], demo_root / "answers.csv").iloc[0]["note"]
    # a key with a blank class: the key is named, and the run keeps its own figures
    key = pd.read_csv(demo_root / "answers.csv", dtype=str)
    key.loc[3, "ans"] = ""
    key.to_csv(tmp_path / "blank.csv", index=False)
    blank = runs_table([copied.root], tmp_path / "blank.csv").iloc[0]
    assert blank["note"] == (f"no held-out score: {tmp_path / 'blank.csv'}: ans must be a class number on every row; "
                             f"line 5 holds ''") and blank["oof_f1"] == 0.99
    edited = pd.read_csv(copied.submission, dtype=str)
    edited.loc[2, "ans"] = "x"  # a submission edited by hand: named as such, the run's figures kept
    edited.to_csv(copied.submission, index=False)
    bad = runs_table([copied.root], demo_root / "answers.csv").iloc[0]
    assert bad["note"] == (f"no held-out score: {copied.submission}: ans must be a class number on every row; "
                           f"line 4 holds 'x'") and bad["oof_f1"] == 0.99
    edited.loc[2, "ans"] = "1"
    edited.to_csv(copied.submission, index=False)
    key.drop(index=3).assign(ans="1").to_csv(tmp_path / "more.csv", index=False)
    pd.read_csv(copied.submission).drop(index=0).to_csv(copied.submission, index=False)
    assert "submission.csv: no prediction for 1 of the key's images" in \
        runs_table([copied.root], tmp_path / "more.csv").iloc[0]["note"]
    # a flat head has no factor of its own: its factor columns are read off the final class, as every run's are
    flat = table.set_index(table["run"].str.rsplit("/", n=1).str[-1]).loc["flat"]
    flat_oof = read_json(tmp_path / "runs" / "flat" / "summary.json")["rounds"][0]["oof"]
    assert flat["oof_age"] == pytest.approx(flat_oof["f1_age_combined"]) and "oof_class" not in table.columns

    result = runner.invoke(app, ["runs", str(tmp_path / "runs"), "--answers", str(demo_root / "answers.csv"), "--csv"])
    assert result.exit_code == 0, result.output
    from io import StringIO
    csv = pd.read_csv(StringIO(result.output))
    assert len(csv) == 2 and csv["held_out_f1"].between(0, 1).all() and csv["held_out_f1"].is_monotonic_decreasing
    assert "note" not in csv.columns  # each submission holds the round shown
    result = runner.invoke(app, ["runs", str(tmp_path / "runs")], env={"COLUMNS": "250"})
    assert result.exit_code == 0 and "2 run(s), best first" in result.output
    result = runner.invoke(app, ["runs", str(tmp_path / "runs" / "not_a_run")])
    assert result.exit_code == 2 and "no finished run" in result.output
    # an unreadable run beside them: the others' whole numbers stay whole; a folder named like
    # markup is printed as it is
    broken = tmp_path / "runs" / "[v2]broken"
    shutil.copytree(tmp_path / "runs" / "flat", broken)
    (broken / "round0" / "summary.json").write_text("{")
    result = runner.invoke(app, ["runs", str(tmp_path / "runs"), "--csv"])
    csv = pd.read_csv(StringIO(result.output), dtype=str)
    assert len(csv) == 3 and csv["epochs"].notna().sum() == 2 and not csv["epochs"].dropna().str.contains(".", regex=False).any()
    result = runner.invoke(app, ["runs", str(tmp_path / "runs")], env={"COLUMNS": "100"})
    assert result.exit_code == 0 and f"{broken}" in result.output.replace("\n", "")
    assert "epochs=2.0000" not in result.output


def test_time_limit_fits_the_epochs_and_says_so(demo_root, tmp_path):
    from multitask.budget import parse_duration
    from multitask.config import load_config

    assert parse_duration("90s") == 90 and parse_duration("20m") == 1200 and parse_duration("1h30m") == 5400
    assert parse_duration("45") == 45
    with pytest.raises(ConfigError, match="expected e.g."):
        parse_duration("soon")
    common = ["--data", str(demo_root), "--folds", "2", "--epochs", "3", "--set", "model.backbone=test_efficientnet",
              "--set", "data.img_size=[32,32]", "--set", "train.device=cpu", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    # shorter than any epoch, so the outcome does not hang on this machine's speed
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "short"), "--time-limit", "0.01s", *common],
                           env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "training 1 epochs per fold instead of 3" in result.output
    assert load_config(RunDir(tmp_path / "short").config).train.epochs == 1  # the run says what it did
    assert len(pd.read_csv(RunDir(tmp_path / "short").fold_dir(0, 1) / "metrics.csv")) == 1
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "long"), "--time-limit", "2h", *common],
                           env={"COLUMNS": "300"})
    assert result.exit_code == 0 and "all 3 epochs per fold fit" in result.output
    assert load_config(RunDir(tmp_path / "long").config).train.epochs == 3
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "bad"), "--time-limit", "soon", *common])
    assert result.exit_code == 2 and "expected e.g. 90s" in result.output and not (tmp_path / "bad").exists()


def test_time_limit_counts_workers_that_share_a_device_as_one_after_another():
    """--jobs 2 on the CPU (threads split between the workers) or on one GPU does not halve the
    time: the estimate may err short, never long."""
    from multitask.budget import Probe, epochs_that_fit, folds_in_turn

    assert folds_in_turn(5, jobs=1, devices=1) == 5
    assert folds_in_turn(5, jobs=2, devices=1) == 5  # one CPU or one GPU: once counted as 3
    assert folds_in_turn(5, jobs=2, devices=4) == 3 and folds_in_turn(5, jobs=4, devices=2) == 3
    assert folds_in_turn(5, jobs=8, devices=8) == 1 and folds_in_turn(2, jobs=0, devices=1) == 2
    # a 10-minute budget, 10 s epochs, a probe of 25 s, 5 s of prediction a fold: a tenth of the
    # budget is kept, (540 - 25) s are left for 5 folds in turn, or 3 for 3
    probe = Probe(total_s=25, epoch_s=10, predict_s=5)
    assert epochs_that_fit(600, probe, folds_in_turn(5, 2, 1)) == (515 / 5 - 5) // 10 == 9
    assert epochs_that_fit(600, probe, folds_in_turn(5, 2, 2)) == (515 / 3 - 5) // 10 == 16
    assert epochs_that_fit(20, probe, 1) == 0


def test_time_limit_reckons_the_folds_at_a_steady_epoch_not_the_first():
    """On an H200 the first epoch of a process took about 100 s where each later fold, epoch and
    prediction, took about 11 s; reckoned at the first epoch, a 600-s budget for the competition's
    5 folds left one epoch of ten. The probe's second epoch is the measure."""
    from multitask.budget import Probe, epochs_that_fit

    probe = Probe(total_s=100 + 9 + 2, epoch_s=9, predict_s=2)
    assert epochs_that_fit(600, probe, 5) == 9
    first_epoch_as_measure = Probe(total_s=100, epoch_s=100, predict_s=0)  # the old one-epoch probe
    assert epochs_that_fit(600, first_epoch_as_measure, 5) == 0


def test_time_limit_charges_each_jobs_worker_the_one_off_costs_again():
    """`--jobs` workers are fresh processes: each starts CUDA and searches cuDNN's algorithms again.
    On two GPUs, 3 folds per worker, 89 s of one-off costs: without charging them the run overran
    (3 x (9 x 9 + 2) + 89 = 338 s after a 111-s probe, 449 s against 420)."""
    from multitask.budget import Probe, epochs_that_fit, folds_in_turn, restarts_in_turn

    probe = Probe(total_s=111, epoch_s=9, predict_s=2)
    assert probe.one_off_s == 111 - 2 - 2 * 9 == 91
    assert restarts_in_turn(5, jobs=1, devices=2) == 0 and restarts_in_turn(1, jobs=4, devices=1) == 0
    assert restarts_in_turn(5, jobs=2, devices=2) == 1 and restarts_in_turn(5, jobs=2, devices=1) == 2
    assert restarts_in_turn(5, jobs=8, devices=2) == 3  # five workers at most, three in turn on one device
    in_turn, restarts = folds_in_turn(5, 2, 2), restarts_in_turn(5, 2, 2)
    epochs = epochs_that_fit(420, probe, in_turn, restarts)
    assert epochs == ((378 - 111 - 91) / 3 - 2) // 9 == 6
    assert probe.total_s + restarts * probe.one_off_s + in_turn * (epochs * probe.epoch_s + probe.predict_s) <= 420


def test_time_limit_is_the_whole_commands_reading_and_decoding_included(demo_root, tmp_path, monkeypatch):
    """On an H200 a 420-s limit ran 432 s: what went before the probe (reading the table, decoding
    28,098 faces) was not taken off the budget. It is now, in the reckoning and in what it says."""
    import time

    import multitask.kfold as kfold
    from multitask.budget import Probe, epochs_that_fit

    probe = Probe(total_s=25, epoch_s=10, predict_s=5)
    assert epochs_that_fit(600, probe, 5) == (515 / 5 - 5) // 10 == 9
    assert epochs_that_fit(600, probe, 5, spent_s=60) == (455 / 5 - 5) // 10 == 8
    assert epochs_that_fit(600, probe, 5, spent_s=540) == 0
    spent, real_load = [], kfold.load_images

    def slow_load(*args, **kwargs):
        time.sleep(0.3)
        return real_load(*args, **kwargs)

    def fit(cfg, table, images, device, progress, say, spent_s):
        spent.append(spent_s)
        return cfg

    monkeypatch.setattr(kfold, "load_images", slow_load)
    monkeypatch.setattr(kfold, "fit_epochs", fit)
    train_run(tiny_config(demo_root, f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=1", "train.time_limit_s=600",
                          "train.fold=[0]", "decide.subjects=null"), tmp_path / "run")
    assert len(spent) == 1 and spent[0] >= 0.3
    # and what the command did before it called train_run (`mt train` imports torch and timm first)
    monkeypatch.setattr(kfold, "load_images", real_load)
    train_run(tiny_config(demo_root, f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=1", "train.time_limit_s=600",
                          "train.fold=[0]", "decide.subjects=null"), tmp_path / "run2", started=time.perf_counter() - 7)
    assert spent[1] >= 7


def test_time_limit_probe_trains_two_epochs_and_times_the_second(demo_root, tmp_path, monkeypatch):
    import torch

    import multitask.budget as budget
    import multitask.kfold as kfold
    from multitask.context import build_task, load_images, read_checked

    trained = []
    real = kfold.train_round_fold

    def spy(ctx, r, k, device, progress=None, resume=False, on_epoch=None):
        trained.append(ctx.cfg.train.epochs)
        real(ctx, r, k, device, progress, resume, on_epoch)
    monkeypatch.setattr(kfold, "train_round_fold", spy)
    said = []
    cfg = tiny_config(demo_root, f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=4", "train.time_limit_s=3600",
                      "decide.subjects=null")
    task, _ = build_task(cfg)
    table = read_checked(cfg, task)
    probe = budget.run_probe(cfg, table, load_images(cfg, table), torch.device("cpu"))
    assert trained == [2]  # the probe: two epochs of the first fold
    assert 0 < probe.epoch_s < probe.total_s and 0 < probe.predict_s < probe.total_s
    assert probe.epoch_s + probe.predict_s < probe.total_s
    fitted = budget.fit_epochs(cfg, table, load_images(cfg, table), torch.device("cpu"), say=said.append)
    assert said[0] == "time limit 3600 s: timing two epochs of one fold to see how many fit"  # before the probe
    assert fitted.train.epochs == 4 and "a probe of two epochs " in said[1] and "all 4 epochs" in said[1]
    assert "starting, reading and decoding took 0.0 s" in said[1]  # nothing spent before the probe was passed
    # one epoch configured: nothing to fit, nothing trained
    trained.clear()
    one = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 1})})
    assert budget.fit_epochs(one, table, None, torch.device("cpu"), say=said.append).train.epochs == 1
    assert trained == [] and "not measured" in said[-1]


def test_time_limit_with_fold_k_into_a_run_keeps_its_epochs(demo_root, tmp_path, monkeypatch):
    """A second `mt train --fold 1 --time-limit ...` into the run that `--fold 0` started: not measured
    again (another measurement, other epochs, and the run would be refused for other settings)."""
    import multitask.kfold as kfold
    from multitask.config import load_config

    out = tmp_path / "run"
    common = (f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=3", "train.time_limit_s=0.01", "decide.subjects=null")
    said = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: said.append(" ".join(map(str, a))))
    train_run(tiny_config(demo_root, *common, "train.fold=[0]"), out)
    assert load_config(RunDir(out).config).train.epochs == 1 and "instead of 3" in said[1]

    def probe(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(kfold, "fit_epochs", probe)
    # with another limit than the first's: the run's epochs and limit, not a refusal of other settings
    summary = train_run(tiny_config(demo_root, *common, "train.fold=[1]", "train.time_limit_s=7"), out)
    assert summary["folds_done"] == [0, 1] and "training its 1 epochs per fold" in said[-1]
    assert "fitted to its time limit of 0.01 s" in said[-1]
    assert len(pd.read_csv(RunDir(out).fold_dir(0, 1) / "metrics.csv")) == 1
    assert load_config(RunDir(out).config).train.time_limit_s == 0.01
    # fewer epochs configured than a run trains: not taken (claim_run_dir then refuses the settings)
    from multitask.budget import epochs_of_run
    from multitask.config import dump_config

    other = RunDir(tmp_path / "other")
    assert epochs_of_run(other, tiny_config(demo_root, *common)) is None  # no run yet: measure
    other.root.mkdir()
    other.config.write_text(dump_config(tiny_config(demo_root, *common)))
    assert epochs_of_run(other, tiny_config(demo_root, *common, "train.epochs=2")).train.epochs == 2
    assert epochs_of_run(other, tiny_config(demo_root, *common, "train.epochs=5")).train.epochs == 3


def test_a_rounds_lock_is_said_to_be_held_for_writing(tmp_path, monkeypatch):
    # the round's lock is held while its results are written (not "trained"); a writer waits out
    # another's (a live one on another machine may take a while), then names the lock to remove
    import json

    import multitask.run as run_mod
    from multitask.lock import LockError

    monkeypatch.setattr(run_mod, "RESULTS_WAIT_S", 0.2)
    run = RunDir(tmp_path / "run")
    lock = run.round_dir(0) / "lock.json"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"host": "another-machine", "pid": 1, "since": "then"}))
    with pytest.raises(LockError, match=r"round0/lock.json: being written by another-machine pid 1 since then "
                                        r"\(remove .* if that machine is gone\) for more than 0 s"):
        with run.round_lock(0):
            pass
    assert lock.exists()  # another machine's: never taken over from here


def test_a_stale_lock_is_taken_over_by_one_process_only(tmp_path):
    """Replays the race: two processes read the same dead holder; the first removes the lock and
    makes its own; the second, in its turn, reads again, finds the first's live lock and leaves it."""
    import json
    import socket

    from multitask.lock import _take_over, file_lock, lock_holder

    lock = tmp_path / "fold0" / "lock.json"
    lock.parent.mkdir()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "since": "x"}))
    assert lock_holder(lock) is None  # both processes read this
    with file_lock(lock) as first:  # the first takes it over
        assert first is None
        mine = lock.read_text()
        _take_over(lock)  # the second goes on from its stale reading
        assert lock.read_text() == mine  # the first's lock stands
        with file_lock(lock) as second:
            assert second is not None and second.startswith("being trained by")
    assert not lock.exists() and not list(lock.parent.iterdir())


def test_a_lock_whose_pid_now_belongs_to_another_process_is_stale(tmp_path):
    """A container restarted after a kill: its entrypoint has the dead trainer's pid again (pid 1),
    or another process took the pid. The lock's recorded process start tells them apart."""
    import json
    import os
    import socket

    from multitask.lock import file_lock, lock_holder, process_start

    lock = tmp_path / "lock.json"
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": "x"}
    lock.write_text(json.dumps(me))  # this very pid, in a lock this process never took
    assert lock_holder(lock) is None
    with file_lock(lock) as holder:
        assert holder is None and lock_holder(lock)["started"] == process_start(os.getpid())
        with file_lock(lock) as again:  # held by this process now: not stale to itself
            assert again.startswith("being trained by")
    parent = os.getppid()  # alive, but started at another moment than the lock says
    lock.write_text(json.dumps(me | {"pid": parent, "started": "1"}))
    if process_start(parent) is not None:  # Linux: /proc tells the start
        assert lock_holder(lock) is None
    lock.write_text(json.dumps(me | {"pid": parent, "started": process_start(parent)}))
    assert lock_holder(lock)["pid"] == parent  # the same process: held


def test_a_lock_is_judged_by_its_flock_across_containers_that_share_a_hostname(tmp_path):
    """Docker's --network host, Kubernetes' hostNetwork: two containers share a hostname, not their
    pids, so a live trainer's pid looks gone from the other one, which took its lock over and trained
    the same fold. A lock holds an flock while its holder lives (the kernel's, whatever the PID
    namespace), and is judged by it: held while it is held, stale once it is not, as after a
    restarted container, whose pids start again."""
    import fcntl
    import json
    import os
    import socket

    from multitask.lock import file_lock, lock_holder

    lock = tmp_path / "lock.json"
    with file_lock(lock):
        assert lock_holder(lock)["flock"] is True
    there = {"host": socket.gethostname(), "pid": _dead_pid(), "since": "x", "flock": True}  # a pid gone from here
    lock.write_text(json.dumps(there))
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as its holder in the other container keeps it
        assert lock_holder(lock) == there
        with file_lock(lock) as holder:
            assert holder.startswith(f"being trained by {socket.gethostname()} pid {there['pid']}")
    finally:
        os.close(fd)  # the holder dies: the kernel drops its flock
    assert lock_holder(lock) is None
    with file_lock(lock) as holder:
        assert holder is None  # taken over


def test_a_lock_left_unwritten_is_stale_after_a_few_seconds(tmp_path):
    import os
    import time

    from multitask.lock import UNWRITTEN_STALE_S, file_lock, lock_holder

    lock = tmp_path / "lock.json"
    lock.write_text("")  # made, then killed before its content
    assert lock_holder(lock) == {}  # just now: being written
    with file_lock(lock) as holder:
        assert holder == "being claimed by another process"
    old = time.time() - UNWRITTEN_STALE_S - 1
    os.utime(lock, (old, old))
    assert lock_holder(lock) is None
    with file_lock(lock) as holder:
        assert holder is None and lock_holder(lock)["pid"] == os.getpid()
    lock.write_text('{"host": "some')  # half written, long ago
    os.utime(lock, (old, old))
    with file_lock(lock) as holder:
        assert holder is None


def test_an_unwritten_lock_whose_flock_is_held_is_its_makers_whatever_its_age(tmp_path):
    """Its maker takes the flock, then writes: one paused between the two (Ctrl-Z, a VM pause, an NFS
    clock ahead of this one) still holds the lock, and it is not taken over."""
    import fcntl
    import os
    import time

    from multitask.lock import UNWRITTEN_STALE_S, file_lock, lock_holder

    lock = tmp_path / "lock.json"
    lock.write_text("")
    old = time.time() - UNWRITTEN_STALE_S - 1
    os.utime(lock, (old, old))
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # its maker, paused before its content
        assert lock_holder(lock) == {}
        with file_lock(lock) as holder:
            assert holder == "being claimed by another process"
    finally:
        os.close(fd)
    assert lock_holder(lock) is None  # its maker gone


def test_a_folder_in_a_locks_place_is_nobodys_to_take_over(tmp_path):
    from multitask.lock import file_lock, lock_holder

    (tmp_path / "lock.json").mkdir()  # IsADirectoryError escaped from reading it
    assert lock_holder(tmp_path / "lock.json") == {}
    with file_lock(tmp_path / "lock.json") as holder:
        assert holder == "being claimed by another process"


def test_a_holder_whose_lock_was_removed_leaves_the_next_holders_lock(tmp_path):
    """A lock removed by hand (as the message about another machine's lock advises) is taken by
    another process; the first, finishing, removed whatever lock file was there: the other's, so a
    third process trained the same fold beside it."""
    import json
    import os

    from multitask.lock import file_lock, lock_holder

    lock = tmp_path / "lock.json"
    with file_lock(lock) as first:
        assert first is None
        lock.unlink()  # by hand
        lock.write_text(json.dumps({"host": "other-machine", "pid": 7, "since": "x"}))  # the next holder's
    assert lock_holder(lock) == {"host": "other-machine", "pid": 7, "since": "x"}
    with file_lock(lock) as third:
        assert third.startswith("being trained by other-machine pid 7")
    os.unlink(lock)


def test_a_new_files_flock_waits_out_another_process_looking_at_it(tmp_path):
    """Another process's look at a lock or temp file (`unlocked`) holds its flock for an instant; the
    maker took that for a filesystem without flocks, and its file was then judged by its pid alone
    (which another container sharing the hostname sees as gone)."""
    import fcntl
    import os
    import threading
    import time

    from multitask.lock import hold_flock, unlocked

    path = tmp_path / "f.tmp"
    path.write_text("")
    looker = os.open(path, os.O_RDONLY)
    fcntl.flock(looker, fcntl.LOCK_EX)
    threading.Timer(0.1, os.close, [looker]).start()  # the look ends
    fd = os.open(path, os.O_RDWR)
    try:
        t0 = time.monotonic()
        assert hold_flock(fd) is True and time.monotonic() - t0 >= 0.05
        assert unlocked(path) is False
    finally:
        os.close(fd)


LOCK_RACER = """
import json, sys, time
from pathlib import Path
import multitask.lock as L
lock, go, done, out = map(Path, sys.argv[1:5])
read = L._read
def slow_read(path):  # widens the race: every racer reads the dead holder before any acts on it
    seen = read(path)
    time.sleep(0.05)
    return seen
L._read = slow_read
while not go.exists():
    time.sleep(0.001)
with L.file_lock(lock) as holder:
    out.write_text(json.dumps(holder))
    while holder is None and not done.exists():
        time.sleep(0.01)
"""


def test_processes_racing_for_a_stale_lock_leave_one_holder(tmp_path):
    """Six processes released together on one stale lock: exactly one holds it."""
    import json
    import socket
    import subprocess
    import sys
    import time

    lock, go, done = tmp_path / "lock.json", tmp_path / "go", tmp_path / "done"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "since": "x"}))
    outs = [tmp_path / f"out{i}" for i in range(6)]
    procs = [subprocess.Popen([sys.executable, "-c", LOCK_RACER, str(lock), str(go), str(done), str(o)]) for o in outs]
    try:
        time.sleep(1.0)  # every one imported and waiting
        go.touch()
        deadline = time.monotonic() + 60
        while not all(o.exists() for o in outs) and time.monotonic() < deadline:
            time.sleep(0.01)
        holders = [json.loads(o.read_text()) for o in outs]
    finally:
        done.touch()
        for p in procs:
            p.wait(timeout=60)
    assert holders.count(None) == 1, holders
    assert not lock.exists()


def test_a_submission_says_beside_it_what_made_it(run, tmp_path):
    """Which run, round and trainings made a file, its digest (a file changed since no longer matches
    it), and the classes it never predicts, which a macro F1 scores 0 wherever the test set has them."""
    said = []
    path = make_submission(run, tmp_path / "sub.csv", log=said.append)
    record = read_json(tmp_path / "sub.csv.json")
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and record["file"] == "sub.csv"
    assert record["run"] == str(run.resolve()) and record["predicted_by"]["round"] == 0
    assert "best OOF macro F1" in record["predicted_by"]["why"] and all(record["predicted_by"]["train_ids"].values())
    sub = pd.read_csv(path)
    counts = record["classes"]
    assert list(counts)[3] == "3: worn / female / <30" and record["rows"] == len(sub) == 28
    assert [c["predicted"] for c in counts.values()] == np.bincount(sub["ans"], minlength=18).tolist()
    assert sum(c["train"] for c in counts.values()) == 12 * 7  # the demo's training persons, seven pictures each
    never = [name for name, c in counts.items() if c["train"] > 0 and c["predicted"] == 0]
    assert record["never_predicted"] == never and len(never) > 0  # one epoch of a tiny model
    assert [s for s in said if "scores 0" in s] == [
        f"no prediction is of {len(never)} class(es) the training set has, each of which scores 0 wherever the test "
        f"set has it: " + ", ".join(never)]
    assert record["predicted_by"] == {"round": 0, "why": said[0].removeprefix("using "),
                                      "train_ids": RunDir(run).round_train_ids(0)}


def test_a_refused_submission_leaves_the_file_and_its_record_as_they_were(run, tmp_path, monkeypatch):
    import multitask.submit as submit

    path = make_submission(run, tmp_path / "sub.csv")
    before = path.read_bytes(), (tmp_path / "sub.csv.json").read_bytes()

    def refused(*a):
        raise submit.SubmissionError("refused")

    monkeypatch.setattr(submit, "submission_text", refused)
    with pytest.raises(submit.SubmissionError, match="refused"):
        make_submission(run, tmp_path / "sub.csv")
    assert (path.read_bytes(), (tmp_path / "sub.csv.json").read_bytes()) == before
    monkeypatch.undo()
    # the new file cannot be written (a full disk): the old one keeps its record
    real_writer = submit.atomic_writer

    @contextmanager
    def full_disk(path, mode="wb"):
        with real_writer(path, mode) as fh:
            fh.write(b"ImageID,ans\n")
            raise OSError(28, "No space left on device")
            yield fh

    monkeypatch.setattr(submit, "atomic_writer", full_disk)
    with pytest.raises(OSError, match="No space left"):
        make_submission(run, tmp_path / "sub.csv")
    assert (path.read_bytes(), (tmp_path / "sub.csv.json").read_bytes()) == before
    monkeypatch.undo()
    # the record's name is taken by a file that is not a record, or by a folder: nothing is written
    (tmp_path / "notes.csv.json").write_text("my notes")
    (tmp_path / "dir.csv.json").mkdir()
    for name, what in (("notes.csv", "this file is not one"), ("dir.csv", "this is a folder or a link")):
        with pytest.raises(submit.SubmissionError, match=f"{name}.json: the submission's record goes here, and {what}"):
            make_submission(run, tmp_path / name)
        assert not (tmp_path / name).exists()
    assert (tmp_path / "notes.csv.json").read_text() == "my notes"
