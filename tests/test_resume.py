"""A killed run carries on where it stopped, and ends where an uninterrupted run ends (CPU)."""
import os

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import multitask.engine as engine
from conftest import metrics_of, tiny_config
from multitask.cli import app
from multitask.config import ConfigError
from multitask.kfold import resume_run, train_run
from multitask.run import RunDir, RunError, load_npz


def _kill_at_epoch_call(monkeypatch, n):
    real, calls = engine.train_one_epoch, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", dying)
    return lambda: monkeypatch.setattr(engine, "train_one_epoch", real)


@pytest.mark.parametrize("backend", ["albumentations", "torch"])
def test_resume_after_a_kill_equals_an_uninterrupted_run(demo_root, tmp_path, monkeypatch, backend):
    common = (f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=3", "train.ema=true", "model.drop_rate=0.2",
              f"aug.backend={backend}")
    full, killed = tmp_path / "full", tmp_path / "killed"
    train_run(tiny_config(demo_root, *common), full)

    restore = _kill_at_epoch_call(monkeypatch, 5)  # fold 0 runs 3 epochs; fold 1 dies in its second
    with pytest.raises(KeyboardInterrupt):
        train_run(tiny_config(demo_root, *common), killed)
    restore()
    run = RunDir(killed)
    assert (run.fold_dir(0, 0) / "oof.npz").exists() and not (run.fold_dir(0, 1) / "oof.npz").exists()
    assert torch.load(run.fold_dir(0, 1) / "last.pt", weights_only=True)["epochs_done"] == 1
    kept = (run.fold_dir(0, 0) / "oof.npz").stat().st_mtime_ns

    epochs, real_epoch = [], engine.train_one_epoch
    monkeypatch.setattr(engine, "train_one_epoch", lambda *a, **k: epochs.append(1) or real_epoch(*a, **k))
    summary = resume_run(killed)
    monkeypatch.setattr(engine, "train_one_epoch", real_epoch)
    assert summary["folds_done"] == [0, 1]
    assert len(epochs) == 2  # fold 1's second and third epochs: it carried on from last.pt, not from scratch
    assert (run.fold_dir(0, 0) / "oof.npz").stat().st_mtime_ns == kept  # the finished fold is not retrained
    for k in (0, 1):
        a = metrics_of(RunDir(full).fold_dir(0, k) / "metrics.csv")
        b = metrics_of(run.fold_dir(0, k) / "metrics.csv")
        pd.testing.assert_frame_equal(a, b)
        assert pd.read_csv(run.fold_dir(0, k) / "metrics.csv")["train_id"].nunique() == 1  # one training, resumed
        wa = torch.load(RunDir(full).fold_dir(0, k) / "best.pt", weights_only=True)["model"]
        wb = torch.load(run.fold_dir(0, k) / "best.pt", weights_only=True)["model"]
        assert all(torch.equal(wa[n], wb[n]) for n in wa)
    oa, ob = load_npz(RunDir(full).round_dir(0) / "oof.npz"), load_npz(run.round_dir(0) / "oof.npz")
    for name in ("p_mask", "p_gender", "p_age"):
        np.testing.assert_array_equal(oa[name], ob[name])


def test_resume_keeps_the_runs_settings_and_needs_a_run(demo_root, tmp_path):
    out = tmp_path / "run"
    train_run(tiny_config(demo_root, f"data.cache_dir={tmp_path / 'cache'}"), out)
    with pytest.raises(ConfigError, match="train.epochs cannot change"):
        resume_run(out, ["train.epochs=5"])
    from multitask.pseudo import pseudo_label

    with pytest.raises(ConfigError, match="train.lr cannot change"):  # a later round may not drift either
        pseudo_label(out, overrides=["train.lr=0.1"])
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        resume_run(tmp_path / "nothing")
    # a fold killed between its OOF and test files is not counted as done, neither by the aggregate
    # nor by resume, which trains it again
    from multitask.kfold import aggregate_round, reopen_context

    (RunDir(out).fold_dir(0, 1) / "test.npz").unlink()
    assert aggregate_round(reopen_context(out), 0)["folds_done"] == [0]
    assert resume_run(out)["folds_done"] == [0, 1]
    # a finished round: nothing to train, the aggregate is rebuilt from the folds' files
    result = CliRunner().invoke(app, ["resume", "--run", str(out), "--jobs", "2"])
    assert result.exit_code == 0, result.output
    assert "round 0 out-of-fold" in result.output


def test_a_fold_killed_part_way_is_not_resumed_under_edited_settings(demo_root, tmp_path, monkeypatch):
    # the review's case: no fold finished, config.yaml's lr edited by hand; fold 0 would carry on its
    # old schedule from last.pt and every fold be stamped with the new settings
    import yaml

    out = tmp_path / "run"
    restore = _kill_at_epoch_call(monkeypatch, 2)  # fold 0 dies in its second epoch (1 of them written)
    with pytest.raises(KeyboardInterrupt):
        train_run(tiny_config(demo_root, f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=2"), out)
    restore()
    run = RunDir(out)
    assert (run.fold_dir(0, 0) / "last.pt").exists() and not (run.fold_dir(0, 0) / "oof.npz").exists()
    written = yaml.safe_load(run.config.read_text())
    run.config.write_text(yaml.safe_dump(written | {"train": written["train"] | {"lr": written["train"]["lr"] * 3}}))
    with pytest.raises(RunError, match=r"fold\(s\) 0 were trained under other settings than .*config.yaml holds now"):
        resume_run(out)
    run.config.write_text(yaml.safe_dump(written))  # put back: the fold carries on
    assert resume_run(out)["folds_done"] == [0, 1]


def test_only_training_makes_a_runs_folds(demo_root, tmp_path):
    """A command that reads a run never writes its folds: without folds.csv, submit and pseudo-label
    stop and say so (they would have voted folds other than the models' own); resume, which finishes
    what `mt train` began (stopped between config.yaml and folds.csv), makes the same folds again."""
    from multitask.pseudo import pseudo_label
    from multitask.run import RunError
    from multitask.submit import make_submission

    out = tmp_path / "run"
    train_run(tiny_config(demo_root, f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=1"), out)
    run = RunDir(out)
    made = run.folds.read_text()
    run.folds.unlink()
    with pytest.raises(RunError, match="folds.csv: not found"):
        make_submission(out)
    with pytest.raises(RunError, match="folds.csv: not found"):
        pseudo_label(out)
    assert not run.folds.exists() and not run.submission.exists() and not run.round_dir(1).exists()
    assert resume_run(out)["folds_done"] == [0, 1]
    assert run.folds.read_text() == made


def test_resume_finishes_a_killed_pseudo_label_round(demo_root, tmp_path, monkeypatch):
    from multitask.pseudo import pseudo_label

    out = tmp_path / "run"
    train_run(tiny_config(demo_root, f"data.cache_dir={tmp_path / 'cache'}"), out)
    restore = _kill_at_epoch_call(monkeypatch, 2)  # round 1: fold 0 done, fold 1 killed before training
    with pytest.raises(KeyboardInterrupt):
        pseudo_label(out, precision=0.0, rounds=1)
    restore()
    assert RunDir(out).rounds() == [0]  # round 1 has no aggregate yet
    summary = resume_run(out)
    assert summary["round"] == 1 and summary["folds_done"] == [0, 1] and summary["pseudo_added"] == {"0": 28, "1": 28}
    assert RunDir(out).rounds() == [0, 1]


def _readable(run_dir) -> int:
    """Every file the run holds reads whole (atomic writes: a reader sees the old file or the new one);
    leftover temp files of a killed write are not files of the run. Returns how many were read."""
    import json

    import yaml

    n = 0
    for p in run_dir.rglob("*"):
        if not p.is_file() or p.name.endswith(".tmp"):
            continue
        if p.suffix == ".npz":
            load_npz(p)
        elif p.suffix == ".pt":
            torch.load(p, map_location="cpu", weights_only=True)
        elif p.suffix == ".csv":
            pd.read_csv(p)
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".yaml":
            yaml.safe_load(p.read_text())
        n += 1
    return n


def test_sigkill_at_several_points_then_resume_ends_where_an_uninterrupted_run_ends(demo_root, tmp_path):
    """A real `mt` process killed with SIGKILL (no handler runs, no finally) inside fold 0, as fold 0
    ends (its OOF being written), inside fold 1 and inside a pseudo-label round: every file is whole
    after each kill, and `mt resume` finishes with the numbers of a run never killed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    settings = ["--set", "model.backbone=test_efficientnet", "--set", "data.img_size=[32,32]", "--set",
                "train.batch_size=16", "--set", "train.eval_batch_size=64", "--set", "train.device=cpu",
                "--set", f"data.cache_dir={tmp_path / 'cache'}"]

    def mt(*args):
        return subprocess.Popen([sys.executable, "-m", "multitask.cli", *map(str, args)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ | {"COLUMNS": "200"})

    def train(out):
        return mt("train", "--data", demo_root, "--out", out, "--folds", "2", "--epochs", "4", *settings)

    def finish(proc):
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()

    full, killed = tmp_path / "full", tmp_path / "killed"
    # the run never killed, in this process (two `mt` starts fewer): the same settings as `train`'s
    from multitask.config import load_config
    from multitask.pseudo import pseudo_label

    train_run(load_config(None, ["train.folds=2", "train.epochs=4", *settings[1::2]], data=demo_root), full)
    pseudo_label(full, precision=0.0)

    fold = lambda r, k, name: RunDir(killed).fold_dir(r, k) / name  # noqa: E731
    rows = lambda path: len(pd.read_csv(path)) if path.exists() else 0  # noqa: E731
    points = [  # (where, launch, reached)
        ("inside fold 0", lambda: train(killed), lambda: rows(fold(0, 0, "metrics.csv")) >= 2),
        ("fold 0 ending", lambda: mt("resume", "--run", killed), lambda: fold(0, 0, "oof.npz").exists()),
        ("inside fold 1", lambda: mt("resume", "--run", killed), lambda: rows(fold(0, 1, "metrics.csv")) >= 2),
        ("round 1", lambda: mt("pseudo-label", "--run", killed, "--precision", "0"),
         lambda: rows(fold(1, 0, "metrics.csv")) >= 1),
        ("round 1, fold 1", lambda: mt("resume", "--run", killed), lambda: rows(fold(1, 1, "metrics.csv")) >= 1),
    ]
    kills = 0
    for where, launch, reached in points:
        if reached():
            continue  # an earlier kill landed past this point
        if where == "round 1" and not (RunDir(killed).round_dir(0) / "summary.json").exists():
            finish(mt("resume", "--run", killed))  # round 0 must be finished before pseudo-labelling
        proc = launch()
        while proc.poll() is None and not reached():
            time.sleep(0.005)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
        assert _readable(killed) > 0, where
    assert kills >= 3
    finish(mt("resume", "--run", killed))
    assert RunDir(killed).rounds() == [0, 1] and not list(killed.rglob("*.tmp"))  # resume sweeps killed writes

    for r in (0, 1):
        for k in (0, 1):
            a = metrics_of(RunDir(full).fold_dir(r, k) / "metrics.csv")
            b = metrics_of(RunDir(killed).fold_dir(r, k) / "metrics.csv")
            pd.testing.assert_frame_equal(a, b)
        oa, ob = load_npz(RunDir(full).round_dir(r) / "oof.npz"), load_npz(RunDir(killed).round_dir(r) / "oof.npz")
        for name in ("p_mask", "p_gender", "p_age"):
            np.testing.assert_array_equal(oa[name], ob[name])


def test_a_kill_between_best_pt_and_last_pt_leaves_a_best_that_describes_best_pt(tmp_path):
    """best.pt (and a top-k file) of epoch 3 were written, last.pt still says 2 epochs done and a best
    of epoch 2 whose weights best.pt no longer holds: the resumed fold takes best.pt's own scores,
    so the summary never names an epoch whose weights are gone; the top file of the epoch to run
    again is removed."""
    from multitask.engine import kept_best
    from multitask.run import save_torch

    save_torch(tmp_path / "best.pt", {"model": {}, "epoch": 3, "scores": {"f1": 0.6}})
    for e in (2, 3):
        save_torch(tmp_path / f"top_e{e}.pt", {"model": {}, "epoch": e})
    assert kept_best(tmp_path, 2, {"f1": 0.5, "epoch": 2}) == {"f1": 0.6, "epoch": 3}
    assert sorted(p.name for p in tmp_path.glob("top_e*.pt")) == ["top_e2.pt"]
    save_torch(tmp_path / "best.pt", {"model": {}, "epoch": 2, "scores": {"f1": 0.5}})  # killed after last.pt
    assert kept_best(tmp_path, 3, {"f1": 0.5, "epoch": 2}) == {"f1": 0.5, "epoch": 2}


def test_a_fold_whose_loss_becomes_nan_stops_and_says_so(demo_root, tmp_path):
    """A learning rate far too high leaves nan weights after a few steps: the fold stops at the end of
    that epoch, naming it, instead of training on and predicting the first class for every image."""
    from multitask.run import RunError

    out = tmp_path / "run"
    with pytest.raises(RunError, match=r"fold 0.*: the training loss became nan in epoch 1: the model diverged\. "
                                       r"Train again with a lower learning rate \(train.lr is 1e\+30"):
        train_run(tiny_config(demo_root, f"data.cache_dir={tmp_path / 'cache'}", "train.lr=1e30",
                              "train.warmup_epochs=0"), out)
    assert not (RunDir(out).fold_dir(0, 0) / "last.pt").exists()  # nothing of the diverged epoch is kept


def test_the_lr_decays_even_when_the_run_is_no_longer_than_its_warmup():
    from multitask.engine import warmup_cosine

    # one epoch of 100 steps with one epoch of warmup (`--time-limit` often leaves one epoch)
    f = [warmup_cosine(100, 100)(s) for s in range(100)]
    assert max(f) == 1.0 and f.index(1.0) == 49  # the warmup takes at most half the steps
    assert f[-1] < 0.01 and all(a >= b for a, b in zip(f[49:], f[50:]))  # then the cosine runs down
    # a warmup shorter than half the run is as configured
    g = [warmup_cosine(10, 100)(s) for s in range(100)]
    assert g[:10] == [(s + 1) / 10 for s in range(10)] and g[10] == 1.0 and g[-1] < 0.01
    assert warmup_cosine(0, 100)(0) == 1.0 and warmup_cosine(5, 1)(0) == 1.0


def test_mixup_draws_are_a_stream_of_their_own():
    """The mixer's generator once was seeded seed * 1_000_003 + epoch + 17: epoch e's mixing drew the
    very numbers of epoch e + 17's batch order (data/dataset.py seeds that with seed * 1_000_003 + epoch)."""
    from multitask.engine import mix_generator

    for seed in (0, 1, 1203, -5):
        orders = {torch.Generator().manual_seed(seed * 1_000_003 + e).initial_seed() for e in range(200)}
        mixes = [mix_generator(seed, e) for e in range(200)]
        assert not orders & {g.initial_seed() for g in mixes}
        assert len({g.initial_seed() for g in mixes}) == 200
    a, b = torch.rand(4, generator=mix_generator(3, 2)), torch.rand(4, generator=mix_generator(3, 2))
    assert torch.equal(a, b)  # seeded: a resumed epoch mixes as the uninterrupted one did


def test_a_round_killed_before_its_labels_is_refused_by_resume(demo_root, tmp_path, monkeypatch):
    """The labels are written before pseudo.json (which made the round's folder): a kill between the
    two once left a round that `mt resume` trained as a plain copy of round 0."""
    import multitask.pseudo as pseudo
    from multitask.run import RunError, write_json

    out = tmp_path / "run"
    train_run(tiny_config(demo_root, f"data.cache_dir={tmp_path / 'cache'}"), out)
    run = RunDir(out)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pseudo, "write_json", killed)  # killed after the labels, before pseudo.json
    with pytest.raises(KeyboardInterrupt):
        pseudo.pseudo_label(out, precision=0.0)
    monkeypatch.undo()
    assert (run.round_dir(1) / "pseudo.csv").exists() and not (run.round_dir(1) / "pseudo.json").exists()

    # a round folder without labels (as the old order left it): refused, named, with the way out
    (run.round_dir(1) / "pseudo.csv").unlink()
    write_json(run.round_dir(1) / "pseudo.json", {"from_round": 0, "precision": 0.0})
    with pytest.raises(RunError, match=r"round1: a pseudo-label round without its labels.*mt pseudo-label --run"):
        resume_run(out)
    assert not run.fold_dir(1, 0).exists()  # nothing trained
    reports = pseudo.pseudo_label(out, precision=0.0)  # makes the round again, labels and all
    assert reports[0]["round"] == 1 and reports[0]["trained"] and (run.round_dir(1) / "pseudo.csv").exists()


def test_a_round_whose_labels_another_pseudo_label_removed_is_not_trained_without_them(demo_root, tmp_path, monkeypatch):
    """Two `mt pseudo-label` at once: the second cleared the first's round (labels written, no fold
    begun yet), and the first's folds, finding no labels, trained a plain copy of round 0 that its
    summary called round 1."""
    import multitask.pseudo as pseudo
    from multitask.run import RunError

    out = tmp_path / "run"
    train_run(tiny_config(demo_root, f"data.cache_dir={tmp_path / 'cache'}"), out)
    real = pseudo.train_round

    def after_the_other_cleared(ctx, r, *args, **kwargs):
        pseudo.clear_unfinished_round(ctx.run, r)  # the other process, between the labels and the folds
        return real(ctx, r, *args, **kwargs)

    monkeypatch.setattr(pseudo, "train_round", after_the_other_cleared)
    with pytest.raises(RunError, match=r"round1: round 1 has no labels to learn \(pseudo.csv or pseudo_soft.npz\); "
                                       r"another `mt pseudo-label` on this run may be making them again"):
        pseudo.pseudo_label(out, precision=0.0)
    assert not list(RunDir(out).round_dir(1).glob("fold*/*.npz"))  # nothing trained, nothing voted


def test_pseudo_label_after_a_killed_round_finishes_it_or_makes_it_again_but_never_mixes_labels(
        demo_root, tmp_path, monkeypatch):
    import multitask.pseudo as pseudo
    from multitask.run import SOFT_FILE, RunError

    out = tmp_path / "run"
    cfg = tiny_config(demo_root, f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=2")
    train_run(cfg, out)
    run = RunDir(out)

    # killed in fold 0's first epoch: its folder holds what it began on these labels
    restore = _kill_at_epoch_call(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        pseudo.pseudo_label(out, precision=0.0)
    restore()
    labels = (run.round_dir(1) / "pseudo.csv").read_bytes()
    with pytest.raises(RunError, match=r"round1: round 1 was started and is not finished \(fold0 began.*mt resume --run"):
        pseudo.pseudo_label(out, precision=0.9)  # other labels would mix with those fold 0 began on
    assert (run.round_dir(1) / "pseudo.csv").read_bytes() == labels
    summary = resume_run(out)  # resume finishes it, on the labels it began with
    assert summary["round"] == 1 and summary["folds_done"] == [0, 1] and summary["complete"]
    assert (run.round_dir(1) / "pseudo.csv").read_bytes() == labels

    # killed after soft labels, before any fold: the round is made again whole, with no soft file left
    monkeypatch.setattr(pseudo, "train_round", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        pseudo.pseudo_label(out, overrides=["pseudo.soft=true"])
    monkeypatch.undo()
    assert (run.round_dir(2) / SOFT_FILE).exists() and not (run.round_dir(2) / "fold0").exists()
    reports = pseudo.pseudo_label(out, precision=0.0)
    assert reports[0]["round"] == 2 and reports[0]["trained"]
    assert (run.round_dir(2) / "pseudo.csv").exists() and not (run.round_dir(2) / SOFT_FILE).exists()


def test_resume_sweeps_the_temp_files_of_killed_writes_only(tmp_path):
    """Folds of one run may be trained from several shells at once: `mt resume` in one of them must not
    remove another's write in progress. A temp file names its writer's host and pid."""
    import socket
    import subprocess
    import sys

    from multitask.run import atomic_writer, temp_writer

    run = RunDir(tmp_path / "run")
    fold = run.fold_dir(0, 1)
    from multitask.lock import unlocked

    with atomic_writer(fold / "last.pt") as fh:
        fh.write(b"x")
        (live,) = list(fold.glob(".*.tmp"))
        assert temp_writer(live.name) == (socket.gethostname(), os.getpid())
        assert unlocked(live) is False  # its writer holds its flock while it writes
        proc = subprocess.Popen([sys.executable, "-c", "pass"])
        proc.wait()
        host = socket.gethostname()
        dead = fold / f".metrics.csv~{host}~{proc.pid}~abc123.tmp"
        elsewhere = fold / f".oof.npz~other-host.example~{proc.pid}~abc123.tmp"
        unnamed = run.round_dir(0) / ".summary.json.abc123.tmp"  # made before writers were named
        odd = fold / f".a~b.csv~{host}~{proc.pid}~x_1.tmp"  # a "~" in the file's own name
        for p in (dead, elsewhere, unnamed, odd):
            p.write_bytes(b"")
        # the staging folder of an `mt ensemble --out RUN/ens` that was killed
        staging = run.root / f".ens~{host}~{proc.pid}~k2j4.tmp"
        (staging / "round0").mkdir(parents=True)
        (staging / "round0" / "oof.npz").write_bytes(b"x")
        assert temp_writer(odd.name) == (host, proc.pid)
        # a writer in another container that shares the hostname: its pid is none of this one's, but
        # it holds its file's flock while it writes (as atomic_writer does)
        import fcntl

        other_container = fold / f".best.pt~{host}~{proc.pid}~ghi789.tmp"
        other_container.write_bytes(b"")
        held = os.open(other_container, os.O_RDONLY)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            run.sweep_killed_writes()
        finally:
            os.close(held)
        assert live.exists() and elsewhere.exists() and other_container.exists()
        assert not dead.exists() and not unnamed.exists() and not odd.exists() and not staging.exists()
        run.sweep_killed_writes()  # that writer gone (its flock with it): its file is a killed write's
        assert not other_container.exists() and live.exists()
    assert (fold / "last.pt").read_bytes() == b"x" and not live.exists()


def test_a_write_removes_what_a_killed_write_of_the_same_file_left(tmp_path):
    """`mt predict` or `mt submit` killed while writing left its temp file (a large one, for a large
    set) until a `mt resume` that might never come; the next write of the file removes it."""
    import socket
    import subprocess
    import sys

    from multitask.run import atomic_write_text

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    host = socket.gethostname()
    dead = tmp_path / f".preds.csv~{host}~{proc.pid}~abc123.tmp"
    alive = tmp_path / f".preds.csv~{host}~{os.getpid()}~def456.tmp"  # a write going on now
    other_file = tmp_path / f".submission.csv~{host}~{proc.pid}~abc123.tmp"  # another file's: its own write sweeps it
    for p in (dead, alive, other_file):
        p.write_bytes(b"partial")
    atomic_write_text(tmp_path / "preds.csv", "ImageID,ans\n")
    assert not dead.exists() and alive.exists() and other_file.exists()
    assert (tmp_path / "preds.csv").read_text() == "ImageID,ans\n"


def test_the_ema_averages_the_trained_weights_without_the_first_steps_lingering():
    """timm's EMA copies step 1's weights and keeps decay**(T - 1) of them to the end; the one mt
    trains with weights step i by decay**(T - i), renormalised, as Adam corrects its moments."""
    from timm.utils import ModelEmaV3

    from multitask.engine import BiasCorrectedEma

    d, steps = 0.9, 30
    weights = [1000.0] + [float(i) for i in range(2, steps + 1)]  # step 1: barely off a random start

    def ema_after(kind) -> float:
        model = torch.nn.Linear(1, 1, bias=False)
        ema = kind(model, decay=d)
        for step, w in enumerate(weights, start=1):
            with torch.no_grad():
                model.weight.fill_(w)
            ema.update(model, step=step)
        return ema.module.weight.item()

    share = np.array([d ** (steps - i) for i in range(1, steps + 1)])
    assert ema_after(BiasCorrectedEma) == pytest.approx(float(share @ weights / share.sum()), rel=1e-5)
    plain = d ** (steps - 1) * weights[0] + (1 - d) * float(share[1:] @ weights[1:])
    assert ema_after(ModelEmaV3) == pytest.approx(plain, rel=1e-5)
    # step 1 weighs (1 - d) d^29 / (1 - d^30) = 0.5% of the average, not d^29 = 4.7%
    assert ema_after(BiasCorrectedEma) < 30 < ema_after(ModelEmaV3) - 10


def test_training_keeps_the_bias_corrected_ema(demo_root):
    from multitask.context import build_task
    from multitask.engine import BiasCorrectedEma, build_training

    cfg = tiny_config(demo_root, "train.ema=true")
    task, heads = build_task(cfg)
    assert isinstance(build_training(cfg, task, heads, torch.device("cpu"), steps_per_epoch=4).ema, BiasCorrectedEma)


def test_a_round_another_process_trains_is_never_called_removable(tmp_path):
    """The second of two `mt pseudo-label` at once was told to remove the round the first was training."""
    import json
    import socket
    import subprocess
    import sys

    from multitask.pseudo import clear_unfinished_round
    from multitask.run import RunError

    run = RunDir(tmp_path / "run")
    run.fold_dir(1, 0).mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run.fold_dir(1, 0) / "lock.json").write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid,
                                                                  "since": "x"}))
        with pytest.raises(RunError) as e:
            clear_unfinished_round(run, 1)
        assert f"round 1 is being trained by {socket.gethostname()} pid {sleeper.pid}" in str(e.value)
        assert "(fold0); let it finish" in str(e.value) and "remove" not in str(e.value)  # the fold, not "lock.json"
    finally:
        sleeper.kill()
        sleeper.wait()
    with pytest.raises(RunError, match="fold0 began training on its labels.*or remove"):  # its holder gone: as before
        clear_unfinished_round(run, 1)
