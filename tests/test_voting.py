"""Voting (soft vs hard), TTA views beyond flip, top-k checkpoint averaging, a frozen backbone, and
TensorBoard scalars."""
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_config
from multitask.config import ModelCfg
from multitask.data.augment import tta_view
from multitask.engine import TopEpochs
from multitask.kfold import train_run
from multitask.labels import mask_task
from multitask.model import build_model
from multitask.inference import HARD_TIE_BREAK, vote
from multitask.run import RunDir, load_npz, read_json


def test_hard_vote_counts_argmaxes_and_soft_vote_averages():
    folds = [{"h": np.array([[0.6, 0.4]]), "aux_n": np.array([[1.0]])},
             {"h": np.array([[0.55, 0.45]]), "aux_n": np.array([[2.0]])},
             {"h": np.array([[0.0, 1.0]]), "aux_n": np.array([[3.0]])}]
    soft = vote(folds, "soft")
    hard = vote(folds, "hard")
    np.testing.assert_allclose(soft["h"], [[0.3833333, 0.6166667]], rtol=1e-5)
    assert soft["h"].argmax() == 1 and hard["h"].argmax() == 0  # two folds of three say class 0
    np.testing.assert_allclose(hard["h"].sum(1), 1)
    assert abs(hard["h"][0, 0] - 2 / 3) < 0.01
    assert soft["aux_n"][0, 0] == hard["aux_n"][0, 0] == 2.0  # numbers are averaged either way
    tie = vote([{"h": np.array([[0.9, 0.1]])}, {"h": np.array([[0.45, 0.55]])}], "hard")
    assert tie["h"].argmax() == 0  # a tie goes to the soft vote
    # a fold whose probabilities tie exactly votes for each tied class, as the ONNX graph counts it
    # (export.RunGraph: probabilities equal to the row's maximum)
    torn = vote([{"h": np.array([[0.5, 0.5, 0.0]])}, {"h": np.array([[0.3, 0.6, 0.1]])},
                 {"h": np.array([[0.55, 0.45, 0.0]])}], "hard")
    assert torn["h"][0, 0] == pytest.approx(torn["h"][0, 1], abs=1e-3)  # two votes each (first-argmax: 2 to 1)
    assert torn["h"].argmax() == 1  # the soft vote breaks the tie


def test_zoom_views_keep_the_shape_and_zoom_in():
    x = torch.zeros(1, 3, 20, 20)
    x[..., 0, :] = 1.0  # a bright top row that the zoom crops away
    for view in ("zoom", "zoom_hflip"):
        z = tta_view(x, view)
        assert z.shape == x.shape and z[..., 0, :].max() < 0.5
    ramp = torch.arange(20.0).view(1, 1, 1, 20).expand(1, 3, 20, 20)
    assert torch.allclose(tta_view(ramp, "zoom_hflip"), tta_view(ramp, "zoom").flip(-1))


def test_top_epochs_keeps_the_k_best_files_and_averages_them(tmp_path):
    top = TopEpochs(tmp_path, 2, [])
    model = torch.nn.Linear(2, 1)
    weights = {}
    for epoch, score in enumerate([0.3, 0.5, 0.4, 0.2]):
        with torch.no_grad():
            model.weight.fill_(epoch)
        weights[epoch] = model.weight.clone()
        top.offer(epoch, score, model)
    assert sorted(p.name for p in tmp_path.glob("top_e*.pt")) == ["top_e1.pt", "top_e2.pt"]
    top.write_average("test")
    avg = torch.load(tmp_path / "avg.pt", weights_only=True)
    assert avg["epochs"] == [1, 2] and torch.allclose(avg["model"]["weight"], (weights[1] + weights[2]) / 2)
    # a resumed fold finds its kept epochs again from the metrics rows and the files
    again = TopEpochs(tmp_path, 2, [{"epoch": e, "val_f1": s} for e, s in enumerate([0.3, 0.5, 0.4, 0.2])])
    assert again.kept == [(0.5, 1), (0.4, 2)]


def test_a_run_with_hard_votes_zoom_tta_and_averaged_epochs(demo_root, tmp_path, monkeypatch):
    import multitask.kfold as kfold

    loaded, real_load = [], kfold.load_model
    monkeypatch.setattr(kfold, "load_model", lambda path, *a, **k: loaded.append(path.name) or real_load(path, *a, **k))
    cfg = tiny_config(demo_root, "train.epochs=3", "train.avg_top_k=2", "decide.vote=hard",
                      "aug.tta=[none, hflip, zoom, zoom_hflip]")
    train_run(cfg, tmp_path / "run")
    assert loaded == ["avg.pt", "avg.pt"]  # each fold predicts with its averaged epochs
    run = RunDir(tmp_path / "run")
    for k in (0, 1):
        avg = torch.load(run.fold_dir(0, k) / "avg.pt", weights_only=True)
        assert len(avg["epochs"]) == 2 and len(list(run.fold_dir(0, k).glob("top_e*.pt"))) == 2
    test = load_npz(run.round_dir(0) / "test_probs.npz")
    np.testing.assert_allclose(test["p_age"].sum(1), 1, rtol=1e-6)
    # the test probabilities are the folds' vote shares (a soft vote would give any number)
    n = len(read_json(run.round_dir(0) / "summary.json")["folds_done"])
    for h in ("p_mask", "p_gender", "p_age"):
        assert np.abs(test[h] - np.round(test[h] * n) / n).max() <= HARD_TIE_BREAK
    assert read_json(run.summary)["latest_round"] == 0


def test_a_frozen_backbone_trains_only_its_heads(tmp_path):
    heads = mask_task().heads("mask,gender,age")
    model = build_model(ModelCfg(backbone="resnet10t", freeze_backbone=True), heads)
    before = {k: v.clone() for k, v in model.backbones.state_dict().items()}
    head_before = model.heads["age"].weight.clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    assert not model.backbones[0].training and model.heads.training
    out = model(torch.rand(4, 3, 32, 32))
    sum(o.sum() for o in out.values()).backward()
    opt.step()
    for k, v in model.backbones.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights and BatchNorm statistics alike
    assert not torch.equal(model.heads["age"].weight, head_before)


def test_a_frozen_pretrained_checkpoint_run(demo_root, tmp_path):
    """Frozen features from a local checkpoint that the test writes itself."""
    import timm

    ckpt = tmp_path / "backbone.pth"
    torch.save(timm.create_model("test_efficientnet", num_classes=10).state_dict(), ckpt)
    cfg = tiny_config(demo_root, "train.fold=[0]", "model.freeze_backbone=true", f"model.checkpoint={ckpt}")
    train_run(cfg, tmp_path / "run")
    trained = torch.load(RunDir(tmp_path / "run").fold_dir(0, 0) / "best.pt", weights_only=True)["model"]
    loaded = torch.load(ckpt, weights_only=True)
    key = next(k for k in loaded if k.startswith("conv_stem"))
    assert torch.equal(trained[f"backbones.0.{key}"], loaded[key])

    # without weights to keep, a frozen backbone is refused; a student of another backbone trains its own
    from multitask.config import ConfigError
    from multitask.distill import student_config
    from multitask.model import check_model

    with pytest.raises(ConfigError, match="model.freeze_backbone: the backbone has no weights to keep"):
        check_model(cfg.model.model_copy(update={"checkpoint": None}))
    student = student_config(cfg, tmp_path / "run", 0, "test_byobnet", None, 1, None, 0.5, True, 0, [])
    assert student.model.checkpoint is None and not student.model.freeze_backbone
    check_model(student.model)


def test_a_run_pins_the_checkpoint_it_started_from(demo_root, tmp_path):
    """Folds trained later (`mt resume`, a pseudo-label round, `--fold K`) start from the same weights
    as the first ones: a checkpoint file overwritten in between is an error that names it."""
    import hashlib

    import timm
    import yaml

    from multitask.config import ConfigError
    from multitask.kfold import resume_run
    from multitask.model import CheckpointError
    from multitask.pseudo import pseudo_label

    ckpt = tmp_path / "backbone.pth"
    torch.manual_seed(1)  # training reseeds the global generator: these weights must differ from the later ones
    torch.save(timm.create_model("test_efficientnet", num_classes=10).state_dict(), ckpt)
    train_run(tiny_config(demo_root, "train.fold=[0]", f"model.checkpoint={ckpt}"), tmp_path / "run")
    run = RunDir(tmp_path / "run")
    recorded = yaml.safe_load(run.config.read_text())["model"]["checkpoint_sha256"]
    assert recorded == hashlib.sha256(ckpt.read_bytes()).hexdigest()

    torch.manual_seed(2)
    torch.save(timm.create_model("test_efficientnet", num_classes=10).state_dict(), ckpt)  # other weights
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() != recorded
    with pytest.raises(CheckpointError, match=r"backbone.pth: not the checkpoint this run started from"):
        resume_run(tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"backbone.pth: not the checkpoint this run started from"):
        pseudo_label(tmp_path / "run")
    assert not run.fold_dir(0, 1).exists() and run.fold_done(0, 0, with_test=True)
    assert run.rounds() == [0]
    with pytest.raises(ConfigError, match="other settings \\(model.checkpoint_sha256\\)"):
        train_run(tiny_config(demo_root, "train.fold=[1]", f"model.checkpoint={ckpt}"), tmp_path / "run")


def test_a_moved_checkpoint_is_followed_through_config_yaml_and_folds_of_an_older_mt_still_count(demo_root, tmp_path):
    """model.checkpoint is where the weights are, not what they are (their sha256 is), nor whether
    there are any (a run from scratch is another run): a run whose checkpoint moved is told to write
    its new place in config.yaml, and then resumes with the folds it had. Folds an earlier mt
    trained carry a hash that held the checkpoint's place, and count too."""
    import timm
    import yaml

    from multitask.config import ConfigError, load_config
    from multitask.context import run_settings_hashes
    from multitask.distill import distill
    from multitask.kfold import resume_run
    from multitask.model import CheckpointError
    from multitask.pseudo import pseudo_label
    from multitask.submit import make_submission

    a, b, c = (tmp_path / name / "w.pth" for name in "abc")
    for place in (a, b, c):
        place.parent.mkdir()
    torch.manual_seed(1)
    torch.save(timm.create_model("test_efficientnet", num_classes=10).state_dict(), a)
    train_run(tiny_config(demo_root, "train.fold=[0]", f"model.checkpoint={a}"), tmp_path / "run")
    run = RunDir(tmp_path / "run")
    a.rename(b)
    for command in (resume_run, pseudo_label):
        with pytest.raises(ValueError, match=r"a/w.pth: checkpoint file not found \(model.checkpoint in "
                                             r".*run/config.yaml\); if it moved, write its new place there"):
            command(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"model.checkpoint: where things are is not set per command; if it moved, "
                                          r"write its new place in .*run/config.yaml"):
        resume_run(tmp_path / "run", [f"model.checkpoint={b}"])
    with pytest.raises(ConfigError, match=r"holds this run with model.checkpoint at another place; if it moved, write "
                                          r"its new place in .*config.yaml and train on \(--force would remove"):
        train_run(tiny_config(demo_root, "train.fold=[1]", f"model.checkpoint={b}"), tmp_path / "run")
    assert not run.fold_dir(0, 1).exists() and run.rounds() == [0]

    written = yaml.safe_load(run.config.read_text())
    run.config.write_text(yaml.safe_dump(written | {"model": written["model"] | {"checkpoint": str(b)}}, sort_keys=False))
    resume_run(tmp_path / "run")  # fold 0, trained when the file was in a/, still counts
    assert read_json(run.round_dir(0) / "summary.json")["folds_done"] == [0, 1]
    make_submission(tmp_path / "run")

    b.rename(c)  # the checkpoint is read to train, not to rebuild a round's results or to read them
    (run.round_dir(0) / "summary.json").unlink()  # as an aggregation killed halfway leaves the round
    assert resume_run(tmp_path / "run")["folds_done"] == [0, 1]
    make_submission(tmp_path / "run")
    with pytest.raises(ValueError, match=r"b/w.pth: checkpoint file not found \(model.checkpoint in .*run/config.yaml"):
        distill(tmp_path / "run", tmp_path / "student")  # it keeps the teacher's backbone, and so its weights
    assert not (tmp_path / "student").exists()

    torch.manual_seed(2)  # what it is may not change: other weights at the named place are refused
    torch.save(timm.create_model("test_efficientnet", num_classes=10).state_dict(), b)
    with pytest.raises(CheckpointError, match=r"w.pth: not the checkpoint this run started from .* put the old file "
                                              r"back \(or point model.checkpoint at it\)"):
        pseudo_label(tmp_path / "run")
    # nor whether there is one: from the checkpoint to none (its digest left as it was), or from none to one
    run.config.write_text(yaml.safe_dump(written | {"model": written["model"] | {"checkpoint": None}}, sort_keys=False))
    for command in (resume_run, make_submission):
        with pytest.raises(ValueError, match=r"fold\(s\) 0, 1 were trained under other settings"):
            command(tmp_path / "run")
    train_run(tiny_config(demo_root, "train.fold=[0]"), tmp_path / "scratch")
    scratch = RunDir(tmp_path / "scratch")
    scratch.config.write_text(scratch.config.read_text().replace("checkpoint: null", f"checkpoint: {c}"))
    with pytest.raises(ValueError, match=r"fold\(s\) 0 were trained under other settings"):
        resume_run(tmp_path / "scratch")
    assert not scratch.fold_dir(0, 1).exists()

    # a fold stamped with the former hash (the checkpoint's place inside) counts while the place is the
    # one it was trained with; moved, the error says how to get the fold back
    run.config.write_text(yaml.safe_dump(written, sort_keys=False))  # the place fold 0 was trained with: a/
    now, former = run_settings_hashes(run, load_config(run.config))
    assert now != former
    oof_path = run.fold_dir(0, 0) / "oof.npz"
    oof = dict(np.load(oof_path))
    np.savez(oof_path, **oof | {"settings": np.array(former)})
    make_submission(tmp_path / "run")
    run.config.write_text(yaml.safe_dump(written | {"model": written["model"] | {"checkpoint": str(c)}}, sort_keys=False))
    assert run_settings_hashes(run, load_config(run.config))[0] == now  # where it is does not count now
    with pytest.raises(ValueError, match=r"fold\(s\) 0 were trained under other settings .* If only "
                                         r"model.checkpoint moved and the folds were trained by an earlier mt"):
        make_submission(tmp_path / "run")
    np.savez(oof_path, **oof | {"settings": np.array("0123456789abcdef")})
    with pytest.raises(ValueError, match=r"fold\(s\) 0 were trained under other settings"):
        make_submission(tmp_path / "run")


def test_tensorboard_scalars_per_fold_and_head(demo_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_run(tiny_config(demo_root, "train.epochs=2", "train.tensorboard=true"), tmp_path / "run")
    for k in (0, 1):
        events = EventAccumulator(str(RunDir(tmp_path / "run").fold_dir(0, k) / "tb"))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        assert {"train_loss", "val_f1", "val_f1/mask", "val_f1/gender", "val_f1/age", "loss/age", "val_nll/total", "lr"} <= tags
        assert [e.step for e in events.Scalars("val_f1/age")] == [1, 2]
        metrics = pd.read_csv(RunDir(tmp_path / "run").fold_dir(0, k) / "metrics.csv")
        assert [e.value for e in events.Scalars("val_f1")] == pytest.approx(metrics["val_f1"].tolist())
