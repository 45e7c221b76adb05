"""`mt tune`: an Optuna study whose trials are runs, pruned per fold, resumable from its SQLite file,
ending in a best.yaml that `mt train --config` accepts."""
import yaml
from typer.testing import CliRunner

from multitask.cli import app
from multitask.config import load_config
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

    # a time limit shorter than a trial starts no further trial, and says so
    result = runner.invoke(app, ["tune", "--out", str(study), "--trials", "10", "--data", str(demo_root),
                                 "--time-limit", "1s", *sum((["--set", o] for o in base), [])], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "no new trial started" in result.output and "best: trial" in result.output
    assert len(list(study.glob("trial_*"))) == 4
