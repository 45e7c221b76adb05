"""`mt tune`: an Optuna study whose trials are runs, pruned per fold, resumable from its SQLite file,
ending in a best.yaml that `mt train --config` accepts."""
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from multitask.cli import app
from multitask.config import ConfigError, load_config
from multitask.run import RunDir
from multitask.tune import tune

runner = CliRunner()


def test_a_study_resumes_and_its_best_config_trains(demo_root, tmp_path):
    base = ["model.backbone=test_efficientnet", "data.img_size=[32, 32]", "train.folds=2", "train.epochs=1",
            "train.batch_size=16", "train.device=cpu", f"data.cache_dir={tmp_path / 'cache'}"]
    study = tmp_path / "study"
    said = []
    first = tune(None, study, trials=2, data=demo_root, overrides=base, say=said.append)
    assert first["finished"] == 2 and (study / "study.db").exists()
    assert RunDir(study / "trial_000").rounds() == [0]
    # killed and started again: it goes on to the number of trials asked for, not from zero
    again = tune(None, study, trials=3, data=demo_root, overrides=base, say=said.append)
    assert again["finished"] == 3 and sorted(p.name for p in study.glob("trial_*")) == ["trial_000", "trial_001", "trial_002"]
    best = load_config(study / "best.yaml")
    assert best.train.folds == 2 and best.train.fold is None
    assert yaml.safe_load((study / "best.yaml").read_text())["train"]["lr"] == best.train.lr
    # the best settings train as they are
    result = runner.invoke(app, ["train", "--config", str(study / "best.yaml"), "--data", str(demo_root),
                                 "--out", str(tmp_path / "best_run")])
    assert result.exit_code == 0, result.output

    # a time limit shorter than a trial starts no further trial, and says so: the study's trials
    # tell what a trial takes (a limit shorter than any trial, since a pruned one takes under 1 s)
    result = runner.invoke(app, ["tune", "--out", str(study), "--trials", "10", "--data", str(demo_root),
                                 "--time-limit", "0.001s", *sum((["--set", o] for o in base), [])], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "no new trial started (3 of 10 finished)" in result.output and "best: trial" in result.output
    assert len(list(study.glob("trial_*"))) == 3  # not one more to learn what the study already knew


def test_a_trial_another_process_runs_is_left_to_it(demo_root, tmp_path):
    # two `mt tune` on one study: the second took the first's running trial for a killed one and
    # failed it, and the first then lost the trial it finished
    import optuna

    from multitask.lock import file_lock
    from multitask.tune import STUDY_NAME, trial_lock

    base = ["model.backbone=test_efficientnet", "data.img_size=[32, 32]", "train.folds=2", "train.epochs=1",
            "train.batch_size=16", "train.device=cpu", "train.fold=[0]", f"data.cache_dir={tmp_path / 'cache'}"]
    out, said = tmp_path / "study", []
    tune(None, out, trials=1, data=demo_root, overrides=base, say=said.append)
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{out / 'study.db'}")
    running = study.ask().number  # as another process's trial stands while it trains
    with file_lock(trial_lock(out, running)) as holder:
        assert holder is None
        tune(None, out, trials=2, data=demo_root, overrides=base, say=said.append)
        assert study.trials[running].state == optuna.trial.TrialState.RUNNING
        assert any(line.startswith(f"trial {running} is being run by ") and line.endswith(": left to it") for line in said)
        assert said[-1].startswith(f"trial {running + 1}: ")  # the trial this process ran, not the other's
    # its process gone (the lock with it): a trial left running was interrupted
    tune(None, out, trials=2, data=demo_root, overrides=base, say=said.append)
    assert study.trials[running].state == optuna.trial.TrialState.FAIL
    assert f"trial {running} was interrupted: counted as failed, its folder kept" in said


def test_trials_behind_the_median_are_pruned_at_the_end_of_their_first_fold(demo_root, tmp_path, monkeypatch):
    """The pruner sees every epoch but judges none before the first fold's last: a trial that then
    trails earlier trials stops there, with the epochs it ran and no more."""
    import optuna
    import pandas as pd

    import multitask.tune as tuning

    base = ["model.backbone=test_efficientnet", "data.img_size=[32, 32]", "train.folds=2", "train.epochs=3",
            "train.batch_size=16", "train.device=cpu", f"data.cache_dir={tmp_path / 'cache'}"]
    # trial 0 and 1 learn (lr 3e-3); trial 2 cannot (lr 1e-9): behind the median from its first epoch on
    lrs = iter([3e-3, 3e-3, 1e-9])
    real = tuning.suggest
    monkeypatch.setattr(tuning, "suggest", lambda trial, cfg: [*real(trial, cfg), f"train.lr={next(lrs)}",
                                                               "aug.mix={prob: 0.0}", "data.img_size=[32, 32]"])
    said = []
    result = tuning.tune(None, tmp_path / "study", trials=3, data=demo_root, overrides=base, say=said.append)
    study = optuna.load_study(study_name="mt", storage=f"sqlite:///{tmp_path / 'study' / 'study.db'}")
    states = [t.state for t in study.trials]
    assert states[:2] == [optuna.trial.TrialState.COMPLETE] * 2 and result["finished"] == 3
    # seeded on the CPU, so the same every time: judged at fold 0's last epoch, stopped there
    assert states[2] == optuna.trial.TrialState.PRUNED and list(study.trials[2].intermediate_values) == [1, 2, 3]
    metrics = pd.read_csv(tmp_path / "study" / "trial_002" / "round0" / "fold0" / "metrics.csv")
    assert len(metrics) == 3 and not (tmp_path / "study" / "trial_002" / "round0" / "fold1").exists()
    assert said[2].startswith("trial 2: pruned after fold 0 epoch 3, its validation macro F1 then")
    assert sorted(study.trials[0].intermediate_values) == list(range(1, 7))  # every epoch of both folds


def test_a_study_of_one_fold_counts_its_steps_from_that_fold(demo_root, tmp_path, monkeypatch):
    """With train.fold=[1] fold 1 is the first fold trained: its epochs are steps 1..3, so the
    pruner waits for its end, as for fold 0 of a full study (steps 4..6 would be judged at once)."""
    import optuna

    import multitask.kfold

    def fake_run(cfg, run, on_epoch=None):
        for epoch in (1, 2, 3):
            on_epoch(1, epoch, {"val_f1": 0.1 * epoch})
        return {"oof": {"f1": 0.3}}
    monkeypatch.setattr(multitask.kfold, "train_run", fake_run)
    tune(None, tmp_path / "study", trials=1, data=demo_root, say=lambda _: None,
         overrides=["train.device=cpu", "train.epochs=3", "train.fold=[1]"])
    trial = optuna.load_study(study_name="mt", storage=f"sqlite:///{tmp_path / 'study' / 'study.db'}").trials[0]
    assert sorted(trial.intermediate_values) == [1, 2, 3]


def test_a_resumed_study_does_not_repeat_its_first_trial(demo_root, tmp_path, monkeypatch):
    """The sampler's random start is drawn from its seed: seeded as at the study's start, the first
    trial after a restart would repeat trial 0's settings."""
    import optuna

    import multitask.kfold

    monkeypatch.setattr(multitask.kfold, "train_run", lambda cfg, run, on_epoch=None: {"oof": {"f1": 0.5}})
    for n in (1, 2, 3):  # three invocations, one new trial each
        tune(None, tmp_path / "study", trials=n, data=demo_root, overrides=["train.device=cpu"], say=lambda _: None)
    trials = optuna.load_study(study_name="mt", storage=f"sqlite:///{tmp_path / 'study' / 'study.db'}").trials
    assert len(trials) == 3
    assert trials[1].params != trials[0].params and trials[2].params not in (trials[0].params, trials[1].params)
    # continued under other base settings, its trials would not compare, and best.yaml would join
    # the best trial's suggestions to settings it never trained with
    with pytest.raises(ConfigError, match=r"other settings \(train.epochs differ\)"):
        tune(None, tmp_path / "study", trials=4, data=demo_root, overrides=["train.device=cpu", "train.epochs=3"],
             say=lambda _: None)
    # nor over other folds: a run may train its folds in several invocations, a study's trials are compared by their OOF
    with pytest.raises(ConfigError, match=r"other settings \(train.fold differ\)"):
        tune(None, tmp_path / "study", trials=4, data=demo_root, overrides=["train.device=cpu", "train.fold=[0]"],
             say=lambda _: None)
    tune(None, tmp_path / "study", trials=4, data=demo_root, overrides=["train.device=cpu", "train.jobs=2"],
         say=lambda _: None)  # where and how fast it trains may change
    # and where its data is: a study whose data folder moved goes on, and says so
    moved = tmp_path / "moved"
    shutil.copytree(demo_root, moved)
    said = []
    tune(None, tmp_path / "study", trials=5, data=moved, overrides=["train.device=cpu"], say=said.append)
    assert said[0] == f"data_root moved: the study goes on with it at {moved}" and len(said) == 2  # and trial 4
    # but a moved folder is only followed where it holds the same data: other labels are other data
    relabelled = tmp_path / "relabelled"
    shutil.copytree(demo_root, relabelled)
    table = relabelled / "train" / "train.csv"
    table.write_text(table.read_text().replace(",female,", ",male,", 1))
    for data in (relabelled, moved):  # at a new place, or edited in place
        if data == moved:
            shutil.copy(table, moved / "train" / "train.csv")
        with pytest.raises(ConfigError, match="other images, groups or labels than the study's trials trained on"):
            tune(None, tmp_path / "study", trials=6, data=data, overrides=["train.device=cpu"], say=lambda _: None)
    # a study begun by an mt that did not record its data cannot tell a moved folder from other data
    study = optuna.load_study(study_name="mt", storage=f"sqlite:///{tmp_path / 'study' / 'study.db'}")
    study.set_user_attr("data", None)
    with pytest.raises(ConfigError, match="did not record what its data is; continue it from the old place"):
        tune(None, tmp_path / "study", trials=6, data=demo_root, overrides=["train.device=cpu"], say=lambda _: None)
    with pytest.raises(ConfigError, match=r"other settings \(train.epochs differ\)"):  # moved and changed
        tune(None, tmp_path / "study", trials=6, data=demo_root, overrides=["train.device=cpu", "train.epochs=3"],
             say=lambda _: None)


def suggested(*overrides, seed=0):
    """A trial's overrides on a config, and the config they make."""
    import optuna

    from multitask.tune import suggest

    base = load_config(None, list(overrides))
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed)).ask()
    sets = suggest(trial, base)
    return trial.params["aug_strength"], sets, load_config(None, [*overrides, *sets])


def test_augmentation_strength_scales_what_the_torch_backend_reads():
    s, sets, cfg = suggested("aug.backend=torch", "aug.torch.rotate=20")
    assert not any(o.startswith("aug.train=") for o in sets) and any(o.startswith("aug.torch=") for o in sets)
    assert cfg.aug.torch.rotate == pytest.approx(20 * s, abs=1e-3)
    assert cfg.aug.torch.translate == pytest.approx(0.06 * s, abs=1e-3)
    assert cfg.aug.torch.scale == pytest.approx((1 - 0.1 * s, 1 + 0.1 * s), abs=1e-3)
    assert cfg.aug.torch.hflip == 0.5  # a probability, not a strength


def test_augmentation_strength_scales_the_configs_own_albumentations():
    own = "aug.train=[{name: Affine, rotate: [-20, 20], scale: [0.8, 1.2], p: 0.5}, {name: GaussNoise, p: 0.2}]"
    s, sets, cfg = suggested(own)
    assert not any(o.startswith("aug.torch=") for o in sets)
    affine, noise = cfg.aug.train
    assert affine["rotate"] == pytest.approx([-20 * s, 20 * s], abs=1e-3)
    assert affine["scale"] == pytest.approx([1 - 0.2 * s, 1 + 0.2 * s], abs=1e-3)
    assert affine["p"] == 0.5 and "translate_percent" not in affine  # nothing added, probabilities kept
    assert noise == {"name": "GaussNoise", "p": 0.2}


def test_a_larger_picture_takes_its_crop_to_the_pictures_size_along():
    # a crop back to the configured size (as mt's own error advises) would fail every trial at 1.25
    from multitask.data.augment import check_albumentations

    own = ("aug.train=[{name: RandomResizedCrop, size: [36, 100], scale: [0.8, 1.0]}, "
           "{name: CenterCrop, height: 36, width: 100}, {name: RandomCrop, height: 24, width: 24, pad_if_needed: true}]")
    sizes = set()
    for seed in (0, 2):  # draws of scale 1.0 and 1.25
        _, _, cfg = suggested(own, "data.img_size=[36, 100]", seed=seed)
        h, w = cfg.data.img_size
        sizes.add((h, w))
        crop, centre, other = cfg.aug.train
        assert crop["size"] == [h, w] and [centre["height"], centre["width"]] == [h, w]
        assert [other["height"], other["width"]] == [24, 24]  # another size is the user's choice, kept
        check_albumentations(cfg.aug.train[:2], (h, w))
    assert sizes == {(36, 100), (48, 128)}


def test_a_trial_keeps_the_base_settings_it_does_not_tune():
    base = ["numeric.age={aux: ordinal, aux_weight: 3.0, train_bins: [30, 58], drop_near_edge: 1.0}",
            "aug.mix={prob: 0.1, stop_epoch: 10, switch_prob: 0.9}", "data.img_size=[36, 100]"]
    sizes = set()
    for seed in (0, 2):  # draws of scale 1.0 and 1.25
        _, sets, cfg = suggested(*base, seed=seed)
        age = cfg.numeric["age"]
        assert (age.aux_weight, age.train_bins, age.drop_near_edge) == (3.0, [30, 58], 1.0)  # tuned: aux, soft_edge
        assert (cfg.aug.mix.stop_epoch, cfg.aug.mix.switch_prob) == (10, 0.9)  # tuned: the alphas and prob
        sizes.add(cfg.data.img_size)
    assert sizes == {(36, 100), (48, 128)}  # 1.0 keeps the size as configured; 1.25 rounds to multiples of 8


def test_soft_edges_are_searched_in_the_numbers_own_units():
    """0-5 suits ages with edges 30 and 60; a number whose edges lie 6 apart searches 0-1."""
    import optuna

    from multitask.tune import suggest

    for bins, high in (("[30, 60]", 5.0), ("[20, 26]", 1.0)):
        base = load_config(None, [f"data.age_bins={bins}"])
        trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
        suggest(trial, base)
        assert trial.distributions["soft_edge_age"].high == pytest.approx(high)


def test_a_time_limit_per_trial_is_refused_before_any_trial(tmp_path):
    pytest.importorskip("optuna")
    with pytest.raises(ConfigError, match="train.time_limit_s in a study.*mt tune --time-limit"):
        tune(None, tmp_path / "study", trials=1, overrides=["train.time_limit_s=60"])
    assert not (tmp_path / "study").exists()
